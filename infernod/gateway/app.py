"""The gateway's HTTP side: routes, the error middleware, and each endpoint's handler.

Every daemon call goes through one :class:`~infernod.client.AsyncClient` (the public
client library), so nothing said over HTTP reaches the daemon other than as a normal,
validated request of a normal client.

A handler whose HTTP client goes away is cancelled by aiohttp (``handler_cancellation``);
its ``finally`` cancels the daemon request, so the slot frees within a decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from infernod.client import AsyncClient, AsyncStream, decode_array
from infernod.gateway import openai_wire as wire
from infernod.gateway import sse
from infernod.gateway.auth import Auth
from infernod.gateway.errors import HttpError, bad_request, from_inferno
from infernod.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from infernod.protocol.errors import InfernoError

log = logging.getLogger("inferno-gateway")

PRIORITY_HEADER = "X-Inferno-Priority"
DEADLINE_HEADER = "X-Inferno-Deadline-Ms"  # milliseconds from now
REQUEST_ID_HEADER = "X-Request-Id"
MAX_BODY_BYTES = 8 * 1024 * 1024
HEALTH_TIMEOUT_S = 3.0
DRAIN_MEMORY_S = 10.0  # a 'shutting_down' answer marks the daemon draining this long

ClientFactory = Callable[[], AsyncClient]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """One gateway: its daemon client, its auth hook, and the aiohttp application."""

    def __init__(self, client_factory: ClientFactory, auth: Auth | None = None, *,
                 default_model: str | None = None) -> None:
        self.client_factory = client_factory
        self.auth = auth or Auth()
        self.default_model = default_model
        self._client: AsyncClient | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.draining_since: float | None = None
        self.draining_boot: str | None = None  # the daemon (boot id) that said it was draining
        self.metrics = GatewayMetrics()

    # -- the client ---------------------------------------------------------------------
    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self.client.cancel(request_id)
        except InfernoError:
            pass  # already finished, or the daemon is gone: nothing left to stop
        log.info("cancelled %s: the HTTP client went away", request_id)

    def _noted(self, e: InfernoError) -> HttpError:
        if e.code == "shutting_down":
            self.draining_since = time.monotonic()
            self.draining_boot = self._client.boot_id if self._client is not None else None
        return from_inferno(e)

    # -- the application ----------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._errors,
                                           self.auth.middleware(lambda: self.client)],
                              client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)

        async def cleanup(_: web.Application) -> None:
            for task in list(self._background):
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
                except (TimeoutError, asyncio.CancelledError, InfernoError):
                    pass
            self.close()

        app.on_cleanup.append(cleanup)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every HTTP answer by route and status (499: the client left first); stamps the
        arrival time the latency metrics count from."""
        request["inferno_t0"] = time.monotonic()
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "unmatched"
        self.metrics.in_flight.inc()
        status = 499
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.answered(path, status)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return e.response(self._rid_header(request))
        except InfernoError as e:
            return self._noted(e).response(self._rid_header(request))
        except web.HTTPException as e:  # aiohttp's own: 404 route, 405, 413 body
            if e.status < 400:
                raise
            return HttpError(e.status, e.reason, code=e.reason.lower().replace(" ", "_")
                             ).response()

    @staticmethod
    def _rid_header(request: web.Request) -> dict[str, str]:
        rid = request.get("inferno_request_id")
        return {REQUEST_ID_HEADER: rid} if rid else {}

    # -- request helpers ----------------------------------------------------------------
    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    @staticmethod
    def _priority(request: web.Request, body: dict[str, Any]) -> str | None:
        header = request.headers.get(PRIORITY_HEADER)
        if header is not None:
            return wire.priority_from(header, PRIORITY_HEADER)
        return wire.priority_from(body.get("priority"))

    @staticmethod
    def _deadline(request: web.Request) -> float | None:
        raw = request.headers.get(DEADLINE_HEADER)
        if raw is None:
            return None
        try:
            ms = float(raw)
        except ValueError:
            raise bad_request(f"{DEADLINE_HEADER} must be milliseconds from now, "
                              f"not {raw!r}") from None
        if not ms > 0 or ms > 86_400_000:
            raise bad_request(f"{DEADLINE_HEADER} must be between 0 and 86400000 ms")
        return time.time() + ms / 1000

    # -- endpoints ----------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.StreamResponse:
        await self.auth.authorize(request, "models")
        listing = await self.client.model_listing()
        return web.json_response(wire.models_object(listing.get("models") or []))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await self.auth.authorize(request, "generate")
        body = await self._json(request)
        return await self._generate(request, body, wire.parse_chat(body, self.default_model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        await self.auth.authorize(request, "generate")
        body = await self._json(request)
        return await self._generate(request, body,
                                    wire.parse_completion(body, self.default_model))

    async def _start(self, call: wire.GenCall, priority: str | None,
                     deadline: float | None) -> AsyncStream:
        """Admission: the daemon's reply (the request id) or its error. The call runs in a
        task of its own, so a client leaving meanwhile still learns the id to cancel."""
        task = asyncio.ensure_future(self.client.generate(
            call.model, call.prompt, messages=call.messages, deadline=deadline,
            priority=priority, client=call.user, **call.params))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def cancel_late(t: asyncio.Future[AsyncStream]) -> None:
                if not t.cancelled() and t.exception() is None:
                    self._spawn(self._cancel(t.result().request_id))
            task.add_done_callback(cancel_late)
            raise

    async def _generate(self, request: web.Request, body: dict[str, Any],
                        call: wire.GenCall) -> web.StreamResponse:
        priority = self._priority(request, body)
        deadline = self._deadline(request)
        stream = await self._start(call, priority, deadline)
        request["inferno_request_id"] = stream.request_id
        log.info("%s %s model=%s priority=%s user=%s", request.path, stream.request_id,
                 call.model, priority or "normal", call.user or "-")
        headers = {REQUEST_ID_HEADER: stream.request_id}
        rid, created = wire.new_id(call.kind), wire.now_s()
        finished = False
        try:
            if call.stream:
                resp = await self._stream(request, call, stream, headers, rid, created)
            else:
                parts = [text async for text in self._texts(request, call, stream)]
                self._finished(request, call, stream)
                resp = web.json_response(
                    wire.completion_object(call, rid, created, "".join(parts), stream.stats,
                                           stream.logprobs), headers=headers)
            finished = True
            return resp
        finally:
            if not finished and not stream.state.done:
                self._spawn(self._cancel(stream.request_id))

    async def _stream(self, request: web.Request, call: wire.GenCall, stream: AsyncStream,
                      headers: dict[str, str], rid: str, created: int) -> web.StreamResponse:
        resp = await sse.open_stream(request, headers)
        if call.kind == "chat":
            await sse.send(resp, wire.chunk(call, rid, created, text="", first=True))
        seen = offset = 0  # logprob entries already sent; characters already sent
        try:
            async for text in self._texts(request, call, stream):
                entries = stream.logprobs[seen:]
                seen += len(entries)
                await sse.send(resp, wire.chunk(call, rid, created, text=text,
                                                logprobs=entries, text_offset=offset))
                offset += len(text)
        except InfernoError as e:
            # Headers are gone: the error travels as a data frame, as OpenAI does it.
            await sse.send(resp, self._noted(e).body())
            await sse.done(resp)
            return resp
        self._finished(request, call, stream)
        await sse.send(resp, wire.chunk(call, rid, created, finish=wire.finish_reason(
            stream.stats)))
        if call.include_usage:
            await sse.send(resp, wire.chunk(call, rid, created, usage_of=stream.stats,
                                            final_usage=True))
        await sse.done(resp)
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        await self.auth.authorize(request, "embed")
        body = await self._json(request)
        model, texts, fmt = wire.parse_embeddings(body, self.default_model)
        payload: dict[str, Any] = {"model": model, "texts": texts, "normalize": True}
        priority = self._priority(request, body)
        if priority is not None:
            payload["priority"] = priority
        user = wire.user_label(body)
        if user is not None:
            payload["client"] = user  # the label queue rows and profiles show
        client = self.client
        msg_id = client.core.new_id()
        request_id = f"{client.session}.{msg_id}"  # an embed's id (docs/protocol.md)
        request["inferno_request_id"] = request_id
        finished = False
        try:
            reply = await client.request("embed", payload, msg_id=msg_id,
                                         deadline=self._deadline(request),
                                         timeout=max(client.timeout, 300))
            finished = True
        finally:
            if not finished:
                self._spawn(self._cancel(request_id))
        vectors = decode_array(reply["vectors"])
        tokens = sum(int(t) for t in reply.get("tokens") or [])
        return web.json_response(wire.embeddings_object(model, vectors, fmt, tokens),
                                 headers={REQUEST_ID_HEADER: request_id})

    def _texts(self, request: web.Request, call: wire.GenCall,
               stream: AsyncStream) -> AsyncIterator[str]:
        """The stream's text deltas; the first observes the time to first token."""
        return self.metrics.first_token(call.model, request["inferno_t0"], _texts(stream))

    def _finished(self, request: web.Request, call: wire.GenCall, stream: AsyncStream) -> None:
        self.metrics.finished(call.model, request["inferno_t0"], stream.stats,
                              wire.finish_reason(stream.stats))

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        """``GET /metrics``: Prometheus text (gateway/metrics.py), as the gateway itself."""
        body = await self.metrics.scrape(self.client)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def health(self, request: web.Request) -> web.StreamResponse:
        """ready / degraded / down, with the reason: 200 unless down (503)."""
        await self.auth.authorize(request, "health")
        try:
            status = await self.client.request("status", timeout=HEALTH_TIMEOUT_S)
        except InfernoError as e:
            return web.json_response({"status": "down", "reason": f"{e.code}: {e.message}"},
                                     status=503)
        reasons = []
        draining = (self.draining_since is not None
                    and time.monotonic() - self.draining_since < DRAIN_MEMORY_S
                    and status.get("boot_id") == self.draining_boot)  # not a daemon since
        if status.get("draining") or draining:
            reasons.append("the daemon is draining: new requests are refused")
        for failed in status.get("models_failed") or []:
            reasons.append(f"model {failed.get('name')} failed: {failed.get('failed_reason')}")
        level = (status.get("queue") or {}).get("level")
        if level == "critical":
            reasons.append("the queue is at its critical level")
        queue = status.get("queue") or {}
        return web.json_response({
            "status": "degraded" if reasons else "ready",
            "reason": "; ".join(reasons) or None,
            "daemon": {"version": status.get("version"), "boot_id": status.get("boot_id"),
                       "models_loaded": [m.get("name") for m in
                                         status.get("models_loaded") or []],
                       "queued": queue.get("queued"), "running": queue.get("running"),
                       "level": level}})


async def _texts(stream: AsyncStream) -> AsyncGenerator[str, None]:
    """The stream's text deltas, its iterator closed whatever happens (so the client stops
    following it)."""
    it = stream.__aiter__()
    try:
        async for text in it:
            if text:
                yield text
    finally:
        await it.aclose()  # type: ignore[attr-defined]

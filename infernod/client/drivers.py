"""Client library for infernod: everything a script, the CLI or the TUI needs.

    from infernod.client import Client
    with Client() as c:
        for text in c.generate("gemma3-270m", prompt="The capital of France is"):
            print(text, end="", flush=True)

``Client`` is synchronous, ``AsyncClient`` is for asyncio (Textual runs on asyncio). Neither
is thread-safe: use one per thread, like the ZeroMQ sockets inside them.

A client never hangs: every wait has a timeout; no socket file raises ``DaemonUnavailable``
at once, and while any request or stream waits, three missed heartbeats (a daemon killed or
stopped) or a new ``boot_id`` (the daemon restarted) raise it within about three seconds,
whatever the request's own timeout. ZeroMQ reconnects by itself, so the same client works
again once the daemon is back. Missed stream events (a gap in ``seq``) are fetched with
``stream.fetch``, so a stream always delivers every token exactly once, in order (or raises
``aborted``, reason ``events_lost``, once the daemon's stream buffer no longer holds them).

Subscribers pass ``topics=`` and iterate ``events()``: each :class:`Event`, and the
library's own :class:`Notice` s among them (``events_lost``: a gap in a topic's seq;
``daemon_restarted``). The protocol logic is :class:`~infernod.client.core.ClientCore`'s, which
does no I/O; these two classes only move bytes and wait.

Importing this module imports neither llama_cpp, onnxruntime, textual nor pynvml.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import zmq
import zmq.asyncio

from infernod.client.base import CurveKeys, UploadSteps, _Base, _Requests
from infernod.client.core import STOOD_STILL_S, ClientCore, Event, Notice, decode_event
from infernod.client.stream import AsyncStream, Stream
from infernod.paths import Endpoints
from infernod.protocol.arrays import decode_array, encode_array
from infernod.protocol.errors import DaemonUnavailable, InfernoError
from infernod.zmqio import FdWatch, plain_socket, resolve

__all__ = ["AsyncClient", "AsyncStream", "Client", "ClientCore", "CurveKeys",
           "DaemonUnavailable", "Event", "InfernoError", "Notice", "Stream", "decode_array",
           "encode_array"]


class Client(_Base, _Requests):
    """Synchronous client. ``timeout`` bounds every request (seconds); ``topics`` are
    subscribed to (read them with :meth:`events`); ``session`` reuses a session id, e.g.
    to reattach to its streams after a restart of this program (random by default)."""

    def __init__(self, endpoint: str | Endpoints | None = None, *, timeout: float = 10.0,
                 name: str = "inferno-client", curve: CurveKeys | None = None,
                 topics: tuple[str, ...] = (), rcvbuf_bytes: int = 0,
                 session: str | None = None) -> None:
        super().__init__(endpoint, timeout, name, curve, rcvbuf_bytes, session)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        try:
            self._setup(self.dealer, self.sub, topics)
        except Exception:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in (self.dealer, self.sub):
            if not s.closed:
                s.close(0)

    # -- plumbing ---------------------------------------------------------------------------
    def _pump(self, timeout_s: float) -> list[bytes] | None:
        """Wait up to timeout for anything; handle events; return control frames if any."""
        self.core.listened()
        socks = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        self.core.listened(waited_s=timeout_s)
        if self.sub in socks:
            for _ in range(1000):
                try:
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ev = decode_event(frames)
                if ev is not None:
                    self.core.on_event(ev)
        if self.dealer in socks:
            self.core.saw_life()  # any reply (see ClientCore.saw_life)
            return self.dealer.recv_multipart(zmq.NOBLOCK)
        return None

    def listen(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages and take them in: token events go to
        their streams, other events to :meth:`events`; stray replies are dropped."""
        self._pump(timeout)

    def event_batch(self, timeout: float) -> list[Event | Notice]:
        """What arrived on the subscribed topics, waiting up to ``timeout`` seconds when
        nothing has yet; :class:`Notice` s of the library among them. Raises
        DaemonUnavailable when the daemon went silent (three heartbeats)."""
        if not self.core.has_events:
            self._pump(timeout)
        events = self.core.take_events()
        if not events:
            self.core.check_alive()
        return events

    def events(self, timeout: float | None = None) -> Iterator[Event | Notice]:
        """The events of the subscribed topics (``topics=`` of the client) as they arrive,
        after the welcome, with the library's :class:`Notice` s among them: ``events_lost``
        (a gap in a topic's seq) and ``daemon_restarted``. Runs for ``timeout`` seconds, or
        until the caller stops when None; raises DaemonUnavailable when the daemon is lost.

            with Client(topics=("queue",)) as c:
                for ev in c.events():
                    if isinstance(ev, Event) and ev.type == "queue": ...
        """
        end = None if timeout is None else time.monotonic() + timeout
        if not self.core.welcomed:
            self.wait_welcome(timeout)
        while True:
            left = 0.2 if end is None else min(0.2, end - time.monotonic())
            if left <= 0:
                yield from self.core.take_events()
                return
            yield from self.event_batch(left)

    def send(self, type_: str, body: dict[str, Any] | None = None, *,
             deadline: float | None = None, idem: str | None = None,
             msg_id: str | None = None) -> str:
        msg_id, frames = self.core.request_frames(
            type_, body, deadline=deadline, idem=idem, msg_id=msg_id)
        end = time.monotonic() + min(self.timeout, 2.0)
        while True:
            try:
                self.dealer.send_multipart(frames, zmq.NOBLOCK)
                return msg_id
            except zmq.Again:  # IMMEDIATE: no connection yet
                if time.monotonic() > end:
                    raise DaemonUnavailable(
                        f"cannot connect to {self.endpoints.control}",
                        "is infernod running? ('inferno status' / 'systemctl status infernod')",
                    ) from None
                self._pump(0.02)

    def try_send(self, type_: str, body: dict[str, Any] | None = None) -> bool:
        """Send without waiting for a connection (fire-and-forget keep-alives)."""
        _, frames = self.core.request_frames(type_, body)
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def request(self, type_: str, body: dict[str, Any] | None = None, *,
                timeout: float | None = None, deadline: float | None = None,
                idem: str | None = None, msg_id: str | None = None) -> dict[str, Any]:
        self.core.listened()  # a pause before this request is not part of its time
        msg_id = self.send(type_, body, deadline=deadline, idem=idem, msg_id=msg_id)
        limit = timeout if timeout is not None else self.timeout
        wait = self.core.begin_wait(type_)
        end = wait.started + limit
        while True:
            # Time we stood still (stopped, suspended) is not the daemon's: it moves the end.
            left = end + (self.stood_still_s - wait.stood_still_s) - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable(f"no reply to '{type_}' within {limit:.1f}s",
                                        "the daemon may be hung or gone")
            frames = self._pump(min(left, 0.5))
            if frames is not None:
                reply = self.core.parse_reply(frames, msg_id)
                if reply is not None:
                    return reply
            self.core.check_wait(wait)  # a dead or stopped daemon: three heartbeats, not limit

    def _call(self, type_: str, body: dict[str, Any] | None = None,
              post: Callable[[dict[str, Any]], Any] | None = None, **kw: Any) -> Any:
        reply = self.request(type_, body, **kw)
        return post(reply) if post else reply

    def _drive(self, steps: UploadSteps) -> Any:
        """Runs a generator of requests (``upload_model``): each reply goes back in, each
        error is thrown in; ``rate_limited`` waits and sends the same step again."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = error = None
            while True:
                try:
                    reply = self.request(step.type, step.body, timeout=step.timeout)
                except InfernoError as e:
                    if e.code == "rate_limited" and not step.best_effort:
                        time.sleep(min(2.0, int(e.extra.get("retry_after_ms", 10)) / 1000))
                        continue
                    error = e
                except BaseException as e:  # KeyboardInterrupt: the steps abort the upload
                    error = e
                break

    def wait_welcome(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the daemon's welcome arrived: from then on no event is missed."""
        end = time.monotonic() + (timeout if timeout is not None else self.timeout)
        wait = self.core.begin_wait("welcome")
        while not self.welcomed:
            if time.monotonic() > end:
                raise DaemonUnavailable("no welcome from the daemon's event socket")
            self._pump(0.05)
            self.core.check_wait(wait)
        return self.welcome or {}

    def generate(self, model: str, prompt: str | None = None, *,
                 messages: list[dict[str, str]] | None = None, deadline: float | None = None,
                 **params: Any) -> Stream:
        """Start a generation and return its :class:`Stream` (iterate it for text)."""
        self.wait_welcome()
        body = self._gen_body(model, prompt, messages, params)
        msg_id = self.core.new_id()
        expected = self.core.expect_stream(msg_id)
        try:
            reply = self.request("generate", body, deadline=deadline,
                                 timeout=max(self.timeout, 60), msg_id=msg_id)
        except BaseException:
            self.core.unfollow(expected)
            raise
        return Stream(self, self.core.adopt_stream(expected, reply), reply)

    def job_items(self, job_id: str, *, offset: int = 0,
                  page: int | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a job from ``offset`` on, in index order, one ``jobs.get`` page
        (1000 items unless ``page``) per request, so a huge job never sits in memory."""
        next_offset: int | None = offset
        while next_offset is not None:
            job = self.jobs_get(job_id, offset=next_offset, limit=page)
            yield from job["items"]
            next_offset = job.get("next_offset")

    def attach(self, request_id: str) -> Stream:
        """Follow a stream started elsewhere (another client, or before a reconnect)."""
        self.core.follow(request_id)
        self.sub.setsockopt(zmq.SUBSCRIBE, f"tokens.{request_id}".encode())
        self.wait_welcome()
        stream = Stream(self, request_id, {"request_id": request_id})
        stream.backlog += stream.fetch_missing()
        return stream


class AsyncClient(_Base, _Requests):
    """asyncio client with the same API as :class:`Client` (methods are coroutines)."""

    def __init__(self, endpoint: str | Endpoints | None = None, *, timeout: float = 10.0,
                 name: str = "inferno-client", curve: CurveKeys | None = None,
                 topics: tuple[str, ...] = (), rcvbuf_bytes: int = 0,
                 session: str | None = None) -> None:
        super().__init__(endpoint, timeout, name, curve, rcvbuf_bytes, session)
        self.ctx = zmq.asyncio.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        # The events socket is a plain one, drained by a callback on its descriptor
        # (_drain_events): no poller, Future or task per token (infernod.zmqio).
        self.sub = plain_socket(self.ctx, zmq.SUB)
        self._waiters: dict[str, asyncio.Future[list[bytes]]] = {}
        self._event_waiters: list[asyncio.Future[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._watch: FdWatch | None = None  # the sub's descriptor on the running loop
        try:
            self._setup(self.dealer, self.sub, topics)
        except Exception:
            self.close()
            raise

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.close()
        waiters, self._waiters = getattr(self, "_waiters", {}), {}
        for fut in waiters.values():  # a request still waiting ends now, not at its timeout
            if not fut.done():
                fut.set_exception(DaemonUnavailable("the client was closed",
                                                    "open a new client"))
        for s in (self.dealer, self.sub):
            if not s.closed:
                s.close(0)

    @property
    def _reader_task(self) -> asyncio.Task[None] | None:
        return getattr(self, "_reader", None)

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.loop is not loop:
            if self._watch is not None:
                self._watch.close()  # an earlier loop's (asyncio.run twice): gone or unused
            self._watch = FdWatch(self.sub, self._drain_events, tick_s=STOOD_STILL_S,
                                  on_tick=self._on_tick)
        if self._reader is None or self._reader.done() or self._reader.get_loop() is not loop:
            self._reader = loop.create_task(self._read())

    def _on_tick(self) -> None:
        """Every STOOD_STILL_S: a timer that fires late means the loop (or the process)
        stood still, which is not the daemon's silence (ClientCore.listened); then a
        drain, in case the events socket's descriptor missed an edge (infernod.zmqio)."""
        self.core.listened(waited_s=STOOD_STILL_S)
        self._drain_events()

    def _drain_events(self) -> None:
        """Every event waiting on the events socket, up to 1000 a turn (the rest on the
        next turn, after the loop's other work)."""
        if self._watch is not None and self._watch.drain(self._on_event_frames, 1000):
            self._wake_events()

    def _on_event_frames(self, frames: list[bytes]) -> None:
        try:
            ev = decode_event(frames)
        except InfernoError:
            return
        if ev is not None:
            self.core.on_event(ev)

    async def _read(self) -> None:
        """The replies on the control socket (one per request: pyzmq's own future)."""
        dealer, core = self.dealer, self.core
        while True:
            frames = await dealer.recv_multipart()
            core.saw_life()  # any reply (see ClientCore.saw_life)
            re_ = ClientCore.reply_to(frames)
            fut = self._waiters.pop(re_, None) if re_ is not None else None
            if fut is not None and not fut.done():
                fut.set_result(frames)

    def _wake_events(self) -> None:
        waiters, self._event_waiters = self._event_waiters, []
        for fut in waiters:
            resolve(fut, None)

    async def next_event_batch(self, timeout: float) -> None:
        """Wait until new events arrived (or timeout). A timer resolves the same future
        the reader does: no ``wait_for`` wrapper, whose extra future and callback cost a
        loop turn on every token of every stream."""
        self._ensure_reader()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._event_waiters.append(fut)
        timer = loop.call_later(timeout, resolve, fut, None)
        try:
            await fut
        finally:
            timer.cancel()

    async def event_batch(self, timeout: float) -> list[Event | Notice]:
        """As :meth:`Client.event_batch`."""
        if not self.core.has_events:
            await self.next_event_batch(timeout)
        events = self.core.take_events()
        if not events:
            self.core.check_alive()
        return events

    async def events(self, timeout: float | None = None) -> AsyncIterator[Event | Notice]:
        """As :meth:`Client.events`: ``async for ev in client.events(): ...``."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self.core.welcomed:
            await self.wait_welcome(timeout)
        while True:
            left = 0.2 if end is None else min(0.2, end - time.monotonic())
            if left <= 0:
                for ev in self.core.take_events():
                    yield ev
                return
            for ev in await self.event_batch(left):
                yield ev

    @property
    def waiting(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._waiters)

    async def send(self, type_: str, body: dict[str, Any] | None = None, *,
                   deadline: float | None = None, idem: str | None = None,
                   msg_id: str | None = None) -> tuple[str, asyncio.Future[list[bytes]]]:
        self._ensure_reader()
        msg_id, frames = self.core.request_frames(
            type_, body, deadline=deadline, idem=idem, msg_id=msg_id)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        end = time.monotonic() + min(self.timeout, 2.0)
        while True:
            try:
                await self.dealer.send_multipart(frames, zmq.NOBLOCK)
                return msg_id, fut
            except zmq.Again:
                if time.monotonic() > end:
                    self._waiters.pop(msg_id, None)
                    raise DaemonUnavailable(f"cannot connect to {self.endpoints.control}",
                                            "is infernod running?") from None
                await asyncio.sleep(0.02)

    async def try_send(self, type_: str, body: dict[str, Any] | None = None) -> bool:
        _, frames = self.core.request_frames(type_, body)
        try:
            await self.dealer.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    async def request(self, type_: str, body: dict[str, Any] | None = None, *,
                      timeout: float | None = None, deadline: float | None = None,
                      idem: str | None = None, msg_id: str | None = None) -> dict[str, Any]:
        msg_id, fut = await self.send(type_, body, deadline=deadline, idem=idem,
                                      msg_id=msg_id)
        limit = timeout if timeout is not None else self.timeout
        wait = self.core.begin_wait(type_)
        end = wait.started + limit
        late = False
        try:
            while True:
                # Time we stood still is not the daemon's: it moves the end (the loop's
                # tick measures it, see _on_tick).
                left = end + (self.stood_still_s - wait.stood_still_s) - time.monotonic()
                if left <= 0 and not late:
                    raise DaemonUnavailable(f"no reply to '{type_}' within {limit:.1f}s",
                                            "the daemon may be hung or gone")
                step = min(max(left, 0.05), 0.5)
                due = time.monotonic() + step
                try:
                    frames = await asyncio.wait_for(asyncio.shield(fut), step)
                    break
                except TimeoutError:
                    # A timer that fires late means the loop (or the process) stood still;
                    # the reply may be waiting unread, and the reader has not yet counted
                    # the pause: one more short wait lets it run before anything is judged.
                    late = time.monotonic() - due > STOOD_STILL_S
                    if not late:
                        self.core.check_wait(wait)  # dead or stopped: three heartbeats, not limit
        finally:
            self._waiters.pop(msg_id, None)
            fut.cancel()
        reply = self.core.parse_reply(frames, msg_id)
        assert reply is not None
        return reply

    def _call(self, type_: str, body: dict[str, Any] | None = None,
              post: Callable[[dict[str, Any]], Any] | None = None, **kw: Any) -> Any:
        async def call() -> Any:
            reply = await self.request(type_, body, **kw)
            return post(reply) if post else reply
        return call()

    async def _drive(self, steps: UploadSteps) -> Any:
        """As :meth:`Client._drive`, awaiting each request (the file is read inline, one
        chunk at a time)."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = error = None
            while True:
                try:
                    reply = await self.request(step.type, step.body, timeout=step.timeout)
                except InfernoError as e:
                    if e.code == "rate_limited" and not step.best_effort:
                        await asyncio.sleep(
                            min(2.0, int(e.extra.get("retry_after_ms", 10)) / 1000))
                        continue
                    error = e
                except BaseException as e:  # CancelledError: the steps abort the upload
                    error = e
                break

    async def wait_welcome(self, timeout: float | None = None) -> dict[str, Any]:
        end = time.monotonic() + (timeout if timeout is not None else self.timeout)
        wait = self.core.begin_wait("welcome")
        while not self.welcomed:
            left = end - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable("no welcome from the daemon's event socket")
            await self.next_event_batch(min(left, 0.2))
            self.core.check_wait(wait)
        return self.welcome or {}

    async def generate(self, model: str, prompt: str | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       deadline: float | None = None, **params: Any) -> AsyncStream:
        await self.wait_welcome()
        body = self._gen_body(model, prompt, messages, params)
        msg_id = self.core.new_id()
        expected = self.core.expect_stream(msg_id)
        try:
            reply = await self.request("generate", body, deadline=deadline,
                                       timeout=max(self.timeout, 60), msg_id=msg_id)
        except BaseException:
            self.core.unfollow(expected)
            raise
        return AsyncStream(self, self.core.adopt_stream(expected, reply), reply)

    async def job_items(self, job_id: str, *, offset: int = 0,
                        page: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """As :meth:`Client.job_items`: ``async for item in client.job_items(job_id)``."""
        next_offset: int | None = offset
        while next_offset is not None:
            job = await self.jobs_get(job_id, offset=next_offset, limit=page)
            for item in job["items"]:
                yield item
            next_offset = job.get("next_offset")

    async def attach(self, request_id: str) -> AsyncStream:
        """As :meth:`Client.attach`."""
        self.core.follow(request_id)
        self.sub.setsockopt(zmq.SUBSCRIBE, f"tokens.{request_id}".encode())
        if self._watch is not None:
            self._watch.kick()  # the subscription may have taken in the descriptor's edge
        await self.wait_welcome()
        stream = AsyncStream(self, request_id, {"request_id": request_id})
        stream.backlog += await stream.fetch_missing()
        return stream


"""Every request from admission to its last event, whatever its kind, on the event loop.

    submit -> Scheduler.submit (queued) -> its model loaded -> dispatch: a free slot
           -> its model's runner: a text engine's ``submit`` (generate, job item)
              or an ONNX ``run`` (embed, infer; waiting embeds share one run)
           -> the engine's events, or the run's result -> done | error

The kinds share all of it: admission, the scheduler's slots (a model's slot count is how
many requests it runs at once: a GGUF model's ``models.slots``, an ONNX model's one run),
cancel, timeouts, what a model's unload or crash does to its requests, the final stats,
the profile hooks and the ``queue`` topic. They differ in the runner call
(``_start_text`` / ``_start_onnx``) and in how the end reaches the client: a stream on
``tokens.<request_id>`` (queued* -> start -> token* -> done | error) for the generating
kinds, the reply of the handler awaiting ``Request.future`` for embed/infer.

Runners live in their own processes (infernod/runner); their proxies call this service on
the event loop (the ``EngineSink`` methods, a run's ``on_done``), so every request record is
touched by one thread only. A runner that dies ends its model's running requests with
``runner_crashed`` (never retried here: a job's item is retried by jobs.py) and the model is
loaded again for its queued ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from infernod.backends.grammar import request_grammar
from infernod.backends.onnx_engine import OnnxRunEngine
from infernod.daemon import onnx
from infernod.daemon.generation import engine_request, params
from infernod.daemon.onnx import RunEngine
from infernod.daemon.requests import ProfileHook, Request, RequestTable, RunStartHook, State
from infernod.daemon.scheduler import QueueItem, Scheduler
from infernod.protocol.errors import InfernoError
from infernod.telemetry.rate import RateWindow

if TYPE_CHECKING:
    from infernod.backends.base import GenerationEngine
    from infernod.config import Config
    from infernod.daemon.models import LoadedModel, ModelManager, UnloadCause
    from infernod.daemon.publisher import Publisher

log = logging.getLogger("infernod.daemon.lifecycle")


class RequestService:
    """The request lifecycle of every kind. The models' runners report here: it is the
    ``ModelUser`` ModelManager is given (the GGUF engines' sink, unloads, crashes)."""

    def __init__(self, cfg: Config, models: ModelManager, scheduler: Scheduler,
                 publisher: Publisher, requests: RequestTable, *,
                 on_profile: ProfileHook | None = None,
                 on_run_start: RunStartHook | None = None) -> None:
        self.cfg = cfg
        self.models = models
        self.scheduler = scheduler
        self.publisher = publisher
        self.requests = requests  # every live request, every kind
        self.on_profile = on_profile
        self.on_run_start = on_run_start
        self.accepting = True
        self.runs: dict[str, tuple[int, list[Request]]] = {}  # request id -> its ONNX run
        self.batches = 0  # ONNX runs started (a batch of embeds counts once)
        self.throughput = RateWindow()  # tokens generated, all requests: status' tok/s now
        models.attach(self)

    # -- admission --------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req`` (any kind) or raise at once; its model is loaded in the background."""
        if not self.accepting:
            raise InfernoError("shutting_down", "the daemon is stopping and admits no new work")
        if req.kind.generates:
            self.models.check_generate(req.model)  # not_supported for ONNX models
            request_grammar(self._params(req))  # bad_schema now, before anything is queued
        if req.request_id in self.requests:
            raise InfernoError("conflict", f"request id {req.request_id} is already in use",
                               "use a fresh message id per request")
        if req.topic:  # first: it refuses a session that belongs to another principal
            self.publisher.open_stream(req.request_id, req.principal, req.connection)
        try:
            self.scheduler.submit(self._item(req), time.monotonic())
        except BaseException:
            if req.topic:
                self.publisher.close_stream(req.request_id)
            raise
        self.requests.add(req)
        asyncio.get_running_loop().create_task(self._admit(req))
        if req.future is not None:
            self.publish_queue()

    async def call(self, req: Request) -> dict[str, Any]:
        """``submit`` a request/reply kind (embed, infer) and wait for its reply, within its
        timeout or deadline (admission errors raise at once)."""
        future = req.future
        assert future is not None, "embed/infer requests carry the handler's future"
        self.submit(req)
        limit, code = req.timeout_s, "timeout"
        if req.deadline is not None and req.deadline - time.monotonic() < limit:
            limit, code = max(0.0, req.deadline - time.monotonic()), "deadline_exceeded"
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            what = "deadline passed" if code == "deadline_exceeded" else \
                f"{req.op} ran past its {req.timeout_s:.0f}s limit"
            self._abandon(req, code, f"{what} ({req.state})")
            return await future  # raises the error just set
        except asyncio.CancelledError:  # the handler task died (daemon stopping)
            self._abandon(req, "aborted", "request abandoned")
            raise

    def _params(self, gen: Request) -> dict[str, Any]:
        return params(gen, self.models.settings.request_defaults(gen.model))

    def _item(self, req: Request) -> QueueItem:
        est = (self._params(req).get("max_tokens") or 256) if req.kind.generates else 0
        return QueueItem(request_id=req.request_id, client=req.client or req.session,
                         model=req.model, priority=req.priority, submitted_at=req.submitted,
                         deadline=req.deadline, est_tokens=est, payload=req,
                         owner="" if req.job is not None else req.principal)

    async def _admit(self, req: Request) -> None:
        try:
            req.load_wait_s = await self.models.load_for_request(
                req.model, req.body.get("keep_alive"), lambda: req.state is State.QUEUED)
        except InfernoError as e:
            if req.state is State.QUEUED:
                self.scheduler.cancel(req.request_id)
                self._fail_with(req, e)
            return
        self._loaded(req.model)

    def _loaded(self, model: str) -> None:
        lm = self.models.loaded.get(model)
        if lm is not None and lm.engine is not None:
            self.scheduler.set_slots(model, lm.engine.n_slots)
        self.dispatch(model)

    # -- dispatch: the one place the kinds part ---------------------------------------------
    def dispatch(self, model: str) -> None:
        """Fill the free slots of ``model`` (the scheduler's count: a request being preempted
        gives its slot up at once, since the engine applies commands in order)."""
        lm = self.models.loaded.get(model)
        if lm is None or lm.state != "loaded" or lm.engine is None:
            return
        free = self.scheduler.free_slots(model)
        if free <= 0:
            return
        if isinstance(lm.engine, OnnxRunEngine):
            self._start_onnx(lm, lm.engine, free)
        else:
            self._start_text(lm, lm.engine, free)
        self.publish_queue()

    def _live(self, item: QueueItem) -> Request | None:
        """The queued record a pick names, or None (stale: it holds no slot any more)."""
        req = item.payload
        if not isinstance(req, Request) or self.requests.get(item.request_id) is not req \
                or req.state is not State.QUEUED:
            self.scheduler.finish(item.request_id)
            return None
        return req

    def _start_text(self, lm: LoadedModel, engine: GenerationEngine, free: int) -> None:
        """Generations go to the text engine one by one; embeds picked for this GGUF model
        (each holding a slot) go to its runner as one run."""
        now = time.monotonic()
        embeds: list[Request] = []
        for item in self.scheduler.pop_ready(lm.name, free, now):
            req = self._live(item)
            if req is None:
                continue
            if not req.kind.generates:
                embeds.append(req)
                continue
            req.move(State.RUNNING, now)
            lm.last_used = now
            engine.submit(engine_request(req, self._params(req)))
        if not embeds:
            return
        if isinstance(engine, RunEngine):
            self._run(lm, engine, embeds, now)
            return
        for req in embeds:
            self.scheduler.finish(req.request_id)
            self._fail(req, "not_supported", f"{lm.name} cannot embed", onnx.EMBED_HINT)

    def _start_onnx(self, lm: LoadedModel, engine: OnnxRunEngine, free: int) -> None:
        for _ in range(free):
            now = time.monotonic()
            batch = onnx.pick_batch(self.scheduler, lm.name, now, self.cfg.onnx.max_batch,
                                    self._live)
            if not batch:
                return
            self._run(lm, engine, batch, now)

    def _run(self, lm: LoadedModel, engine: RunEngine, batch: list[Request],
             now: float) -> None:
        """``batch`` (embeds, or one infer) as one run of ``engine``; ``_run_done``
        answers them."""
        loop = asyncio.get_running_loop()
        for req in batch:
            req.move(State.RUNNING, now)
            if self.on_run_start is not None:
                self.on_run_start(req)
        lm.last_used = now
        self.batches += 1

        def done(result: Any, error: BaseException | None) -> None:  # loop, or a thread
            loop.call_soon_threadsafe(self._run_done, lm.name, batch, now, result, error)

        run_id = engine.run(batch[0].op, onnx.run_args(batch), done)
        for req in batch:
            self.runs[req.request_id] = (run_id, batch)

    # -- a runner's events (on the loop) ----------------------------------------------------
    def _mine(self, request_id: str) -> Request | None:
        """The live generating request ``request_id`` (a text engine's event names one)."""
        r = self.requests.get(request_id)
        return r if r is not None and r.kind.generates else None

    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        gen = self._mine(request_id)
        if gen is None:
            return
        gen.last_event_at = time.monotonic()
        gen.slot, gen.cached_tokens = _int_or_none(info.get("slot")), _int_or_none(
            info.get("cached_tokens"))  # the queue rows' slot view
        self.publisher.publish(gen.topic, "start", {"request_id": request_id, **info})
        if self.on_run_start is not None:
            self.on_run_start(gen)
        if gen.on_start is not None:
            gen.on_start(gen)

    def on_tokens(self, request_id: str, text: str, n_tokens: int,
                  logprobs: list[dict[str, Any]] | None = None) -> None:
        gen = self._mine(request_id)
        if gen is None or gen.state is not State.RUNNING:
            return
        now = time.monotonic()
        if gen.first_token_at is None:
            gen.first_token_at = now
        gen.last_event_at = now
        gen.n_tokens += n_tokens
        self.throughput.add(n_tokens, now)
        if gen.text is not None:
            gen.text.append(text)
        body: dict[str, Any] = {"text": text, "n": n_tokens}
        if logprobs is not None:
            body["logprobs"] = logprobs
        self.publisher.publish(gen.topic, "token", body)

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        gen = self._mine(request_id)
        if gen is None:
            return
        self._release(gen)
        if reason == "preempted" and gen.abort is None:
            gen.resume_tokens = list(stats.get("generated_tokens") or [])
            gen.move(State.QUEUED, time.monotonic())
            self.scheduler.requeue(self._item(gen), time.monotonic())
            self.publisher.publish(gen.topic, "preempted", {"tokens_so_far": gen.n_tokens})
            self.dispatch(gen.model)  # the slot it freed goes to whoever the policy picks
            return
        if reason == "preempted":  # cancelled while being preempted
            reason = "cancelled"
        if gen.resume_tokens and "completion_tokens" in stats:  # count the whole answer
            stats = {**stats, "completion_tokens": len(gen.resume_tokens)
                     + stats["completion_tokens"]}
        if reason in ("length", "stop", "eos") and gen.admitted_at and not gen.resume_tokens:
            tokens = stats.get("completion_tokens", gen.n_tokens)
            self.scheduler.record_service(gen.model, time.monotonic() - gen.admitted_at, tokens)
        if gen.abort is not None and gen.abort[0] != "cancelled":
            code, message = gen.abort
            self._fail(gen, code, message, None, stats=stats)
        else:
            self._done(gen, reason, stats)
        self.dispatch(gen.model)

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        gen = self._mine(request_id)
        if gen is None:
            return
        self._release(gen)
        self._fail(gen, code, message, hint)
        self.dispatch(gen.model)

    def _run_done(self, model: str, batch: list[Request], started: float, result: Any,
                  error: BaseException | None) -> None:
        """An ONNX run ended: answer its requests and fill the slot it held."""
        now = time.monotonic()
        for req in batch:
            self.scheduler.finish(req.request_id)
            self.runs.pop(req.request_id, None)
        lm = self.models.loaded.get(model)
        if lm is not None:
            lm.last_used = now
        if error is None:
            self.scheduler.record_service(model, now - started)
        engine = lm.engine if lm is not None else None
        provider = engine.provider if isinstance(engine, OnnxRunEngine) else \
            "llama.cpp" if engine is not None else None
        for i, req in enumerate(batch):
            if req.state is State.DONE:  # timed out or aborted meanwhile: its caller is gone
                continue
            if isinstance(error, InfernoError):
                self._fail_with(req, error)
            elif error is not None:
                log.error("onnx %s on %s failed: %r", req.op, model, error)
                self._fail(req, "internal", f"{req.op} on {model} failed: {error}", None)
            else:
                reply = onnx.reply(req, i, batch, result, provider)
                self._done(req, "done", reply.pop("stats"), reply)
        self.dispatch(model)

    def _release(self, req: Request) -> None:
        self.scheduler.finish(req.request_id)
        lm = self.models.loaded.get(req.model)
        if lm is not None:
            lm.last_used = time.monotonic()

    # -- endings: written once for every kind -----------------------------------------------
    def _final_stats(self, req: Request, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        out = dict(stats)
        out.pop("generated_tokens", None)
        gaps = out.pop("itl_gaps_ms", None)  # for the profile only, not the done event
        if gaps is not None:
            req.itl_gaps_ms = list(gaps)
        out.update(
            finish_reason=reason, model=req.model, priority=req.priority,
            queue_wait_ms=round(((req.admitted_at or now) - req.submitted) * 1000, 3),
            load_wait_ms=round(req.load_wait_s * 1000, 3),
            total_ms=round((now - req.submitted) * 1000, 3),
            completion_tokens=out.get("completion_tokens", req.n_tokens),
        )
        if not req.kind.generates:  # one profiler reads every kind
            out.update(op=req.op, prompt_tokens=out.get("prompt_tokens", 0))
        return out

    def _done(self, req: Request, reason: str, stats: dict[str, Any],
              reply: dict[str, Any] | None = None) -> None:
        if req.state is State.DONE:
            return
        final = self._final_stats(req, reason, stats)
        req.move(State.DONE, time.monotonic())
        if req.topic:
            self.publisher.publish(req.topic, "done", final)
        self._finish(req, reason, final)
        if req.future is not None and not req.future.done():
            if reply is None:  # a request/reply kind ended without a result: cancelled
                req.future.set_exception(InfernoError(reason, f"{req.op} {reason}"))
                req.future.exception()
            else:
                req.future.set_result({**reply, "stats": final})

    def _fail(self, req: Request, code: str, message: str, hint: str | None,
              stats: dict[str, Any] | None = None) -> None:
        self._fail_with(req, InfernoError(code, message, hint), stats)

    def _fail_with(self, req: Request, err: InfernoError,
                   stats: dict[str, Any] | None = None) -> None:
        """End ``req`` with ``err`` (its extra fields too: need_bytes, retry_after_ms...)."""
        if req.state is State.DONE:
            return
        final = self._final_stats(req, err.code, stats or {})
        req.move(State.DONE, time.monotonic())
        if req.topic:
            self.publisher.publish(req.topic, "error", {**err.to_wire(), "stats": final})
        self._finish(req, err.code, final)
        if req.future is not None and not req.future.done():
            req.future.set_exception(err)
            req.future.exception()  # retrieved: nobody may be waiting any more

    def _finish(self, req: Request, reason: str, final: dict[str, Any]) -> None:
        self.requests.pop(req.request_id)
        if req.hold is not None:
            req.hold.release()
            req.hold = None
        if req.topic:
            self.publisher.close_stream(req.request_id)
        if self.on_profile is not None:
            try:
                self.on_profile(req, reason, final)
            except Exception:  # a profiling bug must not lose the request's end
                log.exception("profile hook failed for %s", req.request_id)
        if req.on_done is not None:
            req.on_done(req, reason, final)
        self.publish_queue()

    def _abandon(self, req: Request, code: str, message: str) -> None:
        """End a request/reply kind now with ``code``. A waiting one leaves the scheduler; a
        running one's result will be dropped, and its run is stopped once no request of its
        batch still wants it, so the runner is free for the next run early."""
        state = req.state
        if state is State.QUEUED:
            self.scheduler.cancel(req.request_id)
        self._fail(req, code, message, None)
        run = self.runs.get(req.request_id)
        if state is not State.RUNNING or run is None:
            return
        run_id, batch = run
        if all(r.state is State.DONE for r in batch):
            lm = self.models.loaded.get(req.model)
            if lm is not None and isinstance(lm.engine, OnnxRunEngine):
                lm.engine.terminate(run_id)

    # -- control ----------------------------------------------------------------------------
    def cancel(self, request_id: str, code: str = "cancelled",
               message: str = "cancelled by request") -> str:
        """End a queued request, or stop a running one: its new state (``cancelled``;
        ``cancelling`` for a generation, which ends when its engine says so)."""
        req = self.requests.get(request_id)
        if req is None or req.state is State.DONE:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        if not req.kind.generates:
            self._abandon(req, code, message)
            return "cancelled"
        lm = self.models.loaded.get(req.model)
        engine = lm.text_engine if lm is not None else None
        if req.state is State.QUEUED:
            self.scheduler.cancel(request_id)
            if req.resume_tokens and engine is not None:
                engine.cancel(request_id)  # a preempted request: free its parked KV cells
            if code == "cancelled":  # the caller asked for it: a normal end, not an error
                self._done(req, "cancelled", {})
            else:
                self._fail(req, code, message, None)
            return "cancelled"
        req.abort = (code, message)
        self.scheduler.mark(request_id, stopping=True)
        if engine is not None:
            engine.cancel(request_id)
        return "cancelling"

    def expired(self, req: Request) -> None:
        """The scheduler dropped queued ``req``: its deadline passed (the core's tick)."""
        if req.state is State.QUEUED:
            self._fail(req, "deadline_exceeded", "the deadline passed while the request was "
                       "queued", None)

    def tick(self, now: float) -> None:
        """Timeouts and stalls of running generations (embed/infer: ``call``'s own timer)."""
        for gen in self.requests.values(generates=True):
            if gen.state is not State.RUNNING or gen.abort is not None:
                continue
            if now - (gen.admitted_at or now) > gen.timeout_s:
                self.cancel(gen.request_id, "timeout",
                            f"inference ran past its {gen.timeout_s:.0f}s limit")
            elif gen.last_event_at is not None and now - gen.last_event_at > gen.stall_timeout_s:
                self.cancel(gen.request_id, "timeout",
                            f"no token for {gen.stall_timeout_s:.0f}s (stall timeout)")
            elif gen.deadline is not None and now > gen.deadline:
                self.cancel(gen.request_id, "deadline_exceeded",
                            "the deadline passed during generation")

    def fail_queued(self) -> None:
        """The daemon stops: no new work, and what waits is ended (a job's item is kept in
        the job store and runs after the restart)."""
        self.accepting = False
        for req in self.requests.values():
            if req.state is State.QUEUED:
                self.scheduler.cancel(req.request_id)
                what = ("job item checkpointed, it runs after the restart" if req.job
                        else "this request was still queued and is not kept")
                self._fail(req, "aborted", f"daemon stopping: {what}",
                           "resubmit when the daemon is back (jobs are kept)")

    def abort_all(self, code: str, message: str) -> None:
        for req in self.requests.values():
            if req.state is State.QUEUED:
                self.scheduler.cancel(req.request_id)
                self._fail(req, code, message, None)
            elif req.state is State.RUNNING:
                self.cancel(req.request_id, code, message)

    # -- what happens to a model (ModelManager tells) ---------------------------------------
    def model_unloaded(self, model: str, cause: UnloadCause) -> None:
        """Its running requests end (``aborted``). Its queued ones fail with
        ``model_unloaded`` if an operator unloaded it; after an eviction or a keep-alive
        expiry they load it again."""
        for req in self._of(model, State.RUNNING):
            self.scheduler.finish(req.request_id)
            self._fail(req, "aborted", f"model {model} was unloaded", None)
        queued = self._of(model, State.QUEUED)
        if cause == "operator":
            for req in queued:
                self.scheduler.cancel(req.request_id)
                self._fail(req, "model_unloaded", f"model {model} was unloaded by an "
                           "operator while this request waited for it", None)
        elif queued and cause != "stopping":
            asyncio.get_running_loop().create_task(self._reload(model))

    def model_failed(self, model: str, message: str, hint: str) -> None:
        """``model``'s runner died: its running requests end with runner_crashed; its queued
        ones stay queued while the model loads again (the crash-loop guard decides when)."""
        for req in self._of(model, State.RUNNING):
            self.scheduler.finish(req.request_id)
            self._fail(req, "runner_crashed", message, hint)
        if self._of(model, State.QUEUED):
            asyncio.get_running_loop().create_task(self._reload(model))

    async def _reload(self, model: str) -> None:
        try:
            await self.models.load_for_request(model, None,
                                               lambda: bool(self._of(model, State.QUEUED)))
        except InfernoError as e:
            for req in self._of(model, State.QUEUED):
                self.scheduler.cancel(req.request_id)
                self._fail_with(req, e)
            return
        self._loaded(model)

    def _of(self, model: str, state: State) -> list[Request]:
        return [r for r in self.requests.values() if r.model == model and r.state is state]

    def publish_queue(self) -> None:
        self.requests.publish_queue()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

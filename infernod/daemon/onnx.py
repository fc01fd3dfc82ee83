"""ONNX requests (``embed``, ``infer``) from admission to the reply, under the one scheduler.

    handler -> OnnxService.run(job) -> Scheduler.submit -> ensure_loaded -> dispatch
            -> the model's runner process (OnnxEngine's worker thread owns the session)
            -> loop: reply future resolved

Embed and infer are request/reply, not streams: the handler awaits the job's future. They
queue in the same :class:`~infernod.daemon.scheduler.Scheduler` as generation, so priorities, aging,
deadlines and backpressure (``overloaded``, ``would_miss_deadline``) are the same. Each loaded
ONNX model runs in a runner process of its own, like a GGUF model (``runner.supervisor.
OnnxRunnerEngine`` is its proxy here), one run at a time; the daemon never runs onnxruntime.
A runner that dies ends its run's requests with ``runner_crashed``; queued ones wait for the
reload (ModelManager's crash-loop guard decides when). When several ``embed`` requests for a
model wait, the next run takes them together (in the scheduler's pick order, up to
``onnx.max_batch`` texts), so a burst of small requests costs one forward pass per batch.

Everything here runs on the event loop; a run's result comes back through
``call_soon_threadsafe`` (from the proxy on the loop, or a worker thread in tests). Final
stats have generation's shape (``queue_wait_ms``, ``load_wait_ms``, ``total_ms``,
``finish_reason``, ...) and go to the same ``on_profile`` /
``on_run_start`` hooks: a job is a :class:`~infernod.daemon.requests.Request` too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from infernod.backends.onnx_engine import OnnxRunEngine, RunDone
from infernod.daemon.requests import (
    Kind,
    ProfileHook,
    Request,
    RequestTable,
    RunStartHook,
    State,
)
from infernod.daemon.scheduler import QueueItem
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo
    from infernod.config import Config
    from infernod.daemon.generation import GenerationService
    from infernod.daemon.models import LoadedModel, ModelManager, UnloadCause
    from infernod.daemon.scheduler import Scheduler
    from infernod.daemon.server import Call

log = logging.getLogger("infernod.onnx")

EMBED_HINT = ("embed needs an ONNX embedding model (a directory with model.onnx and "
              "tokenizer.json); 'inferno models convert-onnx' exports all-MiniLM-L6-v2")


@runtime_checkable
class RunEngine(Protocol):
    """What a run needs of an engine: an ONNX model's (:class:`OnnxRunEngine`), or a GGUF
    model's runner proxy, whose runs are embeds in the model's embedding context."""

    def run(self, op: str, args: dict[str, Any], on_done: RunDone) -> int: ...


# --------------------------------------------------------------------------------------------
# the loop side


class OnnxService:
    """Owned by the event-loop thread, like the GenerationService beside it."""

    def __init__(self, cfg: Config, models: ModelManager, scheduler: Scheduler,
                 requests: RequestTable, *, on_profile: ProfileHook | None = None,
                 on_run_start: RunStartHook | None = None,
                 text: GenerationService | None = None) -> None:
        self.cfg = cfg
        # GGUF models embed too (in their runner's embedding context): their embeds queue
        # with their generations and ``text`` dispatches both, handing embeds back here
        self.text = text
        if text is not None:
            text.embed_runner = self._run_on_text_model
        self.models = models
        self.scheduler = scheduler
        self.requests = requests  # every kind's records; this service adds its own
        self.on_profile = on_profile
        self.on_run_start = on_run_start
        self.runs: dict[str, tuple[int, list[Request]]] = {}  # model -> (run id, its batch)
        self.accepting = True
        self.batches = 0  # runs started (a batch of embeds counts once)
        models.on_unloaded.append(self._model_unloaded)
        models.on_failed.append(self._model_failed)

    # -- requests ---------------------------------------------------------------------------
    async def handle(self, op: str, req: Call, info: ModelInfo) -> dict[str, Any]:
        """The body of the ``embed`` / ``infer`` handlers, for a model the registry knows."""
        b = req.body
        onnx = info.onnx
        if op == "embed" and info.kind == "gguf" and self.text is not None:
            pass  # llama.cpp's embeddings: see _run_on_text_model
        elif info.kind != "onnx" or onnx is None:
            hint = EMBED_HINT if op == "embed" else "use 'generate' for GGUF language models"
            raise InfernoError("not_supported", f"{info.name} is a {info.kind} model; {op} "
                               "runs ONNX models", hint)
        elif op == "embed" and onnx.get("kind") != "embedding":
            raise InfernoError("not_supported", f"{info.name} is a generic ONNX model (inputs "
                               f"{', '.join(i['name'] for i in onnx['inputs'])}), not a text "
                               "encoder with a tokenizer", "use 'infer' with named arrays")
        s = self.cfg.scheduler
        now = time.monotonic()
        deadline = req.header.get("deadline")
        deadline_mono = None if deadline is None else now + (deadline - time.time())
        if deadline_mono is not None and deadline_mono <= now:
            raise InfernoError("deadline_exceeded", "the deadline had already passed on arrival")
        # the same request id as generate's, so `cancel` can name a pending embed/infer
        job = Request(kind=Kind(op), request_id=f"{req.session}.{req.header['id']}",
                      session=req.session, principal=req.principal,
                      connection=req.connection, model=info.name, body=b,
                      priority=b.get("priority") or "normal", submitted=now,
                      deadline=deadline_mono,
                      timeout_s=min(b.get("timeout_s") or s.timeout_s, s.max_timeout_s),
                      future=asyncio.get_running_loop().create_future())
        return await self.run(job)

    async def run(self, job: Request) -> dict[str, Any]:
        """Queue ``job`` and wait for its reply (admission errors raise at once)."""
        if not self.accepting:
            raise InfernoError("shutting_down", "the daemon is stopping and admits no new work")
        if job.request_id in self.requests:
            raise InfernoError("conflict", f"request id {job.request_id} is already in use",
                               "use a fresh message id per request")
        self.scheduler.submit(self._item(job), time.monotonic())
        self.requests.add(job)
        asyncio.get_running_loop().create_task(self._admit(job))
        self._queue_changed()
        limit, code = job.timeout_s, "timeout"
        if job.deadline is not None and job.deadline - time.monotonic() < limit:
            limit, code = max(0.0, job.deadline - time.monotonic()), "deadline_exceeded"
        future = job.future
        assert future is not None  # handle() gives every embed/infer one
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            what = "deadline passed" if code == "deadline_exceeded" else \
                f"{job.op} ran past its {job.timeout_s:.0f}s limit"
            self._abandon(job, code, f"{what} ({job.state})")
            return await future  # raises the error just set
        except asyncio.CancelledError:  # the handler task died (daemon stopping)
            self._abandon(job, "aborted", "request abandoned")
            raise

    @staticmethod
    def _item(job: Request) -> QueueItem:
        return QueueItem(request_id=job.request_id, client=job.client or job.session,
                         model=job.model, priority=job.priority, submitted_at=job.submitted,
                         deadline=job.deadline, est_tokens=0, payload=job,
                         owner=job.principal)

    async def _admit(self, job: Request) -> None:
        try:
            job.load_wait_s = await self.models.load_for_request(job.model,
                                                                 job.body.get("keep_alive"))
        except InfernoError as e:
            self.scheduler.cancel(job.request_id)
            self._fail(job, e.code, e.message, e.hint)
            return
        self._dispatch_any(job.model)

    def _dispatch_any(self, model: str) -> None:
        """Start what waits for ``model``: an ONNX model's next run here, a GGUF model's
        requests (generations and embeds) through GenerationService."""
        lm = self.models.loaded.get(model)
        text = lm.text_engine if lm is not None else None
        if text is not None and self.text is not None:
            self.scheduler.set_slots(model, text.n_slots)
            self.text.dispatch(model)
            return
        self.scheduler.set_slots(model, 1)
        self.dispatch(model)

    def _run_on_text_model(self, model: str, batch: list[Request]) -> None:
        """GenerationService picked ``batch`` (embeds, each holding a slot of GGUF model
        ``model``): one run in the model's runner embeds them all."""
        lm = self.models.loaded.get(model)
        engine = lm.engine if lm is not None else None
        if not isinstance(engine, RunEngine):
            for job in batch:
                self.scheduler.finish(job.request_id)
                self._fail(job, "not_supported", f"{model} cannot embed", EMBED_HINT)
            return
        self._start(model, engine, batch)

        # -- dispatch: one run per model at a time ----------------------------------------------
    def dispatch(self, model: str) -> None:
        """Start the next run of ``model`` if its worker is idle and something waits."""
        lm = self.models.loaded.get(model)
        if lm is None or lm.state != "loaded" or not isinstance(lm.engine, OnnxRunEngine):
            return
        engine = lm.engine
        if engine.busy:
            return
        batch = self._pick(model)
        if not batch:
            return
        engine.busy = True
        self._start(model, engine, batch)

    def _start(self, model: str, engine: RunEngine, batch: list[Request]) -> None:
        """Send ``batch`` to ``engine`` as one run; ``_finished`` answers them."""
        now = time.monotonic()
        for job in batch:
            job.move(State.RUNNING, now)
            if self.on_run_start is not None:
                self.on_run_start(job)
        lm = self.models.loaded.get(model)
        if lm is not None:
            lm.last_used = now
        self.batches += 1
        self._queue_changed()
        loop = asyncio.get_running_loop()

        def done(result: Any, error: BaseException | None) -> None:  # loop or worker thread
            loop.call_soon_threadsafe(self._finished, model, engine, batch, now, result, error)

        if batch[0].kind is Kind.EMBED:
            args = {"requests": [[list(j.body.get("texts") or []),
                                  j.body.get("normalize", True) is not False] for j in batch]}
        else:
            args = {"inputs": batch[0].body["inputs"]}
        run_id = engine.run(batch[0].op, args, done)
        if isinstance(engine, OnnxRunEngine):  # one run at a time: terminable by _abandon
            self.runs[model] = (run_id, batch)

    def _pick(self, model: str) -> list[Request]:
        """The next run: one infer, or embeds in pick order up to ``onnx.max_batch`` texts.

        Items are taken one at a time so the scheduler's order decides; the first one that
        cannot join (an infer, or too many texts) is put back with ``requeue``, which keeps
        its age and so its place at the head.
        """
        now = time.monotonic()
        batch: list[Request] = []
        texts = 0
        limit = self.cfg.onnx.max_batch
        while True:
            items = self.scheduler.pop_ready(model, 1, now)
            if not items:
                return batch
            job = items[0].payload
            if not isinstance(job, Request) or self.requests.get(job.request_id) is not job \
                    or job.state is not State.QUEUED:
                self.scheduler.finish(items[0].request_id)  # stale (already failed): drop it
                continue
            if not batch:
                batch.append(job)
                texts = job.n_texts
                if job.kind is not Kind.EMBED:
                    return batch
                continue
            if job.kind is not Kind.EMBED or texts + job.n_texts > limit:
                self.scheduler.requeue(items[0], now)
                return batch
            batch.append(job)
            texts += job.n_texts

    def _finished(self, model: str, engine: RunEngine, batch: list[Request],
                  started: float, result: Any, error: BaseException | None) -> None:
        """On the loop: a run ended; answer its jobs and start the next run."""
        now = time.monotonic()
        if self.runs.get(model, (0, None))[1] is batch:
            del self.runs[model]
        lm = self.models.loaded.get(model)
        for job in batch:
            self.scheduler.finish(job.request_id)
        if lm is not None:
            lm.last_used = now
        if isinstance(engine, OnnxRunEngine):
            engine.busy = False
        if error is None:
            self.scheduler.record_service(model, now - started)
        for i, job in enumerate(batch):
            if job.state is State.DONE:  # timed out or aborted meanwhile: its caller is gone
                continue
            if error is not None:
                if isinstance(error, InfernoError):
                    self._fail(job, error.code, error.message, error.hint)
                else:
                    log.error("onnx %s on %s failed: %r", job.op, model, error)
                    self._fail(job, "internal", f"{job.op} on {model} failed: {error}", None)
                continue
            self._done(job, self._reply(job, i, batch, result, lm))
        self._dispatch_any(model)

    def _reply(self, job: Request, i: int, batch: list[Request], result: dict[str, Any],
               lm: LoadedModel | None) -> dict[str, Any]:
        stats: dict[str, Any] = {"run_ms": round(result["run_ms"], 3)}
        engine = lm.engine if lm is not None else None
        provider = engine.provider if isinstance(engine, OnnxRunEngine) else \
            "llama.cpp" if engine is not None else None
        if job.kind is Kind.EMBED:
            r = result["results"][i]
            stats.update(tokenize_ms=round(result["tokenize_ms"], 3),
                         prefill_ms=round(result["run_ms"], 3),
                         prompt_tokens=sum(r["tokens"]), batch_requests=len(batch),
                         batch_texts=result["texts"])
            reply = {"model": job.model, "dim": r["dim"], "vectors": r["vectors"],
                     "truncated": r["truncated"], "tokens": r["tokens"],
                     "max_length": result["max_length"],
                     "normalized": job.body.get("normalize", True) is not False}
        else:
            reply = {"model": job.model, "outputs": result["outputs"]}
        stats["provider"] = provider
        reply["stats"] = stats
        return reply

    # -- endings ----------------------------------------------------------------------------
    def _final_stats(self, job: Request, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
        """Generation's final-stats shape, so one profiler reads both."""
        now = time.monotonic()
        out = dict(stats)
        out.update(finish_reason=reason, model=job.model, priority=job.priority, op=job.op,
                   queue_wait_ms=round(((job.admitted_at or now) - job.submitted) * 1000, 3),
                   load_wait_ms=round(job.load_wait_s * 1000, 3),
                   total_ms=round((now - job.submitted) * 1000, 3),
                   prompt_tokens=out.get("prompt_tokens", 0), completion_tokens=0)
        return out

    def _done(self, job: Request, reply: dict[str, Any]) -> None:
        reply["stats"] = self._final_stats(job, "done", reply.get("stats") or {})
        job.move(State.DONE, time.monotonic())
        self._finish(job, "done", reply["stats"])
        if job.future is not None and not job.future.done():
            job.future.set_result(reply)

    def _fail(self, job: Request, code: str, message: str, hint: str | None) -> None:
        if job.state is State.DONE:
            return
        final = self._final_stats(job, code, {})
        job.move(State.DONE, time.monotonic())
        self._finish(job, code, final)
        if job.future is not None and not job.future.done():
            job.future.set_exception(InfernoError(code, message, hint))
            job.future.exception()  # retrieved: nobody may be waiting any more

    def _finish(self, job: Request, reason: str, final: dict[str, Any]) -> None:
        self.requests.pop(job.request_id)
        if self.on_profile is not None:
            try:
                self.on_profile(job, reason, final)
            except Exception:  # a profiling bug must not lose the reply
                log.exception("onnx profile hook failed for %s", job.request_id)
        self._queue_changed()

    def _queue_changed(self) -> None:
        self.requests.publish_queue()

    def _abandon(self, job: Request, code: str, message: str) -> None:
        """End ``job`` now with the error ``code``. A waiting job leaves the scheduler; a
        running one's result will be dropped, and its run is terminated once no job of
        its batch still wants it, so the worker is free for the next run early."""
        state = job.state
        if state is State.QUEUED:
            self.scheduler.cancel(job.request_id)
        self._fail(job, code, message, None)
        run = self.runs.get(job.model)
        if state is not State.RUNNING or run is None or not any(j is job for j in run[1]):
            return
        if all(j.state is State.DONE for j in run[1]):
            lm = self.models.loaded.get(job.model)
            if lm is not None and isinstance(lm.engine, OnnxRunEngine):
                lm.engine.terminate(run[0])

    # -- control ----------------------------------------------------------------------------
    def cancel(self, request_id: str, code: str = "cancelled",
               message: str = "cancelled by request") -> str:
        """``cancel``: the caller's pending reply is the error ``code`` at once."""
        job = self.requests.get(request_id)
        if job is None or job.kind.generates:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        self._abandon(job, code, message)
        return "cancelled"

    # -- hooks from the daemon --------------------------------------------------------------
    def expired(self, job: Request) -> None:
        """The scheduler dropped queued ``job``: its deadline passed (the core's tick)."""
        if job.state is State.QUEUED:
            self._fail(job, "deadline_exceeded", "the deadline passed while the request was "
                       "queued", None)

    def _model_unloaded(self, model: str, cause: UnloadCause) -> None:
        """As GenerationService._model_unloaded: running ones are aborted; queued ones fail
        with ``model_unloaded`` after an operator's unload, else load it again."""
        for job in self.requests.values(generates=False):
            if job.model == model and job.state is State.RUNNING:
                self.scheduler.finish(job.request_id)
                self._fail(job, "aborted", f"model {model} was unloaded", None)
        queued = [j for j in self.requests.values(generates=False)
                  if j.model == model and j.state is State.QUEUED]
        if cause == "operator":
            for job in queued:
                self.scheduler.cancel(job.request_id)
                self._fail(job, "model_unloaded", f"model {model} was unloaded by an "
                           "operator while this request waited for it", None)
        elif queued and cause != "stopping":
            asyncio.get_running_loop().create_task(self._reload(model))

    def _model_failed(self, model: str, message: str, hint: str) -> None:
        """``model``'s runner died. Its run's requests end with ``runner_crashed`` through
        the run's own error (the proxy fails it); queued ones wait for the model to load
        again, behind the crash-loop guard."""
        if any(j.model == model and j.state is State.QUEUED for j in self.requests.values(generates=False)):
            asyncio.get_running_loop().create_task(self._reload(model))

    async def _reload(self, model: str) -> None:
        try:
            await self.models.load_for_request(model, None, lambda: any(
                j.model == model and j.state is State.QUEUED
                for j in self.requests.values(generates=False)))
        except InfernoError as e:
            for job in self.requests.values(generates=False):
                if job.model == model and job.state is State.QUEUED:
                    self.scheduler.cancel(job.request_id)
                    self._fail(job, e.code, e.message, e.hint)
            return
        self._dispatch_any(model)

    def abort_queued(self, message: str) -> None:
        """Daemon stopping: refuse new work, fail what has not started."""
        self.accepting = False
        for job in self.requests.values(generates=False):
            if job.state is State.QUEUED:
                self.scheduler.cancel(job.request_id)
                self._fail(job, "aborted", message, "resubmit when the daemon is back")

    def running_count(self) -> int:
        return sum(1 for j in self.requests.values(generates=False) if j.state is State.RUNNING)

    def queued_count(self) -> int:
        return sum(1 for j in self.requests.values(generates=False) if j.state is State.QUEUED)

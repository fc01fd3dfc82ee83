"""Generation requests from admission to the last token, on the event loop.

The scheduler decides who runs next; the engines decode; this module moves requests between
them and turns engine events into stream events on ``tokens.<request_id>``:

    queued* -> start -> token* -> done | error

GGUF engines run in runner processes (infernod/runner); their proxies call this service's
``on_*`` methods on the event loop, so all state here is touched by one thread only. A runner
that dies ends its model's running requests with ``runner_crashed`` (never retried here: a
job's item is retried by jobs_service) and the model's queued requests wait for a reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.backends.grammar import request_grammar
from infernod.daemon.requests import ProfileHook, Request, RequestTable, RunStartHook, State
from infernod.daemon.scheduler import QueueItem, Scheduler
from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import SAMPLING_KEYS
from infernod.telemetry.rate import RateWindow

if TYPE_CHECKING:
    from infernod.config import Config
    from infernod.daemon.models import ModelManager, UnloadCause
    from infernod.daemon.publisher import Publisher

log = logging.getLogger("infernod.daemon.generation")



class GenerationService:
    """The text-engine runner of the request lifecycle: generate requests and job items."""

    def __init__(self, cfg: Config, models: ModelManager, scheduler: Scheduler,
                 publisher: Publisher, requests: RequestTable, *,
                 on_profile: ProfileHook | None = None,
                 on_run_start: RunStartHook | None = None) -> None:
        self.cfg = cfg
        self.models = models
        self.scheduler = scheduler
        self.publisher = publisher
        self.requests = requests  # every kind's records; this service adds its own
        self.on_profile = on_profile
        self.on_run_start = on_run_start
        self.accepting = True
        self.throughput = RateWindow()  # tokens generated, all requests: status' tok/s now
        # Embeds queued for a GGUF model share its queue and slots with generation; this
        # dispatch picks them in the scheduler's order and hands them to OnnxService, which
        # owns embed requests (it sets this when it is built).
        self.embed_runner: Callable[[str, list[Request]], None] | None = None
        models.on_unloaded.append(self._model_unloaded)
        models.on_failed.append(self._model_failed)

    # -- admission --------------------------------------------------------------------------
    def submit(self, gen: Request) -> None:
        if not self.accepting:
            raise InfernoError("shutting_down", "the daemon is stopping and admits no new work")
        self.models.check_generate(gen.model)  # not_supported for ONNX models
        if gen.request_id in self.requests:
            raise InfernoError("conflict", f"request id {gen.request_id} is already in use",
                               "use a fresh message id per request")
        request_grammar(self._params(gen))  # bad_schema now, before anything is queued
        # the stream first: it refuses a session that belongs to another principal
        self.publisher.open_stream(gen.request_id, gen.principal, gen.connection)
        try:
            self.scheduler.submit(self._item(gen), time.monotonic())
        except BaseException:
            self.publisher.close_stream(gen.request_id)
            raise
        self.requests.add(gen)
        asyncio.get_running_loop().create_task(self._admit(gen))

    def _item(self, gen: Request) -> QueueItem:
        return QueueItem(request_id=gen.request_id, client=gen.client or gen.session,
                         model=gen.model, priority=gen.priority, submitted_at=gen.submitted,
                         deadline=gen.deadline,
                         est_tokens=self._params(gen).get("max_tokens") or 256,
                         payload=gen, owner="" if gen.job is not None else gen.principal)

    async def _admit(self, gen: Request) -> None:
        try:
            gen.load_wait_s = await self.models.load_for_request(
                gen.model, gen.body.get("keep_alive"), lambda: gen.state is State.QUEUED)
        except InfernoError as e:
            self.scheduler.cancel(gen.request_id)
            self._fail(gen, e.code, e.message, e.hint)
            return
        lm = self.models.loaded.get(gen.model)
        if lm is not None and lm.engine is not None:
            self.scheduler.set_slots(gen.model, lm.engine.n_slots)
        self.dispatch(gen.model)

    def dispatch(self, model: str) -> None:
        """Fill the free slots of ``model`` (the scheduler's count: a request being preempted
        gives its slot up at once, since the engine applies commands in order)."""
        lm = self.models.loaded.get(model)
        engine = lm.text_engine if lm is not None else None
        if lm is None or lm.state != "loaded" or engine is None:
            return
        now = time.monotonic()
        free = self.scheduler.free_slots(model)
        if free <= 0:
            return
        embeds: list[Request] = []
        for item in self.scheduler.pop_ready(model, free, now):
            gen = item.payload
            if not isinstance(gen, Request) or self.requests.get(item.request_id) is not gen \
                    or gen.state is not State.QUEUED:
                self.scheduler.finish(item.request_id)  # stale: it holds no slot
                continue
            if not gen.kind.generates:  # an embed on this GGUF model: one run for them all
                embeds.append(gen)
                continue
            gen.move(State.RUNNING, now)
            lm.last_used = now
            engine.submit(self._engine_request(gen))
        if embeds:
            lm.last_used = now
            assert self.embed_runner is not None, "OnnxService registers itself"
            self.embed_runner(model, embeds)
        self.publish_queue()

    def _params(self, gen: Request) -> dict[str, Any]:
        """The body's generation parameters over the model's own defaults (a request's
        value wins; the engine's defaults fill the rest)."""
        own = self.models.settings.request_defaults(gen.model)
        return {**own, **{k: v for k, v in gen.body.items() if v is not None}}

    def _engine_request(self, gen: Request) -> GenerationRequest:
        b = self._params(gen)
        sampling = SamplingParams(**{k: b[k] for k in SAMPLING_KEYS if b.get(k) is not None})
        return GenerationRequest(
            request_id=gen.request_id, prompt=gen.prompt,
            max_tokens=b.get("max_tokens") or 256, stop=list(b.get("stop") or []),
            sampling=sampling, add_bos=True, resume_tokens=list(gen.resume_tokens),
            ignore_eos=bool(b.get("ignore_eos")), priority=gen.priority,
            logprobs=(b.get("top_logprobs") or 0) if b.get("logprobs") else None,
            grammar=request_grammar(b),
        )

    def _mine(self, request_id: str) -> Request | None:
        """The live generating request ``request_id`` (an embed/infer id is not this
        service's to end)."""
        r = self.requests.get(request_id)
        return r if r is not None and r.kind.generates else None

    # -- engine events (on the loop) --------------------------------------------------------
    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        gen = self._mine(request_id)
        if gen is None:
            return
        gen.last_event_at = time.monotonic()
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

    def _release(self, gen: Request) -> None:
        self.scheduler.finish(gen.request_id)
        lm = self.models.loaded.get(gen.model)
        if lm is not None:
            lm.last_used = time.monotonic()

    def _final_stats(self, gen: Request, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        out = dict(stats)
        out.pop("generated_tokens", None)
        gaps = out.pop("itl_gaps_ms", None)  # for the profile only, not the done event
        if gaps is not None:
            gen.itl_gaps_ms = list(gaps)
        out.update(
            finish_reason=reason,
            model=gen.model,
            priority=gen.priority,
            queue_wait_ms=round(((gen.admitted_at or now) - gen.submitted) * 1000, 3),
            load_wait_ms=round(gen.load_wait_s * 1000, 3),
            total_ms=round((now - gen.submitted) * 1000, 3),
            completion_tokens=out.get("completion_tokens", gen.n_tokens),
        )
        return out

    def _done(self, gen: Request, reason: str, stats: dict[str, Any]) -> None:
        if gen.state is State.DONE:
            return
        final = self._final_stats(gen, reason, stats)
        gen.move(State.DONE, time.monotonic())
        self.publisher.publish(gen.topic, "done", final)
        self._finish(gen, reason, final)

    def _fail(self, gen: Request, code: str, message: str, hint: str | None,
              stats: dict[str, Any] | None = None) -> None:
        if gen.state is State.DONE:
            return
        err = InfernoError(code, message, hint)
        final = self._final_stats(gen, code, stats or {})
        gen.move(State.DONE, time.monotonic())
        self.publisher.publish(gen.topic, "error", {**err.to_wire(), "stats": final})
        self._finish(gen, code, final)

    def _finish(self, gen: Request, reason: str, final: dict[str, Any]) -> None:
        self.requests.pop(gen.request_id)
        if gen.hold is not None:
            gen.hold.release()
            gen.hold = None
        self.publisher.close_stream(gen.request_id)
        if self.on_profile is not None:
            self.on_profile(gen, reason, final)
        if gen.on_done is not None:
            gen.on_done(gen, reason, final)
        self.publish_queue()

    # -- control ----------------------------------------------------------------------------
    def cancel(self, request_id: str, code: str = "cancelled",
               message: str = "cancelled by request") -> str:
        gen = self._mine(request_id)
        if gen is None:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        if gen.state is State.QUEUED:
            self.scheduler.cancel(request_id)
            lm = self.models.loaded.get(gen.model)
            engine = lm.text_engine if lm is not None else None
            if gen.resume_tokens and engine is not None:
                engine.cancel(request_id)  # a preempted request: free its parked KV cells
            if code == "cancelled":  # the caller asked for it: a normal end, not an error
                self._done(gen, "cancelled", {})
            else:
                self._fail(gen, code, message, None)
            return "cancelled"
        gen.abort = (code, message)
        self.scheduler.mark(request_id, stopping=True)
        lm = self.models.loaded.get(gen.model)
        engine = lm.text_engine if lm is not None else None
        if engine is not None:
            engine.cancel(request_id)
        return "cancelling"

    def _model_unloaded(self, model: str, cause: UnloadCause) -> None:
        """Running requests end (``aborted``); queued ones fail with ``model_unloaded`` if
        an operator unloaded it, else (an eviction, keep-alive) they load it again."""
        for gen in self.requests.values(generates=True):
            if gen.model == model and gen.state is State.RUNNING:
                self._release(gen)
                self._fail(gen, "aborted", f"model {model} was unloaded", None)
        queued = [g for g in self.requests.values(generates=True)
                  if g.model == model and g.state is State.QUEUED]
        if cause == "operator":
            for gen in queued:
                self.scheduler.cancel(gen.request_id)
                self._fail(gen, "model_unloaded", f"model {model} was unloaded by an "
                           "operator while this request waited for it", None)
        elif queued and cause != "stopping":
            asyncio.get_running_loop().create_task(self._reload(model))

    def _model_failed(self, model: str, message: str, hint: str) -> None:
        """``model``'s runner died: its running requests end with runner_crashed; its queued
        ones stay queued while the model loads again (the crash-loop guard decides when)."""
        for gen in self.requests.values(generates=True):
            if gen.model == model and gen.state is State.RUNNING:
                self._release(gen)
                self._fail(gen, "runner_crashed", message, hint)
        if any(g.model == model and g.state is State.QUEUED for g in self.requests.values(generates=True)):
            asyncio.get_running_loop().create_task(self._reload(model))

    async def _reload(self, model: str) -> None:
        try:
            await self.models.load_for_request(model, None, lambda: self._waiting(model))
        except InfernoError as e:
            for gen in self.requests.values(generates=True):
                if gen.model == model and gen.state is State.QUEUED:
                    self.scheduler.cancel(gen.request_id)
                    self._fail(gen, e.code, e.message, e.hint)
            return
        lm = self.models.loaded.get(model)
        if lm is not None and lm.engine is not None:
            self.scheduler.set_slots(model, lm.engine.n_slots)
        self.dispatch(model)

    def _waiting(self, model: str) -> bool:
        return any(g.model == model and g.state is State.QUEUED
                   for g in self.requests.values(generates=True))

    def expired(self, gen: Request) -> None:
        """The scheduler dropped queued ``gen``: its deadline passed (the core's tick)."""
        self._fail(gen, "deadline_exceeded", "the deadline passed while the request was queued",
                   None)

    def tick(self, now: float) -> None:
        """Timeouts and stalls of running requests; called a few times a second."""
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

    def abort_all(self, code: str, message: str) -> None:
        for gen in self.requests.values(generates=True):
            if gen.state is State.QUEUED:
                self.scheduler.cancel(gen.request_id)
                self._fail(gen, code, message, None)
            elif gen.state is State.RUNNING:
                self.cancel(gen.request_id, code, message)

    def publish_queue(self) -> None:
        self.requests.publish_queue()

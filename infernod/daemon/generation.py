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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.daemon.budget import Hold
from infernod.daemon.queue import queue_row, queue_snapshot, sort_rows
from infernod.daemon.scheduler import QueueItem, Scheduler
from infernod.protocol.bodies import QueueRow, QueueSnapshot, to_wire
from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import SAMPLING_KEYS

if TYPE_CHECKING:
    from infernod.config import Config
    from infernod.daemon.models import ModelManager
    from infernod.daemon.publisher import Publisher

log = logging.getLogger("infernod.daemon.generation")



@dataclass
class Gen:
    request_id: str
    session: str
    model: str
    prompt: str
    body: dict[str, Any]
    priority: str
    submitted: float
    deadline: float | None
    timeout_s: float
    stall_timeout_s: float
    topic: str
    client: str = ""
    principal: str = ""  # the sender's uid:N / key:NAME (cancel: owner or operator)
    job: tuple[str, int] | None = None
    state: str = "queued"  # queued | running | done
    admitted_at: float | None = None
    load_wait_s: float = 0.0
    first_token_at: float | None = None
    last_event_at: float | None = None
    n_tokens: int = 0
    abort: tuple[str, str] | None = None
    resume_tokens: list[int] = field(default_factory=list)
    on_done: Callable[[Gen, str, dict[str, Any]], None] | None = None
    on_start: Callable[[Gen], None] | None = None  # each time an engine starts (or resumes) it
    text: list[str] | None = None  # when a list, every text delta is kept (job results)
    itl_gaps_ms: list[float] | None = None  # the engine's raw inter-token gaps (profiles)
    hold: Hold | None = None  # the request's bytes, charged until it finishes (budget.py)


class QueuePeer(Protocol):
    """Another service whose requests share the scheduler (ONNX embed/infer): this
    service's tick expires everyone's queued items, and its queue topic lists everyone's."""

    def expired(self, item: QueueItem) -> None:
        """The scheduler dropped the peer's queued ``item``: its deadline passed."""

    def queue_items(self, now: float, waiting: Mapping[str, Mapping[str, Any]],
                    model: str | None) -> list[QueueRow]:
        """The peer's waiting and running requests (``model``'s only, if given) as queue
        rows; ``waiting``: the scheduler's rows by request id."""


class GenerationService:
    def __init__(self, cfg: Config, models: ModelManager, scheduler: Scheduler,
                 publisher: Publisher,
                 on_profile: Callable[[Gen, str, dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.models = models
        self.scheduler = scheduler
        self.publisher = publisher
        self.on_profile = on_profile
        self.peer: QueuePeer | None = None  # the other service on the shared scheduler
        self.on_run_start: Callable[[Gen], None] | None = None  # service-wide, like on_profile
        self.gens: dict[str, Gen] = {}
        self.accepting = True
        models.on_unloaded.append(self._model_unloaded)
        models.on_failed.append(self._model_failed)

    # -- admission --------------------------------------------------------------------------
    def submit(self, gen: Gen) -> None:
        if not self.accepting:
            raise InfernoError("shutting_down", "the daemon is stopping and admits no new work")
        self.models.check_generate(gen.model)  # not_supported for ONNX models
        if gen.request_id in self.gens:
            raise InfernoError("conflict", f"request id {gen.request_id} is already in use",
                               "use a fresh message id per request")
        # the stream first: it refuses a session that belongs to another principal
        self.publisher.open_stream(gen.request_id, gen.principal)
        try:
            self.scheduler.submit(self._item(gen), time.monotonic())
        except BaseException:
            self.publisher.close_stream(gen.request_id)
            raise
        self.gens[gen.request_id] = gen
        asyncio.get_running_loop().create_task(self._admit(gen))

    @staticmethod
    def _item(gen: Gen) -> QueueItem:
        return QueueItem(request_id=gen.request_id, client=gen.client or gen.session,
                         model=gen.model, priority=gen.priority, submitted_at=gen.submitted,
                         deadline=gen.deadline, est_tokens=gen.body.get("max_tokens") or 256,
                         payload=gen, owner="" if gen.job is not None else gen.principal)

    async def _admit(self, gen: Gen) -> None:
        try:
            gen.load_wait_s = await self.models.load_for_request(gen.model,
                                                                 gen.body.get("keep_alive"))
        except InfernoError as e:
            self.scheduler.cancel(gen.request_id)
            self._fail(gen, e.code, e.message, e.hint)
            return
        lm = self.models.loaded.get(gen.model)
        if lm is not None and lm.engine is not None:
            self.scheduler.set_slots(gen.model, lm.engine.n_slots)
        self.dispatch(gen.model)

    def dispatch(self, model: str, extra: int = 0) -> None:
        """Fill free slots of ``model`` from the scheduler. ``extra`` counts slots being
        freed by a preemption just sent: the engine applies its commands in order, so the
        next pick is admitted in the same step that pauses the victim."""
        lm = self.models.loaded.get(model)
        engine = lm.text_engine if lm is not None else None
        if lm is None or lm.state != "loaded" or engine is None:
            return
        now = time.monotonic()
        free = engine.free_slots() + extra
        if free <= 0:
            return
        for item in self.scheduler.pop_ready(model, free, now):
            gen = item.payload
            if not isinstance(gen, Gen) or gen.request_id not in self.gens \
                    or gen.state != "queued":
                continue
            gen.state = "running"
            gen.admitted_at = now
            gen.last_event_at = now
            lm.running.add(gen.request_id)
            lm.last_used = now
            engine.submit(self._engine_request(gen))
        self.publish_queue()

    def _engine_request(self, gen: Gen) -> GenerationRequest:
        b = gen.body
        sampling = SamplingParams(**{k: b[k] for k in SAMPLING_KEYS if b.get(k) is not None})
        return GenerationRequest(
            request_id=gen.request_id, prompt=gen.prompt,
            max_tokens=b.get("max_tokens") or 256, stop=list(b.get("stop") or []),
            sampling=sampling, add_bos=True, resume_tokens=list(gen.resume_tokens),
            ignore_eos=bool(b.get("ignore_eos")), priority=gen.priority,
        )

    # -- engine events (on the loop) --------------------------------------------------------
    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        gen = self.gens.get(request_id)
        if gen is None:
            return
        gen.last_event_at = time.monotonic()
        self.publisher.publish(gen.topic, "start", {"request_id": request_id, **info})
        if self.on_run_start is not None:
            self.on_run_start(gen)
        if gen.on_start is not None:
            gen.on_start(gen)

    def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None:
        gen = self.gens.get(request_id)
        if gen is None or gen.state != "running":
            return
        now = time.monotonic()
        if gen.first_token_at is None:
            gen.first_token_at = now
        gen.last_event_at = now
        gen.n_tokens += n_tokens
        if gen.text is not None:
            gen.text.append(text)
        self.publisher.publish(gen.topic, "token", {"text": text, "n": n_tokens})

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        gen = self.gens.get(request_id)
        if gen is None:
            return
        self._release(gen)
        if reason == "preempted" and gen.abort is None:
            gen.resume_tokens = list(stats.get("generated_tokens") or [])
            gen.state = "queued"
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
        gen = self.gens.get(request_id)
        if gen is None:
            return
        self._release(gen)
        self._fail(gen, code, message, hint)
        self.dispatch(gen.model)

    def _release(self, gen: Gen) -> None:
        lm = self.models.loaded.get(gen.model)
        if lm is not None:
            lm.running.discard(gen.request_id)
            lm.last_used = time.monotonic()

    def _final_stats(self, gen: Gen, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
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

    def _done(self, gen: Gen, reason: str, stats: dict[str, Any]) -> None:
        final = self._final_stats(gen, reason, stats)
        gen.state = "done"
        self.publisher.publish(gen.topic, "done", final)
        self._finish(gen, reason, final)

    def _fail(self, gen: Gen, code: str, message: str, hint: str | None,
              stats: dict[str, Any] | None = None) -> None:
        if gen.state == "done":
            return
        err = InfernoError(code, message, hint)
        final = self._final_stats(gen, code, stats or {})
        gen.state = "done"
        self.publisher.publish(gen.topic, "error", {**err.to_wire(), "stats": final})
        self._finish(gen, code, final)

    def _finish(self, gen: Gen, reason: str, final: dict[str, Any]) -> None:
        self.gens.pop(gen.request_id, None)
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
        gen = self.gens.get(request_id)
        if gen is None:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        if gen.state == "queued":
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
        lm = self.models.loaded.get(gen.model)
        engine = lm.text_engine if lm is not None else None
        if engine is not None:
            engine.cancel(request_id)
        return "cancelling"

    def _model_unloaded(self, model: str) -> None:
        for gen in list(self.gens.values()):
            if gen.model == model and gen.state == "running":
                self._release(gen)
                self._fail(gen, "aborted", f"model {model} was unloaded", None)

    def _model_failed(self, model: str, message: str, hint: str) -> None:
        """``model``'s runner died: its running requests end with runner_crashed; its queued
        ones stay queued while the model loads again (the crash-loop guard decides when)."""
        for gen in list(self.gens.values()):
            if gen.model == model and gen.state == "running":
                self._release(gen)
                self._fail(gen, "runner_crashed", message, hint)
        if any(g.model == model and g.state == "queued" for g in self.gens.values()):
            asyncio.get_running_loop().create_task(self._reload(model))

    async def _reload(self, model: str) -> None:
        try:
            await self.models.load_for_request(model, None)
        except InfernoError as e:
            for gen in list(self.gens.values()):
                if gen.model == model and gen.state == "queued":
                    self.scheduler.cancel(gen.request_id)
                    self._fail(gen, e.code, e.message, e.hint)
            return
        lm = self.models.loaded.get(model)
        if lm is not None and lm.engine is not None:
            self.scheduler.set_slots(model, lm.engine.n_slots)
        self.dispatch(model)

    def tick(self, now: float) -> None:
        """Timeouts, stalls and deadline expiry; called a few times a second."""
        for item in self.scheduler.expire(now):
            gen = self.gens.get(item.request_id)
            if gen is not None:
                self._fail(gen, "deadline_exceeded",
                           "the deadline passed while the request was queued", None)
            elif self.peer is not None:  # another service's item (ONNX)
                self.peer.expired(item)
        for gen in list(self.gens.values()):
            if gen.state != "running" or gen.abort is not None:
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
        for gen in list(self.gens.values()):
            if gen.state == "queued":
                self.scheduler.cancel(gen.request_id)
                self._fail(gen, code, message, None)
            elif gen.state == "running":
                self.cancel(gen.request_id, code, message)

    def running_count(self) -> int:
        return sum(1 for g in self.gens.values() if g.state == "running")

    def queued_count(self) -> int:
        return sum(1 for g in self.gens.values() if g.state == "queued")

    def publish_queue(self) -> None:
        self.publisher.publish("queue", "queue", to_wire(self.queue_snapshot()))

    def queue_snapshot(self, model: str | None = None,
                       preempting: Collection[str] = (), now: float | None = None
                       ) -> QueueSnapshot:
        """Every waiting and running request, the peer's too, in the one queue row shape
        (queue.list and the ``queue`` topic). ``preempting``: running requests asked to
        pause (QueueService's), shown in that state."""
        now = time.monotonic() if now is None else now
        waiting = {w["id"]: w for w in self.scheduler.snapshot(now)}
        rows = [queue_row(now, request_id=g.request_id, kind="generate",
                          client=g.client or g.session, session=g.session, model=g.model,
                          priority=g.priority,
                          state="preempting" if g.request_id in preempting else g.state,
                          submitted=g.submitted, deadline=g.deadline, tokens=g.n_tokens,
                          job=g.job[0] if g.job else None, preempted=bool(g.resume_tokens),
                          waiting=waiting.get(g.request_id))
                for g in self.gens.values() if model in (None, g.model)]
        if self.peer is not None:
            rows += self.peer.queue_items(now, waiting, model)
        models = sorted({r["model"] for r in rows})
        return queue_snapshot(sort_rows(rows), self.scheduler.level(),
                              {m: self.scheduler.level(m) for m in models})

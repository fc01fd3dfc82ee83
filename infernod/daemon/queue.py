"""Queue visibility and preemption on the event loop: ``queued`` events, ``queue.list``,
``reprioritize``, and pausing running work for a waiting ``vip``.

The policy (who goes next, whom to preempt, positions and ETAs) is the scheduler's; this
module only asks it and acts: it publishes what the scheduler answers and calls
``engine.preempt``. Called after each admission and from the daemon's 4 Hz tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from infernod.protocol.bodies import QueuedEvent, QueueRow, QueueSnapshot, to_wire
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.daemon.generation import GenerationService
    from infernod.daemon.models import ModelManager
    from infernod.daemon.onnx import OnnxService
    from infernod.daemon.publisher import Publisher
    from infernod.daemon.scheduler import Scheduler

log = logging.getLogger("infernod.queue")

QUEUED_EVENT_MIN_INTERVAL_S = 0.5  # at most 2 ``queued`` events per second per request


def queue_row(now: float, *, request_id: str, kind: str, client: str, session: str,
              model: str, priority: str, state: str, submitted: float,
              deadline: float | None, tokens: int = 0, job: str | None = None,
              preempted: bool = False, waiting: Mapping[str, Any] | None = None) -> QueueRow:
    """The one row shape of queue.list and the ``queue`` topic, for a request of any kind.
    ``waiting`` is the scheduler's row while it waits (Scheduler.snapshot): its place and
    its effective class."""
    w = waiting
    return {
        "request_id": request_id, "id": request_id, "kind": kind, "client": client,
        "session": session, "model": model, "priority": priority, "class": priority,
        "effective_class": w["effective_class"] if w else priority,
        "critical": bool(w and w["critical"]),
        "state": w["state"] if w else state,
        "position": w["position"] if w else None,
        "age_s": round(now - submitted, 3),
        "deadline_in_s": None if deadline is None else round(deadline - now, 3),
        "tokens": tokens, "job": job, "preempted": preempted,
    }


def sort_rows(rows: list[QueueRow]) -> list[QueueRow]:
    """Running first, then waiting in pick order (oldest first among equals)."""
    rows.sort(key=lambda r: (r["state"] not in ("running", "preempting"),
                             r["position"] or 0, -r["age_s"]))
    return rows


def queue_snapshot(rows: list[QueueRow], level: str, levels: dict[str, str]) -> QueueSnapshot:
    queued = sum(r["state"] == "queued" for r in rows)
    return {"items": rows, "running": sum(r["state"] == "running" for r in rows),
            "queued": queued, "waiting": queued, "level": level, "levels": levels}


class QueueService:
    """Owned by the event-loop thread, like the GenerationService it looks at."""

    def __init__(self, gen: GenerationService, scheduler: Scheduler, models: ModelManager,
                 publisher: Publisher, onnx: OnnxService | None = None) -> None:
        self.gen = gen
        self.onnx = onnx  # OnnxService: its embed/infer requests are listed too
        self.scheduler = scheduler
        self.models = models
        self.publisher = publisher
        self.preempting: set[str] = set()  # running requests asked to pause, not yet paused
        self._sent: dict[str, tuple[float, tuple[int, float | None]]] = {}
        self.preemptions = 0

    # -- hooks ------------------------------------------------------------------------------
    def admitted(self, model: str) -> None:
        """A request entered the queue: preempt if it is a vip facing full slots, and tell
        every waiting client of that model where it stands."""
        now = time.monotonic()
        self.preempt(now, [model])
        lm = self.models.loaded.get(model)
        if lm is None or lm.engine is None or lm.engine.free_slots() == 0:
            self.publish_positions(now)  # it really waits (a free slot starts it at once)

    def tick(self, now: float) -> None:
        self.preempt(now, self.scheduler.waiting_models())
        self.publish_positions(now)

    # -- positions --------------------------------------------------------------------------
    def publish_positions(self, now: float) -> None:
        """A ``queued`` event on each waiting request's token topic whose position or ETA
        changed, at most every QUEUED_EVENT_MIN_INTERVAL_S per request (the first at once)."""
        positions = self.scheduler.positions(now)
        for rid in [r for r in self._sent if r not in positions]:
            del self._sent[rid]
        for rid, (pos, eta) in positions.items():
            gen = self.gen.gens.get(rid)
            if gen is None or gen.state != "queued":
                continue
            key = (pos, None if eta is None else round(eta, 1))
            last = self._sent.get(rid)
            if last is not None and (last[1] == key or now - last[0] < QUEUED_EVENT_MIN_INTERVAL_S):
                continue
            self._sent[rid] = (now, key)
            body: QueuedEvent = {
                "request_id": rid, "model": gen.model, "position": pos,
                "eta_s": None if eta is None else round(eta, 3),
                "waiting": self.scheduler.depth(gen.model)}
            self.publisher.publish(gen.topic, "queued", to_wire(body))

    # -- preemption -------------------------------------------------------------------------
    def preempt(self, now: float, models: list[str]) -> None:
        """For each model whose slots are all busy while a vip waits, pause the victim the
        scheduler names (lowest class, most recently started). Its tokens so far come back
        in on_finished("preempted") and GenerationService requeues it to resume."""
        gens = self.gen.gens
        self.preempting = {r for r in self.preempting
                           if r in gens and gens[r].state == "running"}
        for model in models:
            lm = self.models.loaded.get(model)
            if lm is None or lm.state != "loaded" or lm.engine is None:
                continue
            if lm.engine.free_slots() > 0:
                continue
            running = [g for g in self.gen.gens.values()
                       if g.model == model and g.state == "running"]
            candidates = [(g.request_id, g.priority, g.admitted_at or 0.0) for g in running
                          if g.request_id not in self.preempting and g.abort is None]
            victim = self.scheduler.should_preempt(model, candidates, now)
            if victim is None:
                continue
            self.preempting.add(victim)
            self.preemptions += 1
            log.info("preempting %s on %s for a waiting vip request", victim, model)
            lm.engine.preempt(victim)
            self.gen.dispatch(model, extra=1)

    # -- queue.list / reprioritize ----------------------------------------------------------
    def snapshot(self, now: float, model: str | None = None) -> QueueSnapshot:
        """Every running and waiting request (``model``'s only, if given): running first,
        then waiting in pick order. The ``queue`` topic publishes the same shape."""
        return self.gen.queue_snapshot(model, self.preempting, now)

    def reprioritize(self, request_id: str, priority: str, now: float) -> str:
        gen = self.gen.gens.get(request_id)
        if gen is None:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        gen.priority = priority
        if gen.state == "queued":
            self.scheduler.reprioritize(request_id, priority, now)
            self.preempt(now, [gen.model])
            self.publish_positions(now)
        return gen.state

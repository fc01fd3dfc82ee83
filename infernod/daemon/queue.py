"""Queue visibility and preemption on the event loop: ``queued`` events, ``queue.list``,
``reprioritize``, and pausing running work for a waiting ``vip``.

The policy (who goes next, whom to preempt, positions and ETAs) is the scheduler's; this
module only asks it and acts: it publishes what the scheduler answers and calls
``engine.preempt``. Called after each admission and from the daemon's 4 Hz tick.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from infernod.daemon.requests import RequestTable, State
from infernod.protocol.bodies import QueuedEvent, QueueSnapshot, to_wire
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.daemon.lifecycle import RequestService
    from infernod.daemon.models import ModelManager
    from infernod.daemon.publisher import Publisher
    from infernod.daemon.scheduler import Scheduler

log = logging.getLogger("infernod.queue")

QUEUED_EVENT_MIN_INTERVAL_S = 0.5  # at most 2 ``queued`` events per second per request


class QueueService:
    """Owned by the event-loop thread, like the RequestService it looks at."""

    def __init__(self, gen: RequestService, scheduler: Scheduler, models: ModelManager,
                 publisher: Publisher, requests: RequestTable) -> None:
        self.gen = gen
        self.requests = requests  # every kind: embed/infer are listed too
        self.scheduler = scheduler
        self.models = models
        self.publisher = publisher
        self._sent: dict[str, tuple[float, tuple[int, float | None]]] = {}
        self.preemptions = 0

    # -- hooks ------------------------------------------------------------------------------
    def admitted(self, model: str) -> None:
        """A request entered the queue: preempt if it is a vip facing full slots, and tell
        every waiting client of that model where it stands."""
        now = time.monotonic()
        self.preempt(now, [model])
        if self.scheduler.free_slots(model) == 0:
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
            gen = self.requests.get(rid)
            if gen is None or not gen.kind.generates or gen.state is not State.QUEUED:
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
        in on_finished("preempted") and RequestService requeues it to resume."""
        for model in models:
            lm = self.models.loaded.get(model)
            if lm is None or lm.state != "loaded" or lm.text_engine is None:
                continue
            victim = self.scheduler.pick_victim(model, now)
            if victim is None:
                continue
            self.scheduler.mark(victim, preempting=True)  # its slot goes to the vip now
            self.preemptions += 1
            log.info("preempting %s on %s for a waiting vip request", victim, model)
            lm.text_engine.preempt(victim)
            self.gen.dispatch(model)

    # -- queue.list / reprioritize ----------------------------------------------------------
    def snapshot(self, now: float, model: str | None = None) -> QueueSnapshot:
        """Every running and waiting request (``model``'s only, if given), as the scheduler
        holds them: running first, then waiting in pick order. The ``queue`` topic
        publishes the same shape."""
        return self.requests.queue_snapshot(now, model)

    def reprioritize(self, request_id: str, priority: str, now: float) -> str:
        """A live request of any kind (a generate, a job item, an embed, an infer) gets
        ``priority`` for its next pick, or, running, for the next victim choice."""
        gen = self.requests.get(request_id)
        if gen is None or gen.state is State.DONE:
            raise InfernoError("unknown_request", f"no active request {request_id}")
        gen.priority = priority
        self.scheduler.reprioritize(request_id, priority, now)  # waiting or running
        if gen.state is State.QUEUED:
            self.preempt(now, [gen.model])
            self.publish_positions(now)
        return gen.state

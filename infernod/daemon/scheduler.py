"""Who gets the next free slot: priorities, aging, deadlines, backpressure, preemption.

A pure, synchronous policy object (house-style principle 3). It owns both halves of a
model's queue: who waits (in policy order) and who runs (picked by :meth:`Scheduler.pop_ready`
until :meth:`Scheduler.finish` or a preemption's :meth:`Scheduler.requeue`), so queue.list,
preemption, status and idle unloading all read one answer to "who is running". It owns no thread, no socket and
no clock: every method that depends on time takes ``now`` (monotonic seconds), so tests drive
it with a fake clock and the event loop drives it with ``time.monotonic()``. One internal lock
makes every public method atomic, so the bound holds even if several threads submit at once.

Policy, in the order a pick applies it:

1. Items whose deadline has passed are never picked; :meth:`Scheduler.expire` removes them so
   the server can fail them with ``deadline_exceeded``.
2. *Critical* items (deadline less than ``deadline_critical_s`` away) go before everything,
   earliest deadline first.
3. Every other item has an *effective class*: its requested class, promoted one class per
   ``aging_interval_s`` waited (aging stops at ``high``: only an explicit ``vip`` may preempt
   running work), and at least ``high`` when its deadline is less than ``deadline_urgent_s``
   away. Classes share picks by stride scheduling with weights 8/4/2/1, so every backlogged
   class progresses (``low`` never starves) and shares converge to the weights.
4. Inside a class, clients take turns (the least recently served client goes next), so one
   script with 500 items cannot monopolise its class; a client's own items are FIFO by
   ``submitted_at`` (a preempted item keeps its original one and so resumes first).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from infernod.daemon.queueitem import LevelChange as LevelChange
from infernod.daemon.queueitem import QueueItem as QueueItem
from infernod.daemon.queueitem import Running as Running
from infernod.daemon.queueitem import level_for as level_for
from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import PRIORITIES

_INDEX = {name: i for i, name in enumerate(PRIORITIES)}
VIP, HIGH, NORMAL, LOW = 0, 1, 2, 3
# Stride = lcm(weights) / weight for weights 8/4/2/1. Integers, so 10^6 picks never drift.
_STRIDE = (1, 2, 4, 8)

_DEFAULT_RETRY_MS = 1000  # retry hint when nothing has been measured yet
_SERVED_PRUNE = 4096  # round-robin memory is pruned to waiting clients beyond this many


@dataclass(slots=True)
class _Entry:
    item: QueueItem
    seq: int  # admission order, the final tie-break


class _ModelQueue:
    """Waiting items of one model plus the fairness state that must survive between picks."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        # Virtual-time fair queueing between classes: each pick of class c costs _STRIDE[c];
        # the next pick is the class whose next pick would *finish* first in virtual time.
        self.passes = [0, 0, 0, 0]  # finish tag of each class's last pick
        self.vtime = 0  # start tag of the last pick: an idle class rejoins here, no banked credit
        self.active: set[int] = set()  # classes that had waiting items at the last pick
        self.served: dict[tuple[int, str], int] = {}  # (class, client) -> pick counter
        self.counter = 0
        self.service_s: float | None = None  # EWMA of slot-seconds per request
        self.tokens_per_s: float | None = None  # EWMA of per-sequence decode rate
        self.slots: int | None = None


def _check_priority(priority: str) -> int:
    try:
        return _INDEX[priority]
    except KeyError:
        raise InfernoError(
            "bad_request", f"unknown priority {priority!r}", f"use one of {', '.join(PRIORITIES)}"
        ) from None


class Scheduler:
    """The queueing policy of every model. All methods are thread-safe and never block on I/O.

    The server calls ``submit`` on admission, ``pop_ready(model, free_slots, now)`` whenever a
    slot frees, ``expire(now)`` on a timer, ``record_service`` when a request finishes,
    ``set_slots`` when a model is loaded, and ``poll_level_changes`` after any of these to
    publish backpressure events.
    """

    def __init__(
        self,
        *,
        max_queue_per_model: int = 256,
        max_queue_total: int = 1024,
        aging_interval_s: float = 10.0,
        deadline_critical_s: float = 10.0,
        deadline_urgent_s: float = 30.0,
        ewma_alpha: float = 0.2,
        max_queued_per_owner: int = 0,
    ) -> None:
        if max_queue_per_model < 1 or max_queue_total < 1:
            raise ValueError("queue limits must be >= 1")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be in (0, 1]")
        self._lock = threading.Lock()
        self._max_model = max_queue_per_model
        self._max_total = max_queue_total
        self._max_owner = max_queued_per_owner  # 0 = no per-owner bound
        self._by_owner: dict[str, int] = {}  # owner -> waiting items that count
        self._aging_s = aging_interval_s
        self._critical_s = deadline_critical_s
        self._urgent_s = deadline_urgent_s
        self._alpha = ewma_alpha
        self._models: dict[str, _ModelQueue] = {}
        self._where: dict[str, str] = {}  # request_id -> model (waiting)
        self._running: dict[str, Running] = {}  # request_id -> its slot (running)
        self._seq = 0
        self._levels: dict[str | None, str] = {None: "healthy"}
        self._changes: dict[str | None, LevelChange] = {}

    # ------------------------------------------------------------------ configuration
    def reconfigure(
        self,
        *,
        max_queue_per_model: int | None = None,
        max_queue_total: int | None = None,
        aging_interval_s: float | None = None,
        max_queued_per_owner: int | None = None,
    ) -> None:
        """Apply a SIGHUP reload. Lower limits only refuse new work; nothing queued is dropped."""
        with self._lock:
            if max_queued_per_owner is not None:
                self._max_owner = max(0, max_queued_per_owner)
            if max_queue_per_model is not None:
                self._max_model = max(1, max_queue_per_model)
            if max_queue_total is not None:
                self._max_total = max(1, max_queue_total)
            if aging_interval_s is not None:
                self._aging_s = aging_interval_s
            for scope in [None, *self._models]:
                self._note_level(scope)

    def set_slots(self, model: str, n_slots: int) -> None:
        """Tell the scheduler how many sequences a model runs at once (for waits and preemption)."""
        with self._lock:
            self._queue(model).slots = max(1, n_slots)

    def record_service(self, model: str, service_s: float, tokens: int = 0) -> None:
        """Feed one finished request: slot-seconds it took and tokens it generated (EWMA).

        Admission control, ETAs and ``retry_after_ms`` are all predicted from these numbers,
        so they follow the model's real speed on this box instead of a configured guess.
        """
        if service_s <= 0 or not math.isfinite(service_s):
            return
        with self._lock:
            mq = self._queue(model)
            mq.service_s = self._ewma(mq.service_s, service_s)
            if tokens > 0:
                mq.tokens_per_s = self._ewma(mq.tokens_per_s, tokens / service_s)

    # ------------------------------------------------------------------ admission
    def submit(self, item: QueueItem, now: float) -> None:
        """Admit ``item`` or raise at once: ``overloaded`` (queue full, with ``retry_after_ms``),
        ``would_miss_deadline`` (with ``predicted_wait_ms``), ``conflict`` (id already queued)."""
        _check_priority(item.priority)
        with self._lock:
            if item.request_id in self._where or item.request_id in self._running:
                raise InfernoError("conflict", f"request {item.request_id} is already queued")
            mq = self._models.get(item.model)
            depth = len(mq.entries) if mq else 0
            if depth >= self._max_model or len(self._where) >= self._max_total:
                scope = "model " + item.model if depth >= self._max_model else "global"
                retry_ms = self._retry_after_ms(item.model if depth >= self._max_model else None)
                raise InfernoError(
                    "overloaded",
                    f"{scope} queue is full",
                    retry_after_ms=retry_ms,
                )
            mine = self._by_owner.get(item.owner, 0) if item.owner else 0
            if self._max_owner and item.owner and mine >= self._max_owner:
                raise InfernoError(
                    "quota_exceeded",
                    f"{item.owner} already has {mine} requests waiting, its limit "
                    f"(scheduler.max_queued_per_principal)",
                    "wait for some of your requests to start, or cancel some",
                    quota="scheduler.max_queued_per_principal", limit=self._max_owner,
                    used=mine, retry_after_ms=self._retry_after_ms(item.model))
            mq = self._queue(item.model)
            if item.deadline is not None:
                self._admit_deadline(mq, item, now)
            self._insert(mq, item)

    def requeue(self, item: QueueItem, now: float) -> None:
        """Put back a preempted request (or one picked but not started: it leaves the running
        set), keeping its original ``submitted_at`` (and so its age and its place ahead of its
        client's later items). Not an admission: it was admitted once and is never refused, so
        the queue may exceed its bound by at most the number of sequences being preempted (at
        most the slot count) until those resume."""
        del now  # part of the signature so a future policy may use it
        with self._lock:
            if item.request_id in self._where:
                raise InfernoError("conflict", f"request {item.request_id} is already queued")
            self._running.pop(item.request_id, None)
            self._insert(self._queue(item.model), item)

    def _insert(self, mq: _ModelQueue, item: QueueItem) -> None:
        self._seq += 1
        mq.entries[item.request_id] = _Entry(item, self._seq)
        self._where[item.request_id] = item.model
        if item.owner:
            self._by_owner[item.owner] = self._by_owner.get(item.owner, 0) + 1
        self._note_level(item.model)
        self._note_level(None)

    def _admit_deadline(self, mq: _ModelQueue, item: QueueItem, now: float) -> None:
        """Reject now what cannot finish by its deadline, judged by measured throughput.

        Two ways the item may start: its place in today's pick order, or escalation when its
        deadline becomes critical (behind only items with earlier deadlines). The prediction is
        the sooner of the two; with no measurement yet nothing is rejected for being slow.
        """
        assert item.deadline is not None
        left = item.deadline - now
        own = self._service(mq, item)
        if left <= 0:
            wait = 0.0
        elif own is None:
            return
        else:
            probe = _Entry(item, self._seq + 1)
            order = self._order(mq, [*mq.entries.values(), probe], now, None, commit=False)
            ahead = order[: order.index(probe)]
            slots = mq.slots or 1
            plan_wait = sum(self._service(mq, e.item) or 0.0 for e in ahead) / slots
            earlier = [
                e
                for e in mq.entries.values()
                if e.item.deadline is not None and now < e.item.deadline < item.deadline
            ]
            crit_wait = (
                max(0.0, left - self._critical_s)
                + sum(self._service(mq, e.item) or 0.0 for e in earlier) / slots
            )
            wait = min(plan_wait, crit_wait)
            if wait + own <= left:
                return
        raise InfernoError(
            "would_miss_deadline",
            f"predicted wait {wait:.1f}s + run {own or 0.0:.1f}s exceeds the deadline "
            f"({max(left, 0.0):.1f}s away)",
            predicted_wait_ms=int(wait * 1000),
        )

    # ------------------------------------------------------------------ picking
    def pop_ready(self, model: str, n: int, now: float) -> list[QueueItem]:
        """Move up to ``n`` items of ``model`` from waiting to running, in policy order, and
        return them; each holds a slot until :meth:`finish` (or :meth:`requeue`). Expired
        items are never returned (they wait for :meth:`expire`)."""
        with self._lock:
            mq = self._models.get(model)
            if mq is None or n <= 0 or not mq.entries:
                return []
            picked = self._order(mq, list(mq.entries.values()), now, n, commit=True)
            for e in picked:
                self._remove(e.item.request_id)
                self._running[e.item.request_id] = Running(e.item, now)
            return [e.item for e in picked]

    def finish(self, request_id: str) -> QueueItem | None:
        """A running item's slot is free (it ended, however); None if it was not running."""
        with self._lock:
            r = self._running.pop(request_id, None)
            return None if r is None else r.item

    def mark(self, request_id: str, *, preempting: bool | None = None,
             stopping: bool | None = None) -> None:
        """Note what was asked of a running item (a pause for a vip, a stop)."""
        with self._lock:
            r = self._running.get(request_id)
            if r is None:
                return
            self._running[request_id] = replace(
                r, preempting=r.preempting if preempting is None else preempting,
                stopping=r.stopping if stopping is None else stopping)

    def running(self, model: str | None = None) -> list[Running]:
        """Items holding a slot of ``model`` (or of every model), oldest pick first."""
        with self._lock:
            return sorted((r for r in self._running.values()
                           if model is None or r.item.model == model),
                          key=lambda r: r.started_at)

    def running_count(self, model: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._running.values() if model is None or r.item.model == model)

    def free_slots(self, model: str) -> int:
        """Slots of ``model`` a pick may fill now: its slot count less the items running,
        a preempting one excepted (the engine applies commands in order, so the next pick
        is admitted in the very step that pauses the victim). 0 until ``set_slots``."""
        with self._lock:
            mq = self._models.get(model)
            if mq is None or mq.slots is None:
                return 0
            busy = sum(1 for r in self._running.values()
                       if r.item.model == model and not r.preempting)
            return max(0, mq.slots - busy)

    def expire(self, now: float) -> list[QueueItem]:
        """Remove and return every item whose deadline has passed, oldest deadline first."""
        with self._lock:
            gone = [
                e.item
                for mq in self._models.values()
                for e in mq.entries.values()
                if e.item.deadline is not None and e.item.deadline <= now
            ]
            gone.sort(key=lambda it: it.deadline or 0.0)
            for it in gone:
                self._remove(it.request_id)
            return gone

    def cancel(self, request_id: str) -> QueueItem | None:
        """Remove a waiting item; None if it is not waiting (running or unknown: server's turn)."""
        with self._lock:
            return self._remove(request_id)

    def reprioritize(self, request_id: str, priority: str, now: float) -> QueueItem | None:
        """Change an item's requested class, keeping its age; None if neither waiting nor
        running (a running item's new class decides whether a vip may preempt it)."""
        del now  # effective class is computed at pick time; kept for API symmetry
        _check_priority(priority)
        with self._lock:
            model = self._where.get(request_id)
            if model is None:
                r = self._running.get(request_id)
                if r is None:
                    return None
                item = replace(r.item, priority=priority)
                self._running[request_id] = replace(r, item=item)
                return item
            entry = self._models[model].entries[request_id]
            entry.item = replace(entry.item, priority=priority)
            return entry.item

    def _remove(self, request_id: str) -> QueueItem | None:
        model = self._where.pop(request_id, None)
        if model is None:
            return None
        entry = self._models[model].entries.pop(request_id)
        owner = entry.item.owner
        if owner:
            left = self._by_owner.get(owner, 0) - 1
            if left > 0:
                self._by_owner[owner] = left
            else:
                self._by_owner.pop(owner, None)
        self._note_level(model)
        self._note_level(None)
        return entry.item

    # ------------------------------------------------------------------ the policy itself
    def effective_class(self, item: QueueItem, now: float) -> tuple[str, bool]:
        """(effective class, critical) of ``item`` at ``now``: aging and deadline escalation."""
        cls, critical = self._effective(item, now)
        return PRIORITIES[cls], critical

    def _effective(self, item: QueueItem, now: float) -> tuple[int, bool]:
        cls = _INDEX[item.priority]
        if cls > HIGH and self._aging_s > 0:
            steps = int(max(0.0, now - item.submitted_at) // self._aging_s)
            cls = max(HIGH, cls - steps)
        critical = False
        if item.deadline is not None:
            left = item.deadline - now
            critical = left < self._critical_s
            if left < self._urgent_s:
                cls = min(cls, HIGH)
        return cls, critical

    def _order(
        self,
        mq: _ModelQueue,
        entries: list[_Entry],
        now: float,
        limit: int | None,
        *,
        commit: bool,
    ) -> list[_Entry]:
        """The next ``limit`` picks (all when None). ``commit`` advances the fairness state;
        without it the same code answers "where would this item go" for ETAs and admission."""
        critical: list[_Entry] = []
        groups: list[dict[str, deque[_Entry]]] = [{}, {}, {}, {}]
        for e in sorted(entries, key=lambda e: (e.item.submitted_at, e.seq)):
            if e.item.deadline is not None and e.item.deadline <= now:
                continue
            cls, crit = self._effective(e.item, now)
            if crit:
                critical.append(e)
            else:
                groups[cls].setdefault(e.item.client, deque()).append(e)
        critical.sort(key=lambda e: (e.item.deadline, e.item.submitted_at, e.seq))
        passes = mq.passes if commit else list(mq.passes)
        served = mq.served if commit else dict(mq.served)
        vtime, counter, was_active = mq.vtime, mq.counter, mq.active
        total = len(critical) + sum(len(q) for g in groups for q in g.values())
        want = total if limit is None else min(limit, total)
        out: list[_Entry] = critical[:want]
        while len(out) < want:
            active = {c for c in range(4) if groups[c]}
            for c in active - was_active:  # rejoining after idling: no banked credit
                passes[c] = max(passes[c], vtime)
            was_active = active
            cls = min(active, key=lambda c: (passes[c] + _STRIDE[c], c))
            vtime = passes[cls]  # start tag of this pick
            passes[cls] += _STRIDE[cls]  # its finish tag
            clients = groups[cls]
            client = min(
                clients,
                key=lambda cl: (
                    served.get((cls, cl), -1),
                    clients[cl][0].item.submitted_at,
                    clients[cl][0].seq,
                ),
            )
            out.append(clients[client].popleft())
            if not clients[client]:
                del clients[client]
            served[(cls, client)] = counter
            counter += 1
        if commit:
            mq.vtime, mq.counter, mq.active = vtime, counter, was_active
            if len(served) > _SERVED_PRUNE:
                waiting = {e.item.client for e in mq.entries.values()}
                for key in [k for k in served if k[1] not in waiting]:
                    del served[key]
        return out

    def pick_victim(self, model: str, now: float) -> str | None:
        """:meth:`should_preempt` over this scheduler's own running items of ``model`` (those
        not already pausing or stopping); the caller then sends the pause and marks it."""
        candidates = [(r.request_id, r.item.priority, r.started_at) for r in self.running(model)
                      if not r.preempting and not r.stopping]
        return self.should_preempt(model, candidates, now)

    def should_preempt(
        self, model: str, running: list[tuple[str, str, float]], now: float
    ) -> str | None:
        """Which running sequence to pause for a waiting ``vip`` item, if any.

        ``running`` is ``(request_id, priority, started_at)`` for each sequence of ``model``
        that is running and not already being preempted. Returns None unless every slot is busy
        (when ``set_slots`` was never called, the caller is trusted to ask only when full) and a
        ``vip`` item waits. The victim is the lowest class, and among equals the most recently
        started (least work to redo). A ``vip`` is never preempted.
        """
        with self._lock:
            mq = self._models.get(model)
            if mq is None or (mq.slots is not None and len(running) < mq.slots):
                return None
            vip_waiting = sum(
                1
                for e in mq.entries.values()
                if (e.item.deadline is None or e.item.deadline > now)
                and self._effective(e.item, now)[0] == VIP
            )
            if not vip_waiting:
                return None
            candidates = [r for r in running if _check_priority(r[1]) != VIP]
            if not candidates:
                return None
            return max(candidates, key=lambda r: (_INDEX[r[1]], r[2]))[0]

    # ------------------------------------------------------------------ visibility
    def positions(self, now: float) -> dict[str, tuple[int, float | None]]:
        """request_id -> (1-based position in its model's pick order, ETA to start in seconds,
        None until the model's speed has been measured)."""
        with self._lock:
            out: dict[str, tuple[int, float | None]] = {}
            for mq in self._models.values():
                order = self._order(mq, list(mq.entries.values()), now, None, commit=False)
                slots = mq.slots or 1
                elapsed: float | None = 0.0 if mq.service_s is not None else None
                for pos, e in enumerate(order, 1):
                    out[e.item.request_id] = (pos, None if elapsed is None else elapsed / slots)
                    svc = self._service(mq, e.item)
                    elapsed = None if elapsed is None or svc is None else elapsed + svc
            return out

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Every waiting item for ``queue.list``, in pick order per model."""
        with self._lock:
            rows: list[dict[str, Any]] = []
            for model, mq in self._models.items():
                order = self._order(mq, list(mq.entries.values()), now, None, commit=False)
                pos = {e.item.request_id: i for i, e in enumerate(order, 1)}
                for e in sorted(
                    mq.entries.values(), key=lambda e: pos.get(e.item.request_id, math.inf)
                ):
                    it = e.item
                    cls, crit = self._effective(it, now)
                    expired = it.deadline is not None and it.deadline <= now
                    rows.append(
                        {
                            "id": it.request_id,
                            "client": it.client,
                            "class": it.priority,
                            "effective_class": PRIORITIES[cls],
                            "critical": crit,
                            "model": model,
                            "age_s": max(0.0, now - it.submitted_at),
                            "deadline_in_s": None if it.deadline is None else it.deadline - now,
                            "position": pos.get(it.request_id),
                            "state": "expired" if expired else "queued",
                        }
                    )
            return rows

    def depth(self, model: str | None = None) -> int:
        """Waiting items of ``model``, or of all models."""
        with self._lock:
            if model is None:
                return len(self._where)
            mq = self._models.get(model)
            return len(mq.entries) if mq else 0

    def waiting_models(self) -> list[str]:
        """Models with at least one waiting item (where a freed slot has work to take)."""
        with self._lock:
            return [m for m, mq in self._models.items() if mq.entries]

    def level(self, model: str | None = None) -> str:
        """Backpressure level of one model's queue, or of the global queue."""
        with self._lock:
            return self._level(model)

    def poll_level_changes(self) -> list[LevelChange]:
        """Level changes since the last poll, one per queue (a change and its undo cancel out).
        The server calls this after submit/pop/expire/cancel and publishes each as an event."""
        with self._lock:
            changes = list(self._changes.values())
            self._changes.clear()
            return changes

    # ------------------------------------------------------------------ helpers (lock held)
    def _queue(self, model: str) -> _ModelQueue:
        mq = self._models.get(model)
        if mq is None:
            mq = self._models[model] = _ModelQueue()
            self._levels[model] = "healthy"
        return mq

    def _level(self, model: str | None) -> str:
        if model is None:
            return level_for(len(self._where), self._max_total)
        mq = self._models.get(model)
        return level_for(len(mq.entries) if mq else 0, self._max_model)

    def _note_level(self, scope: str | None) -> None:
        new = self._level(scope)
        old = self._levels.get(scope, "healthy")
        if new == old:
            return
        self._levels[scope] = new
        first = self._changes.pop(scope, None)
        origin = first.old if first else old
        if origin != new:
            depth = len(self._where) if scope is None else len(self._models[scope].entries)
            limit = self._max_total if scope is None else self._max_model
            self._changes[scope] = LevelChange(scope, origin, new, depth, limit)

    def _service(self, mq: _ModelQueue, item: QueueItem) -> float | None:
        if item.est_tokens > 0 and mq.tokens_per_s:
            return item.est_tokens / mq.tokens_per_s
        return mq.service_s

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self._alpha * (sample - old)

    def _retry_after_ms(self, model: str | None) -> int:
        """How long until one queue place frees: one request's service time over the slots."""
        queues = [self._models[model]] if model else [m for m in self._models.values() if m.entries]
        waits = [mq.service_s / (mq.slots or 1) for mq in queues if mq.service_s]
        if not waits:
            return _DEFAULT_RETRY_MS
        return int(min(60_000.0, max(10.0, min(waits) * 1000.0)))

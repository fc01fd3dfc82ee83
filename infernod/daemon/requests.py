"""One record per request, from admission to its last event, whatever its kind.

A ``generate`` from a client, a job's item, an ``embed`` and an ``infer`` are all a
:class:`Request`. They differ in :class:`Kind` (which decides the runner that serves them:
a text engine or an ONNX session) and in the fields only one kind fills (a prompt and a
token topic; texts and a reply future), never in how they move:

    QUEUED --pick--> RUNNING --engine ends--> DONE
       |               |  ^
       |               |  +--- preempted: back to QUEUED, resumes from its tokens so far
       +---------------+------ cancelled, expired, failed, aborted: DONE

:meth:`Request.move` is the only way a state changes; any other step raises
:class:`IllegalTransition` (a bug in the daemon, never a client's fault), and each move
stamps its time, so the timestamps always agree with the state.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infernod.daemon.budget import Hold
from infernod.daemon.scheduler import Scheduler
from infernod.protocol.bodies import QueueRow, QueueSnapshot, to_wire
from infernod.protocol.errors import InfernoError

Publish = Callable[[str, str, dict[str, Any]], object]  # Publisher.publish
ProfileHook = Callable[["Request", str, dict[str, Any]], None]  # a request ended: reason, stats
RunStartHook = Callable[["Request"], None]  # a runner started it (again, after a preemption)


class Kind(enum.StrEnum):
    GENERATE = "generate"  # a client's generate: streams tokens on tokens.<request id>
    JOB_ITEM = "job-item"  # one prompt of a batch job: a generate whose text is kept
    EMBED = "embed"  # request/reply on an ONNX text encoder
    INFER = "infer"  # request/reply on a generic ONNX model

    @property
    def generates(self) -> bool:
        """Served by a text engine (GGUF, in its runner), not an ONNX session."""
        return self in (Kind.GENERATE, Kind.JOB_ITEM)

    @property
    def wire(self) -> str:
        """The ``kind`` of a queue row: a job item shows as a generate (with its job id)."""
        return "generate" if self.generates else self.value


class State(enum.StrEnum):
    QUEUED = "queued"  # waiting in the scheduler (first time, or preempted to resume)
    RUNNING = "running"  # handed to its model's engine; the scheduler counts it running
    DONE = "done"  # its last event was published (done/error event, or the reply)


ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.DONE}),
    State.RUNNING: frozenset({State.QUEUED, State.DONE}),
    State.DONE: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A request was asked to move where its lifecycle does not go."""


@dataclass(eq=False)
class Request:
    """A request's whole life in the daemon. Only the event-loop thread touches it."""

    request_id: str
    kind: Kind
    session: str
    model: str
    body: dict[str, Any]
    priority: str
    submitted: float  # monotonic, at admission
    deadline: float | None  # monotonic
    timeout_s: float
    stall_timeout_s: float = 0.0  # generating kinds: longest silence between tokens
    prompt: str = ""  # generating kinds: the rendered prompt
    topic: str = ""  # generating kinds: tokens.<request id>
    client: str = ""
    principal: str = ""  # the sender's uid:N / key:NAME (cancel: owner or operator)
    connection: str = ""  # the connection's principal: its lease, its stream subscription
    job: tuple[str, int] | None = None  # (job id, item index) of a job item
    state: State = field(default=State.QUEUED, init=False)
    # timestamps (monotonic): admitted = picked for a slot (the latest pick after a
    # preemption), first_token, last_event (stall watch), finished = moved to DONE
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_event_at: float | None = None
    finished_at: float | None = None
    load_wait_s: float = 0.0
    n_tokens: int = 0
    slot: int | None = None  # generating kinds: the engine's slot (sequence) while it runs
    cached_tokens: int | None = None  # of its prompt, reused from that slot's cache
    abort: tuple[str, str] | None = None  # (code, message) asked of a running request
    resume_tokens: list[int] = field(default_factory=list)  # preempted: its tokens so far
    on_done: Callable[[Request, str, dict[str, Any]], None] | None = None
    on_start: Callable[[Request], None] | None = None  # each time an engine starts it
    text: list[str] | None = None  # when a list, every text delta is kept (job results)
    itl_gaps_ms: list[float] | None = None  # the engine's raw inter-token gaps (profiles)
    hold: Hold | None = None  # the request's bytes, charged until it finishes (budget.py)
    future: asyncio.Future[dict[str, Any]] | None = None  # embed/infer: the handler's reply

    def move(self, to: State, now: float) -> None:
        """Change state, or raise IllegalTransition; stamps ``admitted_at`` on RUNNING and
        ``finished_at`` on DONE."""
        if to not in ALLOWED[self.state]:
            raise IllegalTransition(f"request {self.request_id}: {self.state} -> {to}")
        self.state = to
        if to is State.RUNNING:
            self.admitted_at = now
            self.last_event_at = now
        elif to is State.DONE:
            self.finished_at = now

    @property
    def op(self) -> str:
        """embed / infer / generate: what the profile and log lines call it."""
        return self.kind.wire

    @property
    def n_texts(self) -> int:
        return len(self.body.get("texts") or ()) if self.kind is Kind.EMBED else 0


class RequestTable:
    """Every live request of every kind, by id: the record the daemon's core holds from
    admission to the last event. The request service (daemon/lifecycle.py) adds and removes
    them; everyone reads one table, and the ``queue`` topic is published from here alone."""

    def __init__(self, scheduler: Scheduler, publish: Publish) -> None:
        self.scheduler = scheduler
        self._publish = publish
        self._by_id: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        if req.request_id in self._by_id:
            raise InfernoError("conflict", f"request id {req.request_id} is already in use",
                               "use a fresh message id per request")
        self._by_id[req.request_id] = req

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def pop(self, request_id: str) -> Request | None:
        return self._by_id.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def values(self, *, generates: bool | None = None) -> list[Request]:
        """A copy (callers end requests while they iterate), optionally of one runner kind."""
        return [r for r in self._by_id.values()
                if generates is None or r.kind.generates == generates]

    def publish_queue(self) -> None:
        self._publish("queue", "queue", to_wire(self.queue_snapshot(time.monotonic())))

    def queue_snapshot(self, now: float, model: str | None = None) -> QueueSnapshot:
        """queue.list's reply and the ``queue`` topic's body: every live request of every
        kind (``model``'s only, if given), running and waiting as the scheduler holds them."""
        rows: list[QueueRow] = []
        for r in self.scheduler.running(model):
            rec = self._by_id.get(r.request_id)
            if rec is not None:
                rows.append(self._row(rec, now, "preempting" if r.preempting else "running"))
        for w in self.scheduler.snapshot(now):
            rec = self._by_id.get(w["id"])
            if rec is not None and model in (None, rec.model):
                rows.append(self._row(rec, now, "queued", w))
        models = sorted({row["model"] for row in rows})
        return queue_snapshot(sort_rows(rows), self.scheduler.level(),
                              {m: self.scheduler.level(m) for m in models})

    @staticmethod
    def _row(rec: Request, now: float, state: str,
             waiting: Mapping[str, Any] | None = None) -> QueueRow:
        return queue_row(now, request_id=rec.request_id, kind=rec.kind.wire,
                         client=rec.client or rec.session, session=rec.session,
                         model=rec.model, priority=rec.priority, state=state,
                         submitted=rec.submitted, deadline=rec.deadline, tokens=rec.n_tokens,
                         job=rec.job[0] if rec.job else None,
                         preempted=bool(rec.resume_tokens), waiting=waiting,
                         slot=rec.slot if state == "running" else None,
                         cached_tokens=rec.cached_tokens if state == "running" else None)


def queue_row(now: float, *, request_id: str, kind: str, client: str, session: str,
              model: str, priority: str, state: str, submitted: float,
              deadline: float | None, tokens: int = 0, job: str | None = None,
              preempted: bool = False, waiting: Mapping[str, Any] | None = None,
              slot: int | None = None, cached_tokens: int | None = None) -> QueueRow:
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
        "slot": slot, "cached_tokens": cached_tokens,
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

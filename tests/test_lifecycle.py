"""One owner of "who is running": the scheduler. RequestService and QueueService on the
real Scheduler with a scripted engine, no daemon: through admission, a vip's preemption, a
cancel and a runner crash, the scheduler's running view, the request records' states and
queue.list's rows always name the same requests."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from infernod.backends.base import GenerationRequest
from infernod.daemon.lifecycle import RequestService
from infernod.daemon.models import LoadedModel
from infernod.daemon.queue import QueueService
from infernod.daemon.requests import Kind, Request, RequestTable, State
from infernod.daemon.scheduler import Scheduler
from infernod.model_settings import SettingsStore

M = "m"


class _Engine:
    """Records the commands; the test plays the engine's events back by hand."""

    n_slots = 2

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.preempted: list[str] = []
        self.cancelled: list[str] = []

    def submit(self, request: GenerationRequest) -> None:
        self.submitted.append(request.request_id)

    def preempt(self, request_id: str) -> None:
        self.preempted.append(request_id)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def free_slots(self) -> int:  # never asked: the scheduler counts slots
        raise AssertionError("free_slots is the scheduler's answer now")


class _Models:
    def __init__(self, engine: _Engine) -> None:
        self.loaded = {M: LoadedModel(name=M, info=None, engine=engine,  # type: ignore[arg-type]
                                      state="loaded")}
        self.user: Any = None
        self.settings = SettingsStore()  # no model settings: the request's own values

    def attach(self, user: Any) -> None:
        self.user = user

    def check_generate(self, name: str) -> None:
        pass

    async def load_for_request(self, name: str, keep_alive: object,
                               wanted: object = None) -> float:
        return 0.0


class _Publisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def open_stream(self, request_id: str, owner: str, connection: str = "") -> str:
        return request_id

    def close_stream(self, request_id: str) -> None:
        pass

    def publish(self, topic: str, type_: str, body: dict[str, Any]) -> int:
        self.events.append((topic, type_))
        return 0


def _gen(n: int, priority: str = "low") -> Request:
    rid = f"s.{n}"
    return Request(kind=Kind.GENERATE, request_id=rid, session="s", model=M,
                   body={"max_tokens": 8}, priority=priority, submitted=time.monotonic(),
                   deadline=None, timeout_s=60, stall_timeout_s=60, prompt="p",
                   topic=f"tokens.{rid}")


def _agree(gen: RequestService, queue: QueueService, sched: Scheduler) -> set[str]:
    """The invariant: one answer to "who is running", whoever is asked."""
    now = time.monotonic()
    by_scheduler = {r.request_id for r in sched.running(M)}
    by_records = {g.request_id for g in gen.requests.values() if g.state is State.RUNNING}
    rows = queue.snapshot(now)["items"]
    by_rows = {r["id"] for r in rows if r["state"] in ("running", "preempting")}
    waiting = {r["id"] for r in rows if r["state"] == "queued"}
    assert by_scheduler == by_records == by_rows, (by_scheduler, by_records, by_rows)
    assert waiting == {g.request_id for g in gen.requests.values() if g.state is State.QUEUED}
    assert sched.running_count(M) == len(by_scheduler)
    holding = [r for r in sched.running(M) if not r.preempting]  # a pausing one gave its slot
    assert len(holding) + sched.free_slots(M) == _Engine.n_slots
    return by_scheduler


async def test_running_has_one_owner_through_preemption_cancel_and_crash() -> None:
    engine = _Engine()
    sched = Scheduler()
    models = _Models(engine)
    cfg = SimpleNamespace(scheduler=SimpleNamespace())
    publisher = _Publisher()
    table = RequestTable(sched, publisher.publish)
    gen = RequestService(cfg, models, sched, publisher, table)  # type: ignore[arg-type]
    queue = QueueService(gen, sched, models, publisher, table)  # type: ignore[arg-type]

    for n in range(4):
        gen.submit(_gen(n))
        queue.admitted(M)
    await asyncio.sleep(0.01)  # the admissions' load step
    assert _agree(gen, queue, sched) == {"s.0", "s.1"}
    assert engine.submitted == ["s.0", "s.1"]
    for rid in ("s.0", "s.1"):
        gen.on_started(rid, {})
        gen.on_tokens(rid, "x", 1)

    # a vip facing full slots: the victim is marked preempting, the vip takes its slot
    gen.submit(_gen(9, "vip"))
    await asyncio.sleep(0.01)
    queue.admitted(M)
    assert len(engine.preempted) == 1 and engine.preempted[0] in ("s.0", "s.1")
    victim = engine.preempted[0]
    other = ({"s.0", "s.1"} - {victim}).pop()
    rows = {r["id"]: r["state"] for r in queue.snapshot(time.monotonic())["items"]}
    assert rows[victim] == "preempting" and rows["s.9"] == "running"
    assert _agree(gen, queue, sched) == {"s.0", "s.1", "s.9"}
    assert sched.free_slots(M) == 0
    queue.tick(time.monotonic())  # no second victim while one pauses
    assert len(engine.preempted) == 1
    gen.on_finished(victim, "preempted", {"generated_tokens": [7]})
    assert table.get(victim).state is State.QUEUED and table.get(victim).resume_tokens == [7]
    assert _agree(gen, queue, sched) == {other, "s.9"}

    # a cancel of a running request: it stays running until the engine says it ended
    assert gen.cancel(other) == "cancelling"
    assert _agree(gen, queue, sched) == {other, "s.9"}
    assert sched.pick_victim(M, time.monotonic()) is None  # never the one stopping
    gen.on_finished(other, "cancelled", {})
    running = _agree(gen, queue, sched)
    assert other not in table
    assert running == {"s.9", victim}  # the freed slot went to the preempted one: oldest

    # the runner dies: every running request ends, queued ones wait for the reload
    models.user.model_failed(M, "runner died", "hint")
    assert _agree(gen, queue, sched) == set()
    assert {g.request_id for g in table.values()} == {"s.2", "s.3"}
    await asyncio.sleep(0.01)  # the reload: the queued ones start
    assert _agree(gen, queue, sched) == {"s.2", "s.3"}
    for rid in ("s.2", "s.3"):
        gen.on_finished(rid, "stop", {"completion_tokens": 1})
    assert _agree(gen, queue, sched) == set() and not len(table)

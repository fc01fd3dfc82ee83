"""Unit tests of the queueing policy. Time is always passed in: no sleeps, no real clock."""

from __future__ import annotations

import itertools
import sys
import threading
from collections import Counter

import pytest

from infernod.daemon.scheduler import LevelChange, QueueItem, Scheduler
from infernod.protocol.errors import InfernoError

M = "gemma"
_ids = itertools.count()


def item(
    priority: str = "normal",
    client: str = "c",
    t: float = 0.0,
    *,
    model: str = M,
    deadline: float | None = None,
    est_tokens: int = 0,
    rid: str | None = None,
) -> QueueItem:
    return QueueItem(rid or f"r{next(_ids)}", client, model, priority, t, deadline, est_tokens)


def picks(s: Scheduler, n: int, now: float, model: str = M) -> list[QueueItem]:
    return s.pop_ready(model, n, now)


# ---------------------------------------------------------------- weighted fair ordering
@pytest.mark.parametrize("batch", [1, 4])
def test_weighted_shares_over_10000_picks(batch: int) -> None:
    s = Scheduler(max_queue_per_model=1000, max_queue_total=1000)
    for cls in ("vip", "high", "normal", "low"):
        for i in range(10):
            s.submit(item(cls, client=f"{cls}{i % 3}"), 0.0)
    counts: Counter[str] = Counter()
    first_low = None
    for _ in range(10_000 // batch):
        for it in s.pop_ready(M, batch, 0.0):
            counts[it.priority] += 1
            if it.priority == "low" and first_low is None:
                first_low = sum(counts.values())
            s.submit(item(it.priority, client=it.client), 0.0)  # keep every class backlogged
    total = sum(counts.values())
    assert total == 10_000
    for cls, weight in (("vip", 8), ("high", 4), ("normal", 2), ("low", 1)):
        expected = total * weight / 15
        assert abs(counts[cls] - expected) <= 0.05 * expected, (cls, counts)
    assert first_low is not None and first_low <= 15  # low progresses from the first round


def test_idle_class_does_not_bank_credit() -> None:
    """A class that was empty rejoins at the current virtual time instead of with a burst."""
    s = Scheduler()
    for _ in range(50):
        s.submit(item("vip"), 0.0)
    assert len(picks(s, 40, 0.0)) == 40
    for _ in range(20):
        s.submit(item("low"), 0.0)
    first9 = [it.priority for it in picks(s, 9, 0.0)]
    assert first9.count("low") <= 2


# ---------------------------------------------------------------- round robin between clients
def test_round_robin_inside_a_class() -> None:
    s = Scheduler()
    for _ in range(100):
        s.submit(item("normal", client="A"), 0.0)
    b = item("normal", client="B")
    s.submit(b, 0.0)
    got = picks(s, 2, 0.0)
    assert b in got


def test_round_robin_alternates_three_clients() -> None:
    s = Scheduler()
    for c in "ABC":
        for _ in range(5):
            s.submit(item("low", client=c), 0.0)
    order = [it.client for it in picks(s, 9, 0.0)]
    assert order == list("ABC" * 3)


# ---------------------------------------------------------------- aging
def test_aging_promotes_one_class_per_interval_up_to_high() -> None:
    s = Scheduler(aging_interval_s=10.0)
    low = item("low", t=0.0)
    assert s.effective_class(low, 9.99) == ("low", False)
    assert s.effective_class(low, 10.0) == ("normal", False)
    assert s.effective_class(low, 20.0) == ("high", False)
    assert s.effective_class(low, 30.0) == ("high", False)  # aging never makes a vip
    assert s.effective_class(low, 500.0) == ("high", False)
    assert s.effective_class(item("vip"), 500.0) == ("vip", False)


def test_low_waiting_30s_is_picked_like_high() -> None:
    s = Scheduler(aging_interval_s=10.0)
    old_low = item("low", client="a", t=0.0)
    s.submit(old_low, 0.0)
    s.submit(item("high", client="b", t=30.0), 30.0)
    s.submit(item("normal", client="b", t=30.0), 30.0)
    assert picks(s, 1, 30.0)[0] is old_low  # same class as the fresh high, and older


def test_without_enough_age_low_still_waits() -> None:
    s = Scheduler(aging_interval_s=10.0)
    s.submit(item("low", client="a", t=0.0), 0.0)
    fresh = item("normal", client="b", t=9.0)
    s.submit(fresh, 9.0)
    assert picks(s, 1, 9.0)[0] is fresh


# ---------------------------------------------------------------- deadlines
def test_expired_item_is_never_picked_and_expire_returns_it() -> None:
    s = Scheduler()
    doomed = item("vip", deadline=5.0)
    s.submit(doomed, 0.0)
    assert s.expire(4.9) == []
    assert picks(s, 1, 6.0) == []
    assert s.snapshot(6.0)[0]["state"] == "expired"
    assert s.expire(6.0) == [doomed]
    assert s.depth(M) == 0 and s.expire(7.0) == []


def test_critical_deadline_jumps_the_queue() -> None:
    s = Scheduler()
    for _ in range(10):
        s.submit(item("vip"), 0.0)
    late = item("low", deadline=60.0)
    soon = item("low", deadline=8.0)
    sooner = item("low", deadline=5.0)
    for it in (late, soon, sooner):
        s.submit(it, 0.0)
    assert s.effective_class(sooner, 0.0) == ("high", True)
    assert picks(s, 2, 0.0) == [sooner, soon]  # earliest deadline first
    assert late not in picks(s, 5, 0.0)


def test_urgent_deadline_is_at_least_high() -> None:
    s = Scheduler()
    for _ in range(5):
        s.submit(item("normal", client="n"), 0.0)
    urgent = item("low", client="u", deadline=25.0)
    s.submit(urgent, 0.0)
    assert s.effective_class(urgent, 0.0) == ("high", False)
    assert picks(s, 1, 0.0) == [urgent]


def test_would_miss_deadline_from_measured_throughput() -> None:
    s = Scheduler()
    s.set_slots(M, 1)
    for _ in range(20):
        s.submit(item("normal", client="a", deadline=20.0), 0.0)
    probe = item("normal", client="a", deadline=20.5)
    s.submit(probe, 0.0)  # nothing measured yet: no grounds to reject
    assert s.cancel(probe.request_id) is probe
    s.record_service(M, 1.0)
    with pytest.raises(InfernoError) as ei:
        s.submit(item("normal", client="a", deadline=20.5), 0.0)
    assert ei.value.code == "would_miss_deadline"
    assert ei.value.extra["predicted_wait_ms"] == 20_000  # 20 items of 1 s ahead, one slot
    s.submit(item("normal", client="a", deadline=45.0), 0.0)  # a later deadline fits
    s.set_slots(M, 4)  # four slots drain the same queue four times faster
    s.submit(item("normal", client="a", deadline=20.5), 0.0)


def test_would_miss_deadline_when_the_run_alone_is_too_long() -> None:
    s = Scheduler()
    s.record_service(M, 5.0, tokens=100)  # 20 tokens/s per sequence
    with pytest.raises(InfernoError) as ei:
        s.submit(item(deadline=3.0, est_tokens=100), 0.0)
    assert ei.value.code == "would_miss_deadline" and ei.value.extra["predicted_wait_ms"] == 0
    s.submit(item(deadline=3.0, est_tokens=40), 0.0)  # 2 s of work fits in 3 s
    with pytest.raises(InfernoError) as ei:
        s.submit(item(deadline=1.0), 2.0)  # already past
    assert ei.value.code == "would_miss_deadline"


def test_ewma_follows_recent_measurements() -> None:
    s = Scheduler(ewma_alpha=0.5)
    s.set_slots(M, 1)
    s.record_service(M, 4.0)
    s.record_service(M, 2.0)  # ewma 3.0
    s.submit(item(rid="x"), 0.0)
    s.submit(item(rid="y"), 0.0)
    assert s.positions(0.0) == {"x": (1, 0.0), "y": (2, 3.0)}


# ---------------------------------------------------------------- backpressure
class _SlowAdmission(Scheduler):
    """Widens the window between the bound check and the insert (deadline admission runs
    there), so a check-then-act race would show up in nearly every round."""

    def _admit_deadline(self, mq, item, now):  # type: ignore[no-untyped-def]
        sum(range(2000))  # bytecode-heavy: the interpreter switches threads in here
        return super()._admit_deadline(mq, item, now)


@pytest.mark.parametrize("round_", range(3))
def test_per_model_bound_under_16_threads(round_: int) -> None:
    s = _SlowAdmission(max_queue_per_model=100, max_queue_total=10_000)
    accepted, rejected = _hammer(s, lambda t, i: M)
    assert accepted == 100 and rejected == 16 * 50 - 100
    assert s.depth(M) == 100


@pytest.mark.parametrize("round_", range(3))
def test_global_bound_under_16_threads(round_: int) -> None:
    s = _SlowAdmission(max_queue_per_model=10_000, max_queue_total=137)
    accepted, _ = _hammer(s, lambda t, i: f"m{(t + i) % 5}")
    assert accepted == 137 and s.depth() == 137


def _hammer(s: Scheduler, model_of) -> tuple[int, int]:
    barrier = threading.Barrier(16)
    results: list[str] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        barrier.wait(timeout=60)
        for i in range(50):
            try:
                s.submit(
                    item(client=f"t{t}", model=model_of(t, i), rid=f"t{t}-{i}", deadline=1e9), 0.0
                )
                out = "ok"
            except InfernoError as e:
                out = e.code
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to provoke races
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    finally:
        sys.setswitchinterval(old_interval)
    assert set(results) <= {"ok", "overloaded"}
    return results.count("ok"), results.count("overloaded")


def test_overloaded_carries_retry_after_ms() -> None:
    s = Scheduler(max_queue_per_model=2, max_queue_total=3)
    s.submit(item(), 0.0)
    s.submit(item(), 0.0)
    with pytest.raises(InfernoError) as ei:
        s.submit(item(), 0.0)
    assert ei.value.code == "overloaded" and ei.value.extra["retry_after_ms"] == 1000
    s.record_service(M, 2.0)
    s.set_slots(M, 4)
    with pytest.raises(InfernoError) as ei:
        s.submit(item(), 0.0)
    assert ei.value.extra["retry_after_ms"] == 500  # one place frees every 2 s / 4 slots
    s.submit(item(model="other"), 0.0)  # global queue now full (3)
    with pytest.raises(InfernoError) as ei:
        s.submit(item(model="third"), 0.0)
    assert ei.value.code == "overloaded" and "global" in ei.value.message
    assert ei.value.to_wire()["retry_after_ms"] == 500


def test_levels_change_at_70_and_90_percent() -> None:
    s = Scheduler(max_queue_per_model=10, max_queue_total=1000)
    levels = []
    for _ in range(10):
        s.submit(item(), 0.0)
        levels.append(s.level(M))
    assert levels == ["healthy"] * 6 + ["elevated"] * 3 + ["critical"]
    assert s.level() == "healthy"  # 10 of 1000 globally
    changes = s.poll_level_changes()
    assert changes == [LevelChange(M, "healthy", "critical", 10, 10)]  # coalesced per queue
    assert s.poll_level_changes() == []
    picks(s, 1, 0.0)
    assert s.poll_level_changes() == [LevelChange(M, "critical", "elevated", 9, 10)]
    extra = item()
    s.submit(extra, 0.0)
    s.cancel(extra.request_id)  # up and back down between polls: nothing to publish
    assert s.poll_level_changes() == []
    picks(s, 3, 0.0)
    assert s.level(M) == "healthy"
    assert s.poll_level_changes() == [LevelChange(M, "elevated", "healthy", 6, 10)]


def test_global_level_changes_are_reported_with_model_none() -> None:
    s = Scheduler(max_queue_per_model=100, max_queue_total=10)
    for i in range(7):
        s.submit(item(model=f"m{i}"), 0.0)
    assert s.level() == "elevated"
    assert LevelChange(None, "healthy", "elevated", 7, 10) in s.poll_level_changes()


# ---------------------------------------------------------------- operator actions
def test_cancel_and_reprioritize() -> None:
    s = Scheduler()
    a, b, c = item("low", rid="a"), item("low", rid="b"), item("low", rid="c")
    for it in (a, b, c):
        s.submit(it, 0.0)
    assert s.cancel("b") is b and s.cancel("b") is None and s.cancel("nope") is None
    s.submit(item("normal", client="z"), 0.0)
    moved = s.reprioritize("c", "vip", 1.0)
    assert moved is not None and moved.priority == "vip" and moved.submitted_at == 0.0
    assert picks(s, 1, 1.0)[0].request_id == "c"
    assert s.reprioritize("missing", "vip", 1.0) is None
    with pytest.raises(InfernoError) as ei:
        s.reprioritize("a", "urgent!", 1.0)
    assert ei.value.code == "bad_request"
    assert [it.priority for it in picks(s, 5, 1.0)] == ["normal", "low"]  # z, then a


def test_duplicate_id_and_bad_priority_are_rejected() -> None:
    s = Scheduler()
    s.submit(item(rid="same"), 0.0)
    with pytest.raises(InfernoError) as ei:
        s.submit(item(rid="same"), 0.0)
    assert ei.value.code == "conflict"
    with pytest.raises(InfernoError) as ei:
        s.submit(item("urgent"), 0.0)
    assert ei.value.code == "bad_request" and s.depth() == 1


def test_requeue_keeps_original_submitted_at() -> None:
    s = Scheduler(max_queue_per_model=2)
    first = item("low", client="a", t=0.0)
    s.submit(first, 0.0)
    assert picks(s, 1, 1.0) == [first]  # started, then preempted
    later = item("low", client="a", t=2.0)
    s.submit(later, 2.0)
    s.submit(item("low", client="a", t=2.5), 2.5)  # queue now full
    s.requeue(first, 3.0)  # never refused: it was already admitted
    assert s.depth(M) == 3
    assert picks(s, 1, 3.0) == [first]
    assert s.effective_class(first, 20.0)[0] == "high"  # its age counts from 0, not from 3


# ---------------------------------------------------------------- running
def test_a_pick_runs_until_finished_or_requeued_and_the_slots_follow() -> None:
    s = Scheduler()
    s.set_slots(M, 2)
    a, b, c = item("low", t=0.0), item("low", t=1.0), item("vip", t=2.0)
    for it in (a, b, c):
        s.submit(it, 3.0)
    assert [x.request_id for x in picks(s, s.free_slots(M), 4.0)] == [c.request_id,
                                                                      a.request_id]
    assert [r.request_id for r in s.running(M)] == [c.request_id, a.request_id]
    assert (s.free_slots(M), s.depth(M), s.running_count()) == (0, 1, 2)
    with pytest.raises(InfernoError):  # a running id is in use, like a waiting one
        s.submit(item(rid=a.request_id), 4.0)
    s.mark(a.request_id, preempting=True)  # its slot is as good as free
    assert s.free_slots(M) == 1 and s.running_count(M) == 2
    s.requeue(a, 5.0)  # paused: back to waiting, no longer running
    assert s.running_count(M) == 1 and s.depth(M) == 2
    s.reprioritize(c.request_id, "low", 5.0)  # a running item's class changes too
    assert s.running(M)[0].item.priority == "low"
    finished = s.finish(c.request_id)
    assert finished is not None and finished.priority == "low"
    assert s.finish(c.request_id) is None and s.free_slots(M) == 2 and not s.running()


def test_pick_victim_reads_the_schedulers_own_running_view() -> None:
    s = Scheduler()
    s.set_slots(M, 2)
    for it in (item("low", t=0.0, rid="l"), item("normal", t=1.0, rid="n")):
        s.submit(it, 1.0)
    picks(s, 2, 2.0)
    s.submit(item("vip", rid="v"), 3.0)
    assert s.pick_victim(M, 3.0) == "l"
    s.mark("l", stopping=True)  # being cancelled: its slot frees anyway
    assert s.pick_victim(M, 3.0) is None
    s.mark("l", stopping=False, preempting=True)
    assert s.pick_victim(M, 3.0) is None  # one pause at a time per freed slot


# ---------------------------------------------------------------- preemption
def test_should_preempt_picks_lowest_class_and_never_a_vip() -> None:
    s = Scheduler()
    s.set_slots(M, 4)
    running = [("v", "vip", 0.0), ("n", "normal", 1.0), ("l1", "low", 2.0), ("l2", "low", 3.0)]
    assert s.should_preempt(M, running, 5.0) is None  # nobody waits
    s.submit(item("high", t=5.0), 5.0)
    assert s.should_preempt(M, running, 5.0) is None  # only vip preempts
    s.submit(item("vip", t=5.0), 5.0)
    assert s.should_preempt(M, running, 5.0) == "l2"  # lowest class, least work lost
    assert s.should_preempt(M, running[:3], 5.0) is None  # a slot is free
    assert s.should_preempt(M, [("v", "vip", 0.0)] * 4, 5.0) is None
    assert (
        s.should_preempt(
            M,
            [("v", "vip", 0.0), ("h", "high", 0.0), ("n", "normal", 0.0), ("v2", "vip", 0.0)],
            5.0,
        )
        == "n"
    )


def test_aged_item_does_not_preempt() -> None:
    s = Scheduler(aging_interval_s=1.0)
    s.submit(item("low", t=0.0), 0.0)
    assert s.should_preempt(M, [("l", "low", 0.0)], 1000.0) is None


# ---------------------------------------------------------------- visibility
def test_positions_and_snapshot() -> None:
    s = Scheduler()
    s.set_slots(M, 2)
    s.submit(item("low", client="a", rid="lo", t=0.0), 0.0)
    s.submit(item("vip", client="b", rid="vp", t=1.0, deadline=100.0), 1.0)
    s.submit(item("normal", client="c", rid="nm", t=2.0, est_tokens=50), 2.0)
    pos = s.positions(4.0)
    assert [r for r, _ in sorted(pos.items(), key=lambda kv: kv[1][0])] == ["vp", "nm", "lo"]
    assert all(eta is None for _, eta in pos.values())  # nothing measured yet
    s.record_service(M, 2.0, tokens=20)  # 10 tokens/s, 2 s per request
    pos = s.positions(4.0)
    assert pos == {"vp": (1, 0.0), "nm": (2, 1.0), "lo": (3, 3.5)}  # (2 + 50/10) / 2 slots
    rows = s.snapshot(11.0)
    # lo aged to normal (nm not yet) and is older than nm
    assert [r["id"] for r in rows] == ["vp", "lo", "nm"]
    lo = rows[1]
    assert lo["class"] == "low" and lo["effective_class"] == "normal"
    assert lo["age_s"] == 11.0 and lo["deadline_in_s"] is None and lo["state"] == "queued"
    assert rows[0]["deadline_in_s"] == 89.0 and rows[0]["model"] == M
    assert s.waiting_models() == [M]

"""What the scheduler holds: a waiting item, a running one, a change of backpressure level.

Plain records, apart from the policy in :mod:`infernod.daemon.scheduler` that moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

ELEVATED_FILL = 0.70  # fill >= 70 % -> elevated
CRITICAL_FILL = 0.90  # fill > 90 % -> critical


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One waiting request. ``payload`` is the server's own data; the scheduler never reads it."""

    request_id: str
    client: str
    model: str
    priority: str = "normal"
    submitted_at: float = 0.0
    deadline: float | None = None  # absolute, same monotonic clock as ``now``
    est_tokens: int = 0  # expected output tokens; 0 = unknown
    payload: object = None
    # the principal whose quota it counts against (max_queued_per_owner); "" = none (job
    # items: their job's quota applies when it is submitted)
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Running:
    """One request holding a slot: picked by ``pop_ready``, not yet finished or requeued."""

    item: QueueItem
    started_at: float  # the pick (the latest one for a preempted request that resumed)
    preempting: bool = False  # asked to pause for a vip; its slot is as good as free
    stopping: bool = False  # asked to stop (cancel, timeout): not a preemption victim

    @property
    def request_id(self) -> str:
        return self.item.request_id


@dataclass(frozen=True, slots=True)
class LevelChange:
    """A queue's backpressure level moved; ``model`` is None for the global queue."""

    model: str | None
    old: str
    new: str
    depth: int
    limit: int


def level_for(depth: int, limit: int) -> str:
    """healthy below 70 % fill, elevated from 70 % to 90 %, critical above 90 %."""
    fill = depth / limit if limit > 0 else 1.0
    if fill > CRITICAL_FILL:
        return "critical"
    if fill >= ELEVATED_FILL:
        return "elevated"
    return "healthy"

"""Parking: keeping a preempted request's KV cells on a spare sequence id until it resumes.

When every slot is busy, a vip is admitted into the slot of the request it preempted and
overwrites its cells, so the victim would recompute its whole context on resume. Instead the
engine copies the victim's cells to a *park* first (``llama_memory_seq_cp``: in a unified KV
cache the copy shares the cells, it costs no new ones). The park is then one more prefix-reuse
candidate at admission: the resumed request copies the cells back into its slot and the park
is dropped. Parks are a cache, never a reservation: the oldest is evicted (``seq_rm``) when a
new one is needed and all are taken, when an admission's prompt would not fit, and when
``llama_decode`` finds no room for a batch.

Pure bookkeeping plus three native calls; owned by the decode thread like the slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from infernod.backends import llama_native as native
from infernod.backends.runstate import Slot


def park_count(n_slots: int, configured: int | None) -> int:
    """How many parks an engine gets: ``models.park_slots``, where None or -1 means half the
    slots (at least one) and 0 turns parking off."""
    return max(1, n_slots // 2) if configured is None or configured < 0 else configured


@dataclass
class Park:
    """A spare llama.cpp sequence id; ``kv`` mirrors the tokens whose cells it holds."""

    seq_id: int
    kv: list[int] = field(default_factory=list)
    request_id: str | None = None
    parked_ns: int = 0


class ParkingLot:
    """``n`` parks on sequence ids ``first_seq_id ..``; least recently parked is evicted first."""

    def __init__(self, first_seq_id: int, n: int) -> None:
        self.parks = [Park(first_seq_id + i) for i in range(n)]
        self.evictions = {"lru": 0, "admission": 0, "decode": 0}  # parks dropped, by cause
        self._mem: Any = None

    def attach(self, mem: Any) -> None:
        self._mem = mem

    def occupied(self) -> list[Park]:
        return [p for p in self.parks if p.kv]

    def park(self, slot: Slot, request_id: str) -> Park | None:
        """Share ``slot``'s cells with a free park (evicting the oldest if none is free)."""
        if not self.parks or not slot.kv:
            return None
        park = min(self.parks, key=lambda p: (len(p.kv) > 0, p.parked_ns))
        llama = native.bindings()
        if park.kv:
            self.drop(park, evicted="lru")
        llama.llama_memory_seq_cp(self._mem, slot.seq_id, park.seq_id, -1, -1)
        park.kv = list(slot.kv)
        park.request_id = request_id
        park.parked_ns = time.perf_counter_ns()
        return park

    def drop(self, park: Park, evicted: str | None = None) -> None:
        native.bindings().llama_memory_seq_rm(self._mem, park.seq_id, -1, -1)
        park.kv = []
        park.request_id = None
        if evicted is not None:
            self.evictions[evicted] += 1

    def drop_request(self, request_id: str) -> None:
        for p in self.occupied():
            if p.request_id == request_id:
                self.drop(p)

    def evict_oldest(self, cause: str = "decode") -> bool:
        """Drop the least recently parked sequence; False when there is none."""
        taken = self.occupied()
        if not taken:
            return False
        self.drop(min(taken, key=lambda p: p.parked_ns), evicted=cause)
        return True

    def drop_covered(self, tokens: list[int]) -> None:
        """Drop parks whose whole content is a prefix of ``tokens``: the request being admitted
        is the one they kept (its slot now holds those cells), nobody else will want them."""
        for p in self.occupied():
            if tokens[: len(p.kv)] == p.kv:
                self.drop(p)

    def make_room(self, needed: int, slots: list[Slot], capacity: int) -> None:
        """Evict parks (oldest first) until ``needed`` more cells fit. The count of used cells
        is an upper bound (cells that slots share with each other are counted twice); a park
        whose cells its slot still holds costs nothing extra."""
        used = sum(len(s.kv) for s in slots)
        extra = {p.seq_id: self._extra_cells(p, slots) for p in self.occupied()}
        while used + sum(extra.values()) + needed > capacity and extra:
            oldest = min(self.occupied(), key=lambda p: p.parked_ns)
            del extra[oldest.seq_id]
            self.drop(oldest, evicted="admission")

    @staticmethod
    def _extra_cells(park: Park, slots: list[Slot]) -> int:
        n = len(park.kv)
        return 0 if any(s.kv[:n] == park.kv for s in slots) else n

    def state(self) -> list[dict[str, Any]]:
        return [native.seq_state(self._mem, p.seq_id, p.kv, p.request_id) for p in self.parks]

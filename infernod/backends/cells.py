"""Where the engine's KV cells live: which slot a request gets and what prefix it reuses.

A sequence's cells can be in three places: in a slot (running, or free and not yet moved
out), in a park (a preempted request's, see parking.py) or saved in RAM (the host cache, see
hostcache.py). :meth:`KvPlacement.pick_slot` finds the longest reusable prefix among all of
them and puts it into the slot a new request gets; :meth:`offload` moves a free slot's cells
to RAM, because in the unified KV cache idle cells cost every running stream attention.

Owned by the decode thread, like the slots.
"""

from __future__ import annotations

from typing import Any

from infernod.backends import llama_native as native
from infernod.backends.hostcache import Entry, HostCache
from infernod.backends.parking import Park, ParkingLot
from infernod.backends.runstate import Slot, common_prefix, window_holds

# Restoring copies the whole saved sequence (0.5 ms per 100 tokens here) and then cuts it;
# evaluating a prompt token costs ~3 ms on 2 CPU cores. From 4 shared tokens on (BOS and a
# chat template's turn header, or a repeated short prompt) restoring wins.
HOST_MIN_REUSE = 4


class KvPlacement:
    def __init__(self, slots: list[Slot], parks: ParkingLot, host: HostCache) -> None:
        self.slots = slots
        self.parks = parks
        self.host = host
        self.n_swa = 0  # > 0: a trimmed sliding-window cache (swa_full off)
        self._ctx: Any = None
        self._mem: Any = None

    def attach(self, ctx: Any, mem: Any, n_swa: int) -> None:
        self._ctx, self._mem, self.n_swa = ctx, mem, n_swa
        self.host.n_swa = n_swa

    def pick_slot(self, tokens: list[int]) -> tuple[Slot, int]:
        """Choose a free slot and make its KV hold the longest reusable prefix of ``tokens``.

        Candidates are every slot's cells (a free slot may still hold its last sequence;
        running slots can lend their prompt), every park and every sequence saved in the
        host cache. At least one token is always left to evaluate, so the last prompt
        position produces logits. With a sliding-window cache the prefix is only usable if
        the window before it is still there (``llama_memory_seq_pos_min``). A park whose
        cells are all a prefix of ``tokens`` (the resumed request) is dropped.
        """
        llama = native.bindings()
        free = [s for s in self.slots if s.run is None]
        best_src: Any = None
        best_n = 0
        candidates: list[Slot | Park] = [*self.slots, *self.parks.occupied()]
        for s in candidates:
            n = min(common_prefix(s.kv, tokens), len(tokens) - 1)
            if n > best_n and self.prefix_usable(s.seq_id, n):
                best_src, best_n = s, n
        entry, n_host = self.host.best(tokens, limit=len(tokens) - 1)
        if entry is not None and n_host > max(best_n, HOST_MIN_REUSE - 1):
            dst = _emptiest(free)
            if self._restore(dst, entry, n_host, consume=n_host == len(entry.tokens)):
                dst.kv = tokens[:n_host]
                self.parks.drop_covered(tokens)
                return dst, n_host
            return dst, 0  # rare (no room for it): dst is empty now, maybe best_src was it
        if isinstance(best_src, Slot) and best_src.run is None:
            dst = best_src
            if len(dst.kv) - best_n >= HOST_MIN_REUSE:
                self._save(dst)  # it is cut to the shared prefix: keep the whole in RAM
            if not llama.llama_memory_seq_rm(self._mem, dst.seq_id, best_n, -1):
                llama.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
                best_n = 0
        else:
            dst = _emptiest(free)
            self.offload(dst)
            if best_src is not None:
                llama.llama_memory_seq_cp(self._mem, best_src.seq_id, dst.seq_id, 0, best_n)
        dst.kv = tokens[:best_n]
        self.parks.drop_covered(tokens)
        return dst, best_n

    def idle_slot_with_cells(self) -> Slot | None:
        """A free slot still holding cells, when the host cache is there to take them."""
        if not self.host.enabled:
            return None
        return next((s for s in self.slots if s.run is None and s.kv), None)

    def offload(self, slot: Slot) -> None:
        """Save a free slot's sequence to the host cache (unless a park keeps the same
        cells, or the cache is off) and free its cells."""
        self._save(slot)
        native.bindings().llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.kv = []

    def _save(self, slot: Slot) -> None:
        if slot.kv and not any(p.kv == slot.kv for p in self.parks.occupied()):
            self.host.save(self._ctx, slot.seq_id, slot.kv)

    def _restore(self, dst: Slot, entry: Entry, n: int, consume: bool) -> bool:
        """Load a saved sequence into ``dst`` and keep its first ``n`` positions."""
        llama = native.bindings()
        self.offload(dst)
        ok = self.host.restore(self._ctx, entry, dst.seq_id, consume=consume)
        if ok and n < len(entry.tokens):
            ok = bool(llama.llama_memory_seq_rm(self._mem, dst.seq_id, n, -1))
        if ok and self.prefix_usable(dst.seq_id, n):
            return True
        llama.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
        return False

    def prefix_usable(self, seq_id: int, n: int) -> bool:
        """Can the first n cells of this sequence be reused (see ``window_holds``)?"""
        if self.n_swa <= 0:
            return True
        pos_min = int(native.bindings().llama_memory_seq_pos_min(self._mem, seq_id))
        return window_holds(pos_min, n, self.n_swa)


def _emptiest(free: list[Slot]) -> Slot:
    """The free slot a new sequence takes when none of them holds its prefix: an empty one,
    else the one released longest ago."""
    return min(free, key=lambda s: (len(s.kv) > 0, s.released_ns))

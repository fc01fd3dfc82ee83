"""Where the engine's KV cells live: which slot a request gets and what prefix it reuses.

A sequence's cells can be in three places: in a slot (running, or free and not yet moved
out), in a park (a preempted request's, see parking.py) or saved in RAM (the host cache, see
hostcache.py). :meth:`KvPlacement.pick_slot` finds the longest reusable prefix among all of
them and puts it into the slot a new request gets; :meth:`offload` moves a free slot's cells
to RAM, because in the unified KV cache idle cells cost every running stream attention.
With a trimmed sliding-window cache a prefix whose window is gone is served up to a window
checkpoint (checkpoints.py) instead: :meth:`checkpoint` takes them during prefill, where
:meth:`plan` says, and their bytes count in the host cache's budget.

Owned by the decode thread, like the slots.
"""

from __future__ import annotations

from typing import Any

from infernod.backends import checkpoints as ckpt
from infernod.backends import llama_native as native
from infernod.backends.checkpoints import Checkpoint
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

    def pick_slot(self, tokens: list[int]) -> tuple[Slot, int, int]:
        """Choose a free slot and make its KV hold the longest reusable prefix of ``tokens``.

        Candidates are every slot's cells (a free slot may still hold its last sequence;
        running slots can lend their prompt), every park and every sequence saved in the
        host cache. At least one token is always left to evaluate, so the last prompt
        position produces logits. With a sliding-window cache the prefix is only usable if
        the window before it is still there (``llama_memory_seq_pos_min``), or up to a window
        checkpoint of the candidate. A park whose cells are all a prefix of ``tokens`` (the
        resumed request) is dropped.

        Returns the slot, how many tokens it holds (reused) and how many ``tokens`` share
        with the best-matching candidate, reusable or not (where a checkpoint is worth taking).
        """
        llama = native.bindings()
        limit = len(tokens) - 1
        free = [s for s in self.slots if s.run is None]
        best_src: Slot | Park | None = None
        best_n = 0
        best_cp: Checkpoint | None = None
        shared = max((min(common_prefix(e.tokens, tokens), limit) for e in self.host.entries),
                     default=0)
        candidates: list[Slot | Park] = [*self.slots, *self.parks.occupied()]
        for s in candidates:
            m = min(common_prefix(s.kv, tokens), limit)
            shared = max(shared, m)
            n, cp = self._serves(s, tokens, m)
            if n > best_n:
                best_src, best_n, best_cp = s, n, cp
        entry, n_host, host_cp = self.host.best(tokens, limit=limit)
        if entry is not None and n_host > max(best_n, HOST_MIN_REUSE - 1):
            dst = _emptiest(free)
            whole = host_cp is None and n_host == len(entry.tokens)
            if self._restore(dst, entry, n_host, host_cp, consume=whole):
                dst.kv = tokens[:n_host]
                dst.checkpoints = [c for c in entry.checkpoints if c.pos <= n_host]
                self.parks.drop_covered(tokens)
                return dst, n_host, shared
            return dst, 0, shared  # rare (no room for it): dst is empty now, maybe best_src was
        if isinstance(best_src, Slot) and best_src.run is None:
            dst = best_src
            if len(dst.kv) - best_n >= HOST_MIN_REUSE:
                self._save(dst)  # it is cut to the shared prefix: keep the whole in RAM
            ok = bool(llama.llama_memory_seq_rm(self._mem, dst.seq_id, best_n, -1))
            if not (ok and (best_cp is None or self._load(best_cp, dst))):
                llama.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
                best_n = 0
        else:
            dst = _emptiest(free)
            self.offload(dst)
            if best_src is not None:
                llama.llama_memory_seq_cp(self._mem, best_src.seq_id, dst.seq_id, 0, best_n)
                if best_cp is not None and not self._load(best_cp, dst):
                    llama.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
                    best_n = 0
        src_cps = best_src.checkpoints if isinstance(best_src, Slot) else []
        dst.checkpoints = [c for c in src_cps if c.pos <= best_n]
        dst.kv = tokens[:best_n]
        self.parks.drop_covered(tokens)
        self._fit()  # a slot cut down above saved its whole sequence first
        return dst, best_n, shared

    def _serves(self, src: Slot | Park, tokens: list[int], n: int) -> tuple[int, Checkpoint | None]:
        """How much of the first ``n`` of ``tokens`` (shared with ``src``) ``src`` serves: all
        when its window holds, else up to a checkpoint of its (returned, to be loaded)."""
        if n <= 0 or self.prefix_usable(src.seq_id, n):
            return n, None
        cp = ckpt.best(src.checkpoints, tokens, n) if isinstance(src, Slot) else None
        return (cp.pos, cp) if cp is not None else (0, None)

    def _load(self, cp: Checkpoint, dst: Slot) -> bool:
        """Load a window checkpoint into ``dst``, already cut to ``cp.pos`` positions."""
        if ckpt.load(self._ctx, cp, dst.seq_id):
            return True
        self.host.counts["failed"] += 1
        return False

    # ---- window checkpoints ------------------------------------------------------------------

    def plan(self, n_tokens: int, cached: int, max_tokens: int, shared: int) -> list[int]:
        """Positions at which to checkpoint a prompt being admitted (see checkpoints.plan);
        none without a trimmed window or a host cache to count them in."""
        if self.n_swa <= 0 or not self.host.enabled:
            return []
        return ckpt.plan(n_tokens, cached, max_tokens, self.n_swa, shared)

    def checkpoint(self, slot: Slot) -> None:
        """Checkpoint ``slot``'s window now (it holds exactly ``slot.kv``, all evaluated)."""
        cp = ckpt.take(self._ctx, slot.seq_id, slot.kv)
        if cp is None:
            self.host.counts["failed"] += 1
            return
        kept = [c for c in slot.checkpoints if c.pos != cp.pos]
        slot.checkpoints = ckpt.cap(sorted([*kept, cp], key=lambda c: c.pos))
        self._fit()

    def live_checkpoints(self) -> list[Checkpoint]:
        """Checkpoints held by slots (running sequences, or free ones not yet moved out)."""
        return [c for s in self.slots for c in s.checkpoints]

    def _fit(self) -> None:
        """Keep the host cache and the slots' checkpoints within the budget: idle entries
        give way first (see HostCache.fit), then the slots' checkpoints (oldest taken first)."""
        while not self.host.fit(live := self.live_checkpoints()):
            oldest = min(live, key=lambda c: c.taken_ns)
            for s in self.slots:
                s.checkpoints = [c for c in s.checkpoints if c is not oldest]

    def stats(self) -> dict[str, Any]:
        """The host cache's counters, its bytes and checkpoints including the slots'."""
        return self.host.stats(self.live_checkpoints())

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
        slot.checkpoints = []
        self._fit()  # now: the slot's checkpoints moved to its entry, not counted twice

    def _save(self, slot: Slot) -> None:
        if slot.kv and not any(p.kv == slot.kv for p in self.parks.occupied()):
            self.host.save(self._ctx, slot.seq_id, slot.kv, slot.checkpoints)

    def _restore(self, dst: Slot, entry: Entry, n: int, cp: Checkpoint | None,
                 consume: bool) -> bool:
        """Load a saved sequence into ``dst`` and keep its first ``n`` positions (their window
        from ``cp`` when given: ``cp.pos == n``)."""
        llama = native.bindings()
        self.offload(dst)
        ok = self.host.restore(self._ctx, entry, dst.seq_id, consume=consume)
        if ok and n < len(entry.tokens):
            ok = bool(llama.llama_memory_seq_rm(self._mem, dst.seq_id, n, -1))
        if ok and cp is not None:
            ok = self._load(cp, dst)
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

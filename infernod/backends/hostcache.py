"""Host cache: idle conversations' KV cells moved to RAM so they slow nobody down.

The engine's KV cache is unified (one pool of cells for all slots, see gguf.py), and in a
unified cache every decoded token attends over every cell in use, its own sequence's or not
(the others are masked, but still computed). A finished request's cells are worth keeping,
since the next turn of a chat reuses them, but kept in the pool they tax every other stream:
on Gemma 3 270M with 2 cores, one stream decodes a token in 14 ms alone and in 25 ms next to
seven idle 600-token conversations.

So an idle slot's sequence is saved to host memory (``llama_state_seq_get_data_ext``: about
2 ms for 100 tokens, 7 ms for 1,000, 11 MB) and its cells are freed. A request that continues
it restores the sequence into its slot (``llama_state_seq_set_data_ext``, 0.5-2 ms), bit for
bit. This is llama.cpp's server prompt cache idea, kept small: longest common prefix over a
handful of entries, least recently used evicted first within a byte budget.

With a sliding-window cache (``swa_full`` off) a saved sequence only keeps its last window in
the window layers, so a restored entry by itself serves continuations of the whole sequence
(the chat case) but not much shorter prefixes. An entry also keeps the window checkpoints its
sequence took (checkpoints.py): restored and cut to a checkpoint's position, with the
checkpoint loaded, it serves any prompt sharing at least that many tokens. Checkpoints count
in the byte budget like the entries.

Owned by the decode thread, like the slots.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field
from typing import Any

from infernod.backends import checkpoints as ckpt
from infernod.backends import llama_native as native
from infernod.backends.checkpoints import Checkpoint
from infernod.backends.runstate import common_prefix, window_holds


@dataclass(eq=False)  # identity: two entries never hold the same tokens
class Entry:
    tokens: list[int]  # exactly the positions 0.. the saved sequence holds
    data: mmap.mmap  # llama.cpp's serialised sequence state
    size: int
    pos_min: int  # the smallest position the restored sequence will hold
    used_ns: int
    checkpoints: list[Checkpoint] = field(default_factory=list)  # ascending positions


class HostCache:
    """Saved sequences within ``budget_bytes``; ``n_swa`` > 0 for a trimmed sliding window."""

    def __init__(self, budget_bytes: int, n_swa: int = 0) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self.n_swa = n_swa
        self.entries: list[Entry] = []
        self.counts = {"saved": 0, "restored": 0, "evicted": 0, "failed": 0}

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def bytes(self, extra: list[Checkpoint] | None = None) -> int:
        """Bytes held: entries, their checkpoints and ``extra`` ones (each counted once)."""
        return sum(e.size for e in self.entries) + ckpt.unique_bytes(
            *(e.checkpoints for e in self.entries), extra or [])

    def save(self, ctx: Any, seq_id: int, tokens: list[int],
             checkpoints: list[Checkpoint] | None = None) -> bool:
        """Copy sequence ``seq_id`` (holding exactly ``tokens``) to RAM, with its window
        ``checkpoints``. The caller frees its cells afterwards either way: an entry that does
        not fit the budget is not kept."""
        if not self.enabled or not tokens:
            return False
        cps = [c for c in checkpoints or [] if c.pos <= len(tokens)]
        for e in self.entries:
            if common_prefix(e.tokens, tokens) == len(tokens) and self.usable(e, len(tokens)):
                # an entry already holds all of it (and more), window included
                e.checkpoints = ckpt.cap(ckpt.merge(e.checkpoints, cps, len(tokens)))
                return True
        got = ckpt.state_to_ram(ctx, seq_id, 0)
        if got is None:
            self.counts["failed"] += 1
            return False
        if got[1] > self.budget_bytes:
            return False
        buf, size = got
        llama = native.bindings()
        pos_min = max(0, int(llama.llama_memory_seq_pos_min(llama.llama_get_memory(ctx), seq_id)))
        if self.n_swa > 0:  # only the window of the window layers is serialised
            pos_min = max(pos_min, len(tokens) - self.n_swa)
        # a shorter entry that this one extends is now redundant (its checkpoints are not)
        for e in self.entries:
            if common_prefix(e.tokens, tokens) == len(e.tokens):
                cps = ckpt.merge(cps, e.checkpoints, len(e.tokens))
        self.entries = [e for e in self.entries if common_prefix(e.tokens, tokens) < len(e.tokens)]
        self.entries.append(Entry(list(tokens), buf, size, pos_min, time.perf_counter_ns(),
                                  ckpt.cap(cps)))
        self.counts["saved"] += 1
        self.fit()
        return True

    def fit(self, extra: list[Checkpoint] | None = None) -> bool:
        """Shrink until the entries and ``extra`` checkpoints fit the budget: the least
        recently used entry loses its checkpoints (the earliest position first: the one that
        saves the least), then goes; False when ``extra`` alone does not fit."""
        while self.entries and self.bytes(extra) > self.budget_bytes:
            oldest = min(self.entries, key=lambda e: e.used_ns)
            if oldest.checkpoints:
                oldest.checkpoints = oldest.checkpoints[1:]
                continue
            self.entries = [e for e in self.entries if e is not oldest]
            self.counts["evicted"] += 1
        return self.bytes(extra) <= self.budget_bytes

    def usable(self, entry: Entry, n: int) -> bool:
        """Would the restored entry serve a prefix of ``n`` tokens by itself?"""
        return window_holds(entry.pos_min, n, self.n_swa)

    def serves(self, entry: Entry, tokens: list[int], n: int) -> tuple[int, Checkpoint | None]:
        """How much of the first ``n`` of ``tokens`` (shared with the entry) the restored
        entry serves: all when its window holds, else up to its best checkpoint (returned, to
        be loaded) or nothing."""
        if self.usable(entry, n):
            return n, None
        cp = ckpt.best(entry.checkpoints, tokens, n)
        return (cp.pos, cp) if cp is not None else (0, None)

    def best(self, tokens: list[int], limit: int) -> tuple[Entry | None, int, Checkpoint | None]:
        """The entry whose restored cells serve the longest prefix of ``tokens`` (at most
        ``limit`` of them), that length and the checkpoint it takes (None: the entry's own
        window); on a tie the smaller entry, cheaper to restore."""
        best: Entry | None = None
        best_n = 0
        best_cp: Checkpoint | None = None
        for e in self.entries:
            n, cp = self.serves(e, tokens, min(common_prefix(e.tokens, tokens), limit))
            if n <= 0:
                continue
            if n > best_n or (n == best_n and best is not None and e.size < best.size):
                best, best_n, best_cp = e, n, cp
        return best, best_n, best_cp

    def restore(self, ctx: Any, entry: Entry, seq_id: int, consume: bool) -> bool:
        """Load ``entry`` into the (empty) sequence ``seq_id``. ``consume`` drops the entry: a
        request that continues all of it saves it again, longer, when its slot goes idle.
        False when llama.cpp finds no room for it: the caller evaluates the prompt instead."""
        if consume:
            self.entries = [e for e in self.entries if e is not entry]
        else:
            entry.used_ns = time.perf_counter_ns()
        if not ckpt.state_from_ram(ctx, entry.data, entry.size, seq_id, 0):
            self.counts["failed"] += 1
            return False
        self.counts["restored"] += 1
        return True

    def stats(self, extra: list[Checkpoint] | None = None) -> dict[str, Any]:
        """Counters; ``bytes`` and ``checkpoints`` include ``extra`` (running sequences')."""
        n_cps = len({id(c) for e in self.entries for c in e.checkpoints} |
                    {id(c) for c in extra or []})
        return {"entries": len(self.entries), "bytes": self.bytes(extra),
                "budget_bytes": self.budget_bytes, "checkpoints": n_cps, **self.counts}


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
the window layers, so a restored entry serves continuations of the whole sequence (the chat
case) but not much shorter prefixes; the engine checks that before using one.

Owned by the decode thread, like the slots.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass
from typing import Any

from infernod.backends import llama_native as native
from infernod.backends.runstate import common_prefix, window_holds


@dataclass(eq=False)  # identity: two entries never hold the same tokens
class Entry:
    tokens: list[int]  # exactly the positions 0.. the saved sequence holds
    data: mmap.mmap  # llama.cpp's serialised sequence state
    size: int
    pos_min: int  # the smallest position the restored sequence will hold
    used_ns: int


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

    def bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def save(self, ctx: Any, seq_id: int, tokens: list[int]) -> bool:
        """Copy sequence ``seq_id`` (holding exactly ``tokens``) to RAM. The caller frees its
        cells afterwards either way: an entry that does not fit the budget is not kept."""
        if not self.enabled or not tokens:
            return False
        if any(common_prefix(e.tokens, tokens) == len(tokens) and self.usable(e, len(tokens))
               for e in self.entries):
            return True  # an entry already holds all of it (and more), window included
        llama = native.bindings()
        size = int(llama.llama_state_seq_get_size_ext(ctx, seq_id, 0))
        if size <= 0 or size > self.budget_bytes:
            return False
        buf = mmap.mmap(-1, size)  # see _pointer
        if int(llama.llama_state_seq_get_data_ext(ctx, _pointer(buf), size, seq_id, 0)) != size:
            self.counts["failed"] += 1
            return False
        pos_min = max(0, int(llama.llama_memory_seq_pos_min(llama.llama_get_memory(ctx), seq_id)))
        if self.n_swa > 0:  # only the window of the window layers is serialised
            pos_min = max(pos_min, len(tokens) - self.n_swa)
        # a shorter entry that this one extends is now redundant
        self.entries = [e for e in self.entries if common_prefix(e.tokens, tokens) < len(e.tokens)]
        self.entries.append(Entry(list(tokens), buf, size, pos_min, time.perf_counter_ns()))
        self.counts["saved"] += 1
        while self.bytes() > self.budget_bytes:
            oldest = min(self.entries, key=lambda e: e.used_ns)
            self.entries = [e for e in self.entries if e is not oldest]
            self.counts["evicted"] += 1
        return True

    def usable(self, entry: Entry, n: int) -> bool:
        """Would the restored entry serve a prefix of ``n`` tokens?"""
        return window_holds(entry.pos_min, n, self.n_swa)

    def best(self, tokens: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry whose restored cells serve the longest prefix of ``tokens`` (at most
        ``limit`` of them), and that length; on a tie the smaller entry, cheaper to restore."""
        best: Entry | None = None
        best_n = 0
        for e in self.entries:
            n = min(common_prefix(e.tokens, tokens), limit)
            if n <= 0 or not self.usable(e, n):
                continue
            if n > best_n or (n == best_n and best is not None and e.size < best.size):
                best, best_n = e, n
        return best, best_n

    def restore(self, ctx: Any, entry: Entry, seq_id: int, consume: bool) -> bool:
        """Load ``entry`` into the (empty) sequence ``seq_id``. ``consume`` drops the entry: a
        request that continues all of it saves it again, longer, when its slot goes idle.
        False when llama.cpp finds no room for it: the caller evaluates the prompt instead."""
        if consume:
            self.entries = [e for e in self.entries if e is not entry]
        else:
            entry.used_ns = time.perf_counter_ns()
        n = int(native.bindings().llama_state_seq_set_data_ext(ctx, _pointer(entry.data),
                                                                 entry.size, seq_id, 0))
        if n != entry.size:
            self.counts["failed"] += 1
            return False
        self.counts["restored"] += 1
        return True

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.entries), "bytes": self.bytes(),
                "budget_bytes": self.budget_bytes, **self.counts}


def _pointer(buf: mmap.mmap) -> Any:
    """A ``uint8_t *`` to an entry's buffer, valid while ``buf`` lives.

    Entries live in anonymous mappings rather than malloc'd buffers: saves and evictions of
    1-20 MB buffers on the decode thread left glibc's arenas fragmented, and the daemon's RSS
    grew by 30-40 MB over a 4 MB budget in a test; an evicted mapping is returned to the
    kernel at once. (Pages are also zero-filled lazily, so no memset per save.)
    """
    anchor = ctypes.c_uint8.from_buffer(buf)  # exports the buffer only while we take its address
    address = ctypes.addressof(anchor)
    del anchor  # a mapping with an export could not be unmapped when evicted
    return ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8))

"""Checkpoints of a sequence's sliding-window state, so a long shared prefix stays reusable.

With ``swa_full`` off (the default) llama.cpp keeps only the last ``n_swa`` positions of a
sequence in the window layers (Gemma 3: 512 of them, in 15 of its 18 layers) and overwrites
older cells as the sequence grows. The full-attention layers keep every position, but to
continue a sequence from position ``p`` the window layers need positions ``p - n_swa + 1 ..
p - 1`` too, and those are gone once the sequence has run on past them: a 2,900-token
document followed by a different question (or the same prompt again) could reuse nothing
and was evaluated in full (10-12 s here).

A checkpoint is the window layers' state of a sequence that holds exactly positions
``0 .. pos - 1``, copied to RAM (``llama_state_seq_get_data_ext`` with
``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``: about ``n_swa`` cells of the window layers, 7.5 MB
for Gemma 3 270M, a few ms). The engine takes them *during* prefill, before the batch that
evaluates position ``pos``, at planned positions (see :func:`plan`): a few tokens before the
end of the prompt and at the place it stopped matching an earlier sequence. A later prompt
sharing at least ``pos`` tokens cuts the sequence to ``pos`` (the full-attention cells are
all there) and loads the checkpoint into the window layers (``..._set_data_ext``, which
replaces the sequence's window cells and leaves the others alone); it then evaluates only
from ``pos`` on, bit for bit as if it had evaluated the prefix itself. This is what
llama-server's context checkpoints do.

Checkpoints travel with their sequence: on its slot while it runs, in its host-cache entry
once it is idle (hostcache.py), back on a slot when the entry is restored. Their bytes count
in the host cache's budget (``models.host_cache_mib``); with the budget at 0 there are none.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass, field
from typing import Any

from infernod.backends import llama_native as native

# Positions planned before the end of a prompt: right before its last token (the same
# prompt again, a regenerated reply) and 32, 128 and 512 tokens before it (the same
# document, or conversation, followed by a different question of up to that length).
END_DISTANCES = (1, 32, 128, 512)
# A checkpoint must save at least this many evaluated tokens over what the request already
# reused: each costs one more batch (its prefill is split there) and a window of memory.
MIN_GAIN = 32
# At most this many checkpoints per sequence; the oldest taken goes first.
MAX_PER_SEQUENCE = 8
PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY (= _SWA_ONLY) in this llama.cpp


@dataclass(eq=False)  # identity: entries and slots may share one
class Checkpoint:
    tokens: list[int]  # what the sequence held when it was taken: positions 0 .. pos - 1
    data: mmap.mmap
    size: int
    taken_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def pos(self) -> int:
        return len(self.tokens)


def plan(n_tokens: int, cached: int, max_tokens: int, n_swa: int, shared: int) -> list[int]:
    """Where to checkpoint a prompt of ``n_tokens`` whose first ``cached`` are reused and whose
    first ``shared`` matched some earlier sequence (kept or not): ascending positions.

    Nothing when the window cannot fill up (prompt plus reply within ``n_swa``: every cell
    stays) or the cache is not a trimmed sliding window (``n_swa`` 0)."""
    if n_swa <= 0 or n_tokens + max_tokens <= n_swa:
        return []
    wanted = {n_tokens - d for d in END_DISTANCES}
    wanted.add(shared)
    return sorted(p for p in wanted if cached + MIN_GAIN <= p < n_tokens)


def best(checkpoints: list[Checkpoint], tokens: list[int], n: int) -> Checkpoint | None:
    """The checkpoint that serves the longest prefix of ``tokens``, at most ``n`` of them.
    Its tokens are compared, not only its position: a checkpoint never serves a sequence it
    was not taken from, whatever the bookkeeping around it."""
    fitting = [c for c in checkpoints if 0 < c.pos <= n and tokens[: c.pos] == c.tokens]
    return max(fitting, key=lambda c: c.pos) if fitting else None


def merge(kept: list[Checkpoint], more: list[Checkpoint], limit: int) -> list[Checkpoint]:
    """``kept`` plus those of ``more`` at positions ``kept`` lacks, up to ``limit`` tokens."""
    have = {c.pos for c in kept}
    out = list(kept) + [c for c in more if c.pos <= limit and c.pos not in have]
    return sorted(out, key=lambda c: c.pos)


def cap(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """At most :data:`MAX_PER_SEQUENCE`, dropping the longest-held first."""
    if len(checkpoints) <= MAX_PER_SEQUENCE:
        return checkpoints
    keep = sorted(checkpoints, key=lambda c: c.taken_ns)[-MAX_PER_SEQUENCE:]
    return sorted(keep, key=lambda c: c.pos)


def unique_bytes(*groups: list[Checkpoint]) -> int:
    """Bytes of the distinct checkpoints in ``groups`` (a checkpoint may be in several)."""
    seen: dict[int, int] = {}
    for group in groups:
        for c in group:
            seen[id(c)] = c.size
    return sum(seen.values())


def take(ctx: Any, seq_id: int, tokens: list[int]) -> Checkpoint | None:
    """Copy the window layers' cells of ``seq_id``, which holds exactly ``tokens``."""
    got = state_to_ram(ctx, seq_id, PARTIAL_ONLY)
    return None if got is None else Checkpoint(list(tokens), got[0], got[1])


def load(ctx: Any, checkpoint: Checkpoint, seq_id: int) -> bool:
    """Replace the window layers' cells of ``seq_id`` with ``checkpoint``'s. The caller has cut
    the sequence to ``checkpoint.pos`` positions; False when llama.cpp found no room."""
    return state_from_ram(ctx, checkpoint.data, checkpoint.size, seq_id, PARTIAL_ONLY)


def state_to_ram(ctx: Any, seq_id: int, flags: int) -> tuple[mmap.mmap, int] | None:
    """Serialise sequence ``seq_id``'s KV state (``flags`` as in llama.h) into a new mapping."""
    llama = native.bindings()
    size = int(llama.llama_state_seq_get_size_ext(ctx, seq_id, flags))
    if size <= 0:
        return None
    buf = mmap.mmap(-1, size)  # see pointer()
    if int(llama.llama_state_seq_get_data_ext(ctx, pointer(buf), size, seq_id, flags)) != size:
        buf.close()
        return None
    return buf, size


def state_from_ram(ctx: Any, data: mmap.mmap, size: int, seq_id: int, flags: int) -> bool:
    """Load a state from :func:`state_to_ram` into sequence ``seq_id``."""
    llama = native.bindings()
    return int(llama.llama_state_seq_set_data_ext(ctx, pointer(data), size, seq_id, flags)) == size


def pointer(buf: mmap.mmap) -> Any:
    """A ``uint8_t *`` to a state buffer, valid while ``buf`` lives.

    States live in anonymous mappings rather than malloc'd buffers: saves and evictions of
    1-20 MB buffers on the decode thread left glibc's arenas fragmented, and the daemon's RSS
    grew by 30-40 MB over a 4 MB budget in a test; an evicted mapping is returned to the
    kernel at once. (Pages are also zero-filled lazily, so no memset per save.)
    """
    anchor = ctypes.c_uint8.from_buffer(buf)  # exports the buffer only while we take its address
    address = ctypes.addressof(anchor)
    del anchor  # a mapping with an export could not be unmapped when evicted
    return ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8))

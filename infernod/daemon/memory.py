"""Memory estimates and load planning (pure: no I/O, time passed in).

``estimate_memory`` sizes a llama.cpp context from a model's ``ModelInfo``; ``plan_load``
picks which idle, unpinned models to unload so a new one fits the memory budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo

MiB = 1 << 20
_KV_PAD = 256  # llama.cpp pads KV cache sizes to 256 cells


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    correction_bytes: int = 0  # learned from earlier loads, already included in overhead

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _pad(n: int, to: int = _KV_PAD) -> int:
    return (n + to - 1) // to * to


def estimate_memory(
    info: ModelInfo,
    n_ctx: int,
    n_slots: int,
    swa_full: bool,
    kv_type_bytes: int = 2,
    *,
    kv_unified: bool = True,
    n_ubatch: int = 512,
    correction_bytes: int = 0,
    park_slots: int = 0,
) -> MemoryEstimate:
    """Memory a llama.cpp context for ``info`` will use; ``n_ctx`` is per slot.

    Mirrors llama.cpp's KV cache sizing (cells padded to 256). Unified (what GgufEngine
    creates): one cache of ``n_ctx * n_slots`` cells in global layers and, unless
    ``swa_full``, ``min(that, window * n_slots + n_ubatch)`` cells in sliding-window layers.
    Non-unified: the same per slot with ``window + n_ubatch``. Gemma 3 270M, 4096 x 8 slots,
    unified: 96 + 67.5 MiB, exactly what llama.cpp logs; 96 + 480 MiB with swa_full.
    Overhead (tokenizer tables, logits buffer, the touched part of the compute buffer) is a
    rough fit to RSS measured on this model; learned corrections replace it over time.
    ``park_slots`` (spare sequences that keep a preempted request's cells) share the global
    cells but each adds a window to the sliding-window cache and a row to the logits buffer.
    """
    weights = info.weights_bytes or info.size_bytes
    if info.kind != "gguf" or not info.n_layer:
        overhead = max(0, 64 * MiB + correction_bytes)
        return MemoryEstimate(weights, 0, overhead, weights + overhead, correction_bytes)
    n_embd = info.embedding_length or 0
    head_kv = info.n_head_kv or info.n_head or 1
    k_len = info.key_length or (n_embd // (info.n_head or 1))
    v_len = info.value_length or k_len
    streams = 1 if kv_unified else max(1, n_slots)
    cells = _pad(max(1, n_ctx) * n_slots // streams)
    swa_cells = cells
    if info.sliding_window and not swa_full:
        seqs = n_slots + park_slots
        swa_cells = min(cells, _pad(info.sliding_window * seqs // streams + n_ubatch))
    swa_layers = min(info.swa_layers, info.n_layer)
    per_cell_layer = head_kv * (k_len + v_len) * kv_type_bytes
    layer_cells = (info.n_layer - swa_layers) * cells + swa_layers * swa_cells
    kv = streams * per_cell_layer * layer_cells
    vocab = info.vocab_size or 32000
    attn_scores = n_ubatch * min(cells, _pad(n_ubatch * 2)) * (info.n_head or 1) * 4
    outputs = n_slots + park_slots  # the logits buffer has one row per sequence
    overhead = 32 * MiB + vocab * 160 + outputs * vocab * 4 + n_ubatch * n_embd * 32 + attn_scores
    overhead = max(0, overhead + correction_bytes)
    return MemoryEstimate(weights, kv, overhead, weights + kv + overhead, correction_bytes)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    bytes: int
    pinned: bool = False
    busy: bool = False
    last_used_s: float = 0.0  # same clock as plan_load's ``now``


@dataclass(frozen=True)
class LoadPlan:
    evict: list[str]
    reason: str
    messages: list[str] = field(default_factory=list)  # one event line per evicted model


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def plan_load(
    candidate_name: str,
    need_bytes: int,
    budget_bytes: int,
    loaded: list[LoadedModel],
    now: float,
) -> LoadPlan:
    """Decides which idle, unpinned models to unload (least recently used first) so that
    ``candidate_name`` fits the budget, or raises ``insufficient_memory`` naming the numbers.

    A ``loaded`` entry with the candidate's own name is being replaced and does not count.
    """
    others = [m for m in loaded if m.name != candidate_name]
    used = sum(m.bytes for m in others)
    free = budget_bytes - used
    if need_bytes <= free:
        return LoadPlan([], f"{candidate_name} fits: needs {_mib(need_bytes)}, "
                            f"{_mib(free)} free of {_mib(budget_bytes)}")  # fmt: skip
    evictable = sorted((m for m in others if not m.pinned and not m.busy),
                       key=lambda m: m.last_used_s)  # fmt: skip
    freeable = sum(m.bytes for m in evictable)
    if need_bytes > budget_bytes or need_bytes > free + freeable:
        kept = [f"{m.name} {'pinned' if m.pinned else 'busy'}" for m in others
                if m.pinned or m.busy]  # fmt: skip
        # busy_bytes: held by models that are running or loading; once they are idle the
        # candidate fits if need <= free + freeable + busy (a request may wait for that)
        busy = sum(m.bytes for m in others if m.busy and not m.pinned)
        raise InfernoError(
            "insufficient_memory",
            f"cannot load {candidate_name}: needs {_mib(need_bytes)}, budget "
            f"{_mib(budget_bytes)}, {_mib(used)} used by {len(others)} loaded model(s), "
            f"only {_mib(freeable)} could be freed" + (f" ({', '.join(kept)})" if kept else ""),
            need_bytes=need_bytes, budget_bytes=budget_bytes, used_bytes=used,
            freeable_bytes=freeable, busy_bytes=busy,
        )  # fmt: skip
    evict: list[str] = []
    messages: list[str] = []
    for m in evictable:
        if need_bytes <= free:
            break
        evict.append(m.name)
        free += m.bytes
        messages.append(f"unloaded {m.name} (idle {_ago(now - m.last_used_s)}, "
                        f"{_mib(m.bytes)}) to fit {candidate_name}")  # fmt: skip
    return LoadPlan(evict, "; ".join(messages), messages)

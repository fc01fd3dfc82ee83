"""Memory estimates and load planning (pure: no I/O, time passed in).

``estimate_memory`` sizes a llama.cpp context from a model's ``ModelInfo``; ``split_memory``
splits it between host RAM and the GPUs by the layers offloaded (``fit_gpu_layers`` picks
that number for ``n_gpu_layers = auto``); ``gpu_budgets`` turns an NVML sample into a budget
per GPU; ``plan_load`` picks which idle, unpinned models to unload so a new one fits one
device's budget, ``plan_devices`` does it for every device the new model needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo

MiB = 1 << 20
HOST = "host"  # the device name of host RAM; GPUs are gpu0, gpu1, ... (gpu_key)
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
    device_bytes: dict[str, int] | None = None  # per device; None: all ``bytes`` on the host

    def on(self, device: str) -> int:
        """Bytes this model holds on ``device`` (HOST or gpuN)."""
        if self.device_bytes is None:
            return self.bytes if device == HOST else 0
        return self.device_bytes.get(device, 0)


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


# -- devices: host RAM and each GPU ---------------------------------------------------------
GPU_RESERVE_BYTES = 512 * MiB  # a CUDA context and compute buffers, for any offload (rough)
VRAM_SHARE = 0.9  # the default per-GPU cap: 90% of its memory (models.vram_budget_bytes = 0)


def gpu_key(index: int) -> str:
    return f"gpu{index}"


def offloaded_layers(info: ModelInfo, n_gpu_layers: int) -> int:
    """Layers llama.cpp puts on the GPU for ``n_gpu_layers`` (-1 = all): the repeating
    layers, and the output layer as one more once they all are."""
    total = (info.n_layer or 0) + 1
    return total if n_gpu_layers < 0 else min(n_gpu_layers, total)


def split_memory(est: MemoryEstimate, info: ModelInfo, n_gpu_layers: int,
                 gpu_shares: dict[str, float]) -> dict[str, int]:
    """Bytes per device for a load: the weights and KV cache of the offloaded layers (their
    share of ``n_layer + 1``) move to the GPUs, split by ``gpu_shares`` as llama.cpp's
    default layer split does (by free memory), plus GPU_RESERVE_BYTES each; the rest
    (token embeddings, tokenizer, logits, the offloaded layers' host copies excepted) stays
    in host RAM. No GPU (empty shares), no layers or a non-GGUF model: all on the host."""
    layers = offloaded_layers(info, n_gpu_layers) if gpu_shares else 0
    if layers <= 0 or info.kind != "gguf" or not info.n_layer:
        return {HOST: est.total_bytes}
    moved = (est.weights_bytes + est.kv_bytes) * layers // (info.n_layer + 1)
    total_share = sum(gpu_shares.values()) or 1.0
    out = {HOST: est.total_bytes - moved}
    for key, share in gpu_shares.items():
        part = int(moved * share / total_share)
        if part:
            out[key] = part + GPU_RESERVE_BYTES
    return out


def fit_gpu_layers(est: MemoryEstimate, info: ModelInfo, free_bytes: dict[str, int]) -> int:
    """``n_gpu_layers = auto`` (llama.cpp's ``--fit``): the most layers whose share fits the
    GPUs' room (``free_bytes``, after GPU_RESERVE_BYTES each); -1 when every layer fits."""
    if info.kind != "gguf" or not info.n_layer:
        return 0
    room = sum(max(0, b - GPU_RESERVE_BYTES) for b in free_bytes.values())
    per_layer = (est.weights_bytes + est.kv_bytes) / (info.n_layer + 1)
    if room <= 0 or per_layer <= 0:
        return 0
    n = int(room // per_layer)
    return -1 if n >= info.n_layer + 1 else n


def gpu_budgets(sample: dict | None, cap_bytes: int, ours: dict[str, int],
                our_pids: set[int]) -> dict[str, dict[str, int]]:
    """Per GPU of an NVML sample (telemetry's ``gpu`` part): ``{gpuN: {total_bytes,
    budget_bytes, others_bytes, free_bytes}}``. The budget is ``cap_bytes`` (0: VRAM_SHARE of
    the GPU's memory), less what other processes hold: NVML's per-process memory when it
    reports it (our runners' pids excluded), else its used memory less ``ours`` (what our
    loaded models are charged on that GPU). No NVML, no GPUs: ``{}``."""
    out: dict[str, dict[str, int]] = {}
    if not sample or not sample.get("available"):
        return out
    for g in sample.get("gpus") or []:
        total, used = g.get("memory_total_bytes"), g.get("memory_used_bytes")
        if not isinstance(total, int) or not isinstance(used, int):
            continue
        key = gpu_key(int(g["index"]))
        procs = g.get("processes")
        if procs is not None and all(isinstance(p.get("used_memory_bytes"), int) for p in procs):
            mine = sum(p["used_memory_bytes"] for p in procs if p["pid"] in our_pids)
            others = max(0, used - mine)
        else:
            others = max(0, used - ours.get(key, 0))
        cap = cap_bytes or int(total * VRAM_SHARE)
        budget = max(0, min(cap, total - others))
        out[key] = {"total_bytes": total, "budget_bytes": budget, "others_bytes": others,
                    "free_bytes": max(0, budget - ours.get(key, 0))}
    return out


def plan_devices(candidate_name: str, need: dict[str, int], budgets: dict[str, int],
                 loaded: list[LoadedModel], now: float) -> LoadPlan:
    """``plan_load`` on every device the candidate needs (host RAM, each GPU): on each, the
    least recently used idle, unpinned models that hold memory *there* make room; a model
    evicted for one device frees its bytes on all. Raises ``insufficient_memory`` for the
    first device that cannot fit (its name in the message and in ``device``)."""
    evict: list[str] = []
    messages: list[str] = []
    for device in sorted(need, key=lambda d: (d != HOST, d)):
        if need[device] <= 0:
            continue
        view = [replace(m, bytes=m.on(device)) for m in loaded
                if m.name not in evict and m.on(device) > 0]
        try:
            plan = plan_load(candidate_name, need[device], budgets.get(device, 0), view, now)
        except InfernoError as e:
            where = "" if device == HOST else f"on {device}: "
            raise InfernoError(e.code, where + e.message, e.hint, **e.extra,
                               device=device) from None
        evict += plan.evict
        messages += [m if device == HOST else f"{m} on {device}" for m in plan.messages]
    return LoadPlan(evict, "; ".join(messages), messages)

"""The shapes the daemon sends and the client, the CLI and the console read: one declaration
of each body shared by two of them (queue row, model state, metrics sample, profile).

They are TypedDicts: msgpack carries plain dicts, so the daemon builds these at no cost
(mypy checks every key of every literal), and a reader turns whatever arrived into one with
the ``*_from_wire`` parsers. Those are tolerant both ways, as the protocol promises: fields a
newer daemon adds pass through untouched, and a field an older daemon does not send (or
sends with an unexpected type) comes back as its neutral value (None for an optional field,
0, "", False, [] or {} otherwise), so a reader never meets a KeyError.

``missing_fields`` and ``unknown_fields`` are the strict side, for tests: what a body lacks,
or carries without a declaration here. docs/protocol.md documents every field declared here
(tests/test_bodies.py checks both).

No ``from __future__ import annotations``: NotRequired must be seen at class creation.
"""

import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict, cast

# -- queue: one row shape for queue.list and the `queue` topic ---------------------------------
# ``id``/``request_id`` and ``class``/``priority`` carry the same value: queue.list rows were
# read by ``id`` and ``class``, `queue` topic rows by ``request_id`` and ``priority``; every
# row now carries both, so readers of either keep working.
QueueRow = TypedDict("QueueRow", {
    "request_id": str,
    "id": str,
    "kind": str,  # vocabulary.REQUEST_KINDS
    "client": str,  # the label the client gave, else its session
    "session": str,
    "model": str,
    "priority": str,  # the requested class (vocabulary.PRIORITIES)
    "class": str,
    "effective_class": str,  # the class the scheduler uses now (aging, deadlines)
    "critical": bool,  # the deadline is close: it goes first
    "state": str,  # vocabulary.QUEUE_STATES
    "position": int | None,  # 1-based in the model's pick order while waiting
    "age_s": float,
    "deadline_in_s": float | None,
    "tokens": int,
    "job": str | None,  # the job id of a job item
    "preempted": bool,  # paused once for a vip, resumes where it stopped
    "slot": int | None,  # running: the engine slot (sequence) it holds
    "cached_tokens": int | None,  # running: prompt tokens reused from that slot's cache
})


class QueueSnapshot(TypedDict):
    """The ``queue.list`` reply and the ``queue`` topic's ``queue`` event."""

    items: list[QueueRow]  # running first, then waiting in pick order
    running: int
    queued: int
    waiting: int  # = queued (queue.list's name)
    level: str  # vocabulary.LEVELS, over all models
    levels: dict[str, str]  # per model with a row


class QueuedEvent(TypedDict):
    """A waiting request's place: the ``queued`` event on its token stream (the client keeps
    the last one in ``Stream.state.queued``; the console shows it)."""

    request_id: str
    model: str
    position: int  # 1-based in the model's pick order
    eta_s: float | None  # None until the model's speed was measured
    waiting: int  # requests waiting for the model


# -- models ----------------------------------------------------------------------------------
class ModelFailure(TypedDict):
    """A model whose runner died (``status.models_failed``, the ``models`` topic's ``failed``;
    models.list rows of a failed model carry the same fields)."""

    name: str
    state: str  # "failed" (or "available" once loads are allowed again)
    failed_reason: str
    failed_signal: str | None
    failed_at: float  # unix time
    crashes: int  # within the last 300 s
    loads_refused_for_s: float


class HostCache(TypedDict):
    entries: int
    bytes: int
    budget_bytes: int
    checkpoints: int
    saved: int
    restored: int
    evicted: int
    failed: int


class GgufEmbedding(TypedDict):
    """A GGUF model's embedding context, once its first ``embed`` created it."""

    pooling: str
    max_length: int
    memory_bytes: int


class LoadedModel(TypedDict):
    """A loaded (or loading, unloading) model: ``status.models_loaded``, the ``models``
    topic's ``loaded``; models.list rows of a loaded model carry the same fields."""

    name: str
    state: str  # vocabulary.MODEL_STATES
    memory_bytes: int
    keep_alive_s: float
    keep_alive_left_s: float | None
    pinned: bool
    running: int
    idle_s: float
    slots: int | None
    runner_pid: int | None  # GGUF: the runner process; ONNX: None
    gpu_memory_bytes: dict[str, int]  # gpuN -> bytes it is charged there ({}: none)
    n_ctx: NotRequired[int]  # GGUF: the context per slot it was loaded with
    n_gpu_layers: NotRequired[int]  # GGUF: layers offloaded ('auto' resolved)
    runner_rss_bytes: NotRequired[int | None]
    runner_cpu_s: NotRequired[float | None]
    runner_gpu_bytes: NotRequired[int]
    host_cache: NotRequired[HostCache]
    embedding: NotRequired[GgufEmbedding]
    backend: NotRequired[str]  # ONNX: "onnx"
    onnx_kind: NotRequired[str]
    provider: NotRequired[str]
    providers: NotRequired[list[str]]
    fallback_reason: NotRequired[str | None]


class ModelState(TypedDict):
    """One ``models.list`` row: what the registry knows of the file, its state, and the
    LoadedModel or ModelFailure fields when it is loaded or failed."""

    name: str
    kind: str  # "gguf" | "onnx"
    path: str
    size_bytes: int
    mtime: float
    linked: bool
    architecture: str | None
    display_name: str | None
    param_count: int | None
    size_label: str | None
    quantization: str | None
    context_length: int | None
    embedding_length: int | None
    n_layer: int | None
    n_head: int | None
    n_head_kv: int | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    swa_layers: int
    vocab_size: int | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    weights_bytes: int
    metadata: dict[str, Any]
    onnx: dict[str, Any] | None
    has_chat_template: bool
    state: str  # vocabulary.MODEL_STATES
    chat_template: NotRequired[str | None]  # models.show only
    # loaded
    memory_bytes: NotRequired[int]
    keep_alive_s: NotRequired[float]
    keep_alive_left_s: NotRequired[float | None]
    pinned: NotRequired[bool]
    running: NotRequired[int]
    idle_s: NotRequired[float]
    slots: NotRequired[int | None]
    runner_pid: NotRequired[int | None]
    gpu_memory_bytes: NotRequired[dict[str, int]]
    n_ctx: NotRequired[int]
    n_gpu_layers: NotRequired[int]
    runner_rss_bytes: NotRequired[int | None]
    runner_cpu_s: NotRequired[float | None]
    runner_gpu_bytes: NotRequired[int]
    host_cache: NotRequired[HostCache]
    embedding: NotRequired[GgufEmbedding]
    backend: NotRequired[str]
    onnx_kind: NotRequired[str]
    provider: NotRequired[str]
    providers: NotRequired[list[str]]
    fallback_reason: NotRequired[str | None]
    # failed
    failed_reason: NotRequired[str]
    failed_signal: NotRequired[str | None]
    failed_at: NotRequired[float]
    crashes: NotRequired[int]
    loads_refused_for_s: NotRequired[float]


# -- metrics: the `metrics` topic and metrics.get's `sample` ----------------------------------
class ProcessSample(TypedDict):
    pid: int
    rss_bytes: int | None
    cpu_pct: float | None
    threads: int | None
    open_fds: int | None
    uptime_s: float


class SystemSample(TypedDict):
    cpu_pct: float
    cpu_per_core_pct: list[float]
    cpu_count: int | None
    load_avg: list[float] | None
    memory_total_bytes: int
    memory_used_bytes: int
    memory_available_bytes: int
    memory_pct: float
    swap_total_bytes: int
    swap_used_bytes: int
    swap_pct: float
    boot_uptime_s: float
    process: ProcessSample


class GpuProcess(TypedDict):
    pid: int
    name: str | None
    used_memory_bytes: int | None
    kind: str  # "compute" | "graphics" | "both"
    is_daemon: bool


class GpuDevice(TypedDict):
    index: int
    name: str | None
    uuid: str | None
    utilization_gpu_pct: float | None
    utilization_memory_pct: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    memory_reserved_bytes: int | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    clock_sm_mhz: float | None
    clock_mem_mhz: float | None
    performance_state: int | None
    fan_pct: float | None
    encoder_util_pct: float | None
    decoder_util_pct: float | None
    processes: list[GpuProcess]


class GpuSample(TypedDict):
    available: bool
    reason: str | None
    gpus: list[GpuDevice]
    driver_version: NotRequired[str | None]  # with NVML
    daemon_pid: NotRequired[int]


class MetricsSample(TypedDict):
    ts: float  # wall clock
    system: SystemSample
    gpu: GpuSample
    energy_j: dict[str, float]  # per GPU index (string keys), joules since start


# -- profiles: the `profiles` topic and profiles.recent ---------------------------------------
class ItlSummary(TypedDict):
    mean: float
    p50: float
    p95: float
    max: float


class Profile(TypedDict):
    """One finished request: where its time went (ms), what it cost. A phase that did not
    happen is None."""

    request_id: str
    client: str | None
    model: str | None
    priority: str | None
    queue_wait_ms: float | None
    load_wait_ms: float | None
    tokenize_ms: float | None
    prefill_ms: float | None
    decode_ms: float | None
    detokenize_ms: float | None
    ttft_ms: float | None
    itl_ms: ItlSummary | None
    e2e_ms: float | None
    prompt_tokens: int
    prompt_cached_tokens: int
    completion_tokens: int
    tokens_per_s: float | None
    finish_reason: str | None
    rss_bytes_start: int | None
    rss_bytes_end: int | None
    gpu_memory_bytes_start: int | None
    gpu_memory_bytes_end: int | None
    energy_j: float | None
    started_at: float | None
    finished_at: float | None


# Every shared body, by the name the tests and the docs use.
BODIES: dict[str, type] = {
    "QueueRow": QueueRow, "QueueSnapshot": QueueSnapshot, "QueuedEvent": QueuedEvent,
    "ModelState": ModelState,
    "LoadedModel": LoadedModel, "ModelFailure": ModelFailure, "HostCache": HostCache,
    "MetricsSample": MetricsSample, "SystemSample": SystemSample,
    "ProcessSample": ProcessSample, "GpuSample": GpuSample, "GpuDevice": GpuDevice,
    "GpuProcess": GpuProcess, "Profile": Profile, "ItlSummary": ItlSummary,
}


# -- sending -----------------------------------------------------------------------------------
def to_wire(body: Mapping[str, object]) -> dict[str, Any]:
    """A body as the plain dict the codec and the publisher take. No copy, no check: a
    TypedDict already is that dict (mypy checked its keys where it was built)."""
    return cast(dict[str, Any], body)


# -- reading -----------------------------------------------------------------------------------
def queue_row_from_wire(d: object) -> QueueRow:
    """A queue row from either daemon generation's spelling (``id``/``class`` of queue.list,
    ``request_id``/``priority`` of the `queue` topic)."""
    m = dict(d) if isinstance(d, Mapping) else {}
    _alias(m, "request_id", "id")
    _alias(m, "priority", "class")
    m.setdefault("effective_class", m.get("priority"))
    m.setdefault("session", m.get("client"))
    m.setdefault("kind", "generate")
    return cast(QueueRow, _parse(QueueRow, m))


def queue_snapshot_from_wire(d: object) -> QueueSnapshot:
    m = dict(d) if isinstance(d, Mapping) else {}
    items = m.get("items")
    m["items"] = [queue_row_from_wire(x) for x in items] if isinstance(items, list) else []
    _alias(m, "queued", "waiting")
    if not isinstance(m.get("queued"), int):  # neither count: count the rows
        m["queued"] = m["waiting"] = sum(r["state"] == "queued" for r in m["items"])
    if not isinstance(m.get("running"), int):
        m["running"] = sum(r["state"] == "running" for r in m["items"])
    return cast(QueueSnapshot, _parse(QueueSnapshot, m))


def queued_event_from_wire(d: object) -> QueuedEvent:
    return cast(QueuedEvent, _parse(QueuedEvent, d))


def model_state_from_wire(d: object) -> ModelState:
    return cast(ModelState, _parse(ModelState, d))


def loaded_model_from_wire(d: object) -> LoadedModel:
    return cast(LoadedModel, _parse(LoadedModel, d))


def model_failure_from_wire(d: object) -> ModelFailure:
    return cast(ModelFailure, _parse(ModelFailure, d))


def metrics_sample_from_wire(d: object) -> MetricsSample:
    return cast(MetricsSample, _parse(MetricsSample, d))


def profile_from_wire(d: object) -> Profile:
    return cast(Profile, _parse(Profile, d))


def _alias(m: dict[str, Any], a: str, b: str) -> None:
    """Fill whichever of two same-valued names is missing from the other."""
    if a not in m and b in m:
        m[a] = m[b]
    elif b not in m and a in m:
        m[b] = m[a]


# -- checking (tests) ------------------------------------------------------------------------
def missing_fields(shape: type, d: object, where: str = "") -> list[str]:
    """Dotted names of the fields ``d`` lacks or carries with a type ``shape`` does not
    allow (nested bodies and lists of bodies included)."""
    if not isinstance(d, Mapping):
        return [where or "<body>"]
    out: list[str] = []
    for name, tp, required in _fields(shape):
        path = f"{where}.{name}" if where else name
        if name not in d:
            if required:
                out.append(path)
            continue
        out += _mismatch(tp, d[name], path)
    return out


def unknown_fields(shape: type, d: object, where: str = "") -> list[str]:
    """Dotted names of the fields ``d`` carries that ``shape`` does not declare (recursively):
    a field the daemon sends that this module, and so the docs, do not know."""
    if not isinstance(d, Mapping):
        return []
    known = {name: tp for name, tp, _ in _fields(shape)}
    out: list[str] = []
    for name, value in d.items():
        path = f"{where}.{name}" if where else str(name)
        tp = known.get(name)
        if tp is None:
            out.append(path)
            continue
        for inner in _bodies_in(tp):
            if isinstance(value, Mapping):
                out += unknown_fields(inner, value, path)
            elif isinstance(value, list):
                for i, x in enumerate(value):
                    out += unknown_fields(inner, x, f"{path}[{i}]")
    return out


def field_names(shape: type) -> list[str]:
    return [name for name, _, _ in _fields(shape)]


# -- the machinery -----------------------------------------------------------------------------
_FIELDS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}


def _fields(shape: type) -> tuple[tuple[str, Any, bool], ...]:
    spec = _FIELDS.get(shape)
    if spec is None:
        hints = typing.get_type_hints(shape)
        required: frozenset[str] = getattr(shape, "__required_keys__", frozenset())
        spec = tuple((name, tp, name in required) for name, tp in hints.items())
        _FIELDS[shape] = spec
    return spec


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


_CHECKERS: dict[Any, Callable[[object], bool]] = {}


def _accepts(tp: Any, v: object) -> bool:
    """Whether ``v`` has type ``tp`` (one compiled check per type: readers parse every
    queue row and sample, so this runs often)."""
    check = _CHECKERS.get(tp)
    if check is None:
        check = _CHECKERS[tp] = _compile(tp)
    return check(v)


def _compile(tp: Any) -> Callable[[object], bool]:
    if tp is bool:
        return lambda v: v is True or v is False
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if tp is str:
        return lambda v: isinstance(v, str)
    if tp is type(None) or tp is None:
        return lambda v: v is None
    args = _union_args(tp)
    if args is not None:
        checks = [_compile(a) for a in args]
        return lambda v: any(c(v) for c in checks)
    if typing.is_typeddict(tp):
        return lambda v: isinstance(v, Mapping)
    return lambda v: _accepts_slow(tp, v)


def _accepts_slow(tp: Any, v: object) -> bool:
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return v is None
    args = _union_args(tp)
    if args is not None:
        return any(_accepts(a, v) for a in args)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(v, list | tuple) and all(_accepts(item, x) for x in v)
    if origin is dict:
        _, val = typing.get_args(tp)
        return isinstance(v, Mapping) and all(_accepts(val, x) for x in v.values())
    if typing.is_typeddict(tp):
        return isinstance(v, Mapping)
    return isinstance(v, tp)


def _mismatch(tp: Any, v: object, path: str) -> list[str]:
    if not _accepts(tp, v):
        return [path]
    out: list[str] = []
    for inner in _bodies_in(tp):
        if isinstance(v, Mapping):
            out += missing_fields(inner, v, path)
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                out += missing_fields(inner, x, f"{path}[{i}]")
    return out


_BODIES_IN: dict[Any, list[type]] = {}


def _bodies_in(tp: Any) -> list[type]:
    """The TypedDicts a field's type holds directly, in a union or as list items."""
    got = _BODIES_IN.get(tp)
    if got is None:
        got = _BODIES_IN[tp] = _find_bodies(tp)
    return got


def _find_bodies(tp: Any) -> list[type]:
    args = _union_args(tp)
    if args is not None:
        return [b for a in args for b in _bodies_in(a)]
    if typing.get_origin(tp) is list:
        return _bodies_in(typing.get_args(tp)[0])
    return [tp] if typing.is_typeddict(tp) else []


def _default(tp: Any) -> object:
    args = _union_args(tp)
    if args is not None:
        if type(None) in args:
            return None
        return _default(args[0])
    if typing.is_typeddict(tp):
        return _parse(tp, {})
    origin = typing.get_origin(tp) or tp
    return {bool: False, int: 0, float: 0.0, str: "", list: [], dict: {}}.get(origin)


def _coerce(tp: Any, v: object) -> object:
    """``v``, known to be accepted by ``tp``, with nested bodies parsed."""
    for inner in _bodies_in(tp):
        if isinstance(v, Mapping):
            return _parse(inner, v)
        if isinstance(v, list | tuple):
            return [_parse(inner, x) for x in v]
    if tp is float and isinstance(v, int):
        return float(v)
    return v


def _parse(shape: type, d: object) -> dict[str, Any]:
    src: Mapping[Any, Any] = d if isinstance(d, Mapping) else {}
    out: dict[str, Any] = dict(src)  # fields of newer daemons pass through
    for name, tp, required in _fields(shape):
        if name in src and _accepts(tp, src[name]):
            out[name] = _coerce(tp, src[name])
        elif required:
            out[name] = _default(tp)
        else:
            out.pop(name, None)
    return out

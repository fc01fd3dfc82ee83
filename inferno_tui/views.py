"""Immutable snapshots of daemon state, parsed defensively from wire dicts.

Widgets render these and nothing else. The shared bodies (queue rows, model states) are read
through infernod.protocol.bodies, the one declaration of their fields; every parser accepts
missing keys and wrong types (fields a newer daemon adds, or an older one lacks) and yields
None for what the daemon did not say, which the widgets show as "n/a".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferno_tui.fmt import num
from infernod.protocol import bodies
from infernod.protocol.vocabulary import LEVELS, PRIORITIES


def _d(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _l(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else []


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _i(value: Any) -> int | None:
    v = num(value)
    return None if v is None else int(v)


# -- models ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRow:
    name: str
    kind: str | None = None
    architecture: str | None = None
    param_count: int | None = None
    size_label: str | None = None
    quantization: str | None = None
    size_bytes: int | None = None
    context_length: int | None = None
    state: str = "available"
    memory_bytes: int | None = None
    keep_alive_left_s: float | None = None
    pinned: bool = False
    running: int | None = None
    has_chat_template: bool | None = None
    runner_pid: int | None = None  # the process hosting a loaded GGUF model
    runner_rss_bytes: int | None = None
    runner_cpu_s: float | None = None
    failed_reason: str | None = None  # state "failed": why its runner died
    slots: int | None = None  # loaded: sequences it decodes at once

    @property
    def loaded(self) -> bool:
        return self.state in ("loaded", "loading", "unloading")

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ModelRow:
        m = bodies.model_state_from_wire(d)
        return cls(
            name=m["name"] or "?",
            kind=m["kind"] or None,
            architecture=m["architecture"],
            param_count=m["param_count"],
            size_label=m["size_label"],
            quantization=m["quantization"],
            size_bytes=m["size_bytes"] if "size_bytes" in d else None,
            context_length=m["context_length"],
            state=m["state"] or "available",
            memory_bytes=m.get("memory_bytes"),
            keep_alive_left_s=m.get("keep_alive_left_s"),
            pinned=m.get("pinned", False),
            running=m.get("running"),
            has_chat_template=m["has_chat_template"] if "has_chat_template" in d else None,
            runner_pid=m.get("runner_pid"),
            runner_rss_bytes=m.get("runner_rss_bytes"),
            runner_cpu_s=m.get("runner_cpu_s"),
            failed_reason=m.get("failed_reason"),
            slots=_i(d.get("slots")),
        )


def models_from_list(models: Iterable[Any]) -> tuple[ModelRow, ...]:
    return tuple(sorted((ModelRow.from_wire(_d(m)) for m in models), key=lambda r: r.name))


def merge_loaded(rows: tuple[ModelRow, ...], loaded: Iterable[Any],
                 failed: Iterable[Any] = ()) -> tuple[ModelRow, ...]:
    """Apply the ``loaded`` (and ``failed``) lists of a ``models`` event to a table from
    models.list."""
    live = {w["name"]: (w, _d(x)) for x in loaded
            for w in (bodies.loaded_model_from_wire(x),)}
    dead = {f["name"]: f for f in map(bodies.model_failure_from_wire, failed)}
    out = []
    for row in rows:
        got = live.get(row.name)
        if got is None:
            f = dead.get(row.name)
            out.append(ModelRow(**{**row.__dict__,
                                   "state": "failed" if f is not None else "available",
                                   "memory_bytes": None, "keep_alive_left_s": None,
                                   "pinned": False, "running": None, "runner_pid": None,
                                   "runner_rss_bytes": None, "runner_cpu_s": None,
                                   "slots": None, "failed_reason": (f["failed_reason"] or None) if f else None}))
        else:
            w, raw = got
            out.append(ModelRow(**{**row.__dict__, "state": w["state"] or "loaded",
                                   "memory_bytes": _i(raw.get("memory_bytes")),
                                   "keep_alive_left_s": w["keep_alive_left_s"],
                                   "pinned": w["pinned"],
                                   "running": _i(raw.get("running")),
                                   "runner_pid": w["runner_pid"],
                                   "runner_rss_bytes": w.get("runner_rss_bytes"),
                                   "runner_cpu_s": w.get("runner_cpu_s"),
                                   "slots": _i(raw.get("slots")),
                                   "failed_reason": None}))
    return tuple(out)


# -- telemetry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuProcess:
    pid: int | None
    name: str | None
    used_memory_bytes: int | None
    is_daemon: bool


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str | None
    utilization_pct: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    clock_sm_mhz: float | None
    clock_mem_mhz: float | None
    fan_pct: float | None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_pct(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes

    @classmethod
    def from_wire(cls, i: int, d: Mapping[str, Any]) -> GpuView:
        procs = tuple(
            GpuProcess(_i(_d(p).get("pid")), _s(_d(p).get("name")),
                       _i(_d(p).get("used_memory_bytes")), bool(_d(p).get("is_daemon")))
            for p in _l(d.get("processes")))
        idx = _i(d.get("index"))
        return cls(
            index=i if idx is None else idx, name=_s(d.get("name")),
            utilization_pct=num(d.get("utilization_gpu_pct")),
            memory_used_bytes=_i(d.get("memory_used_bytes")),
            memory_total_bytes=_i(d.get("memory_total_bytes")),
            temperature_c=num(d.get("temperature_c")), power_w=num(d.get("power_w")),
            power_limit_w=num(d.get("power_limit_w")), clock_sm_mhz=num(d.get("clock_sm_mhz")),
            clock_mem_mhz=num(d.get("clock_mem_mhz")), fan_pct=num(d.get("fan_pct")),
            processes=procs)


@dataclass(frozen=True)
class SystemView:
    cpu_pct: float | None = None
    cpu_per_core_pct: tuple[float | None, ...] = ()
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    process_rss_bytes: int | None = None
    process_cpu_pct: float | None = None

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> SystemView:
        proc = _d(d.get("process"))
        return cls(
            cpu_pct=num(d.get("cpu_pct")),
            cpu_per_core_pct=tuple(num(x) for x in _l(d.get("cpu_per_core_pct"))),
            memory_used_bytes=_i(d.get("memory_used_bytes")),
            memory_total_bytes=_i(d.get("memory_total_bytes")),
            swap_used_bytes=_i(d.get("swap_used_bytes")),
            swap_total_bytes=_i(d.get("swap_total_bytes")),
            process_rss_bytes=_i(proc.get("rss_bytes")),
            process_cpu_pct=num(proc.get("cpu_pct")))


@dataclass(frozen=True)
class MetricsView:
    ts: float | None = None
    system: SystemView = field(default_factory=SystemView)
    gpu_available: bool = False
    gpu_reason: str | None = None
    gpus: tuple[GpuView, ...] = ()

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> MetricsView:
        gpu = _d(d.get("gpu"))
        gpus = tuple(GpuView.from_wire(i, _d(g)) for i, g in enumerate(_l(gpu.get("gpus"))))
        return cls(ts=num(d.get("ts")), system=SystemView.from_wire(_d(d.get("system"))),
                   gpu_available=bool(gpu.get("available")) and bool(gpus),
                   gpu_reason=_s(gpu.get("reason")) or ("no metrics yet" if not d else None),
                   gpus=gpus)


GPU_SERIES = ("util", "mem", "temp", "power", "clock_sm")


@dataclass(frozen=True)
class Histories:
    """Recent values per series name, oldest first (None where the field was missing)."""

    series: Mapping[str, tuple[float, ...]]

    def get(self, name: str) -> tuple[float, ...]:
        return self.series.get(name, ())


class MetricsHistory:
    """Rolling window of telemetry samples; ``snapshot()`` gives an immutable copy."""

    def __init__(self, maxlen: int = 300) -> None:
        self.maxlen = maxlen
        self._series: dict[str, deque[float]] = {}
        self.latest = MetricsView()

    def _add(self, name: str, value: float | None) -> None:
        if value is None:
            return
        self._series.setdefault(name, deque(maxlen=self.maxlen)).append(value)

    def add(self, m: MetricsView) -> None:
        self.latest = m
        self._add("cpu", m.system.cpu_pct)
        if m.system.memory_used_bytes is not None and m.system.memory_total_bytes:
            self._add("ram", 100 * m.system.memory_used_bytes / m.system.memory_total_bytes)
        for g in m.gpus:
            self._add(f"gpu{g.index}.util", g.utilization_pct)
            self._add(f"gpu{g.index}.mem", g.memory_pct)
            self._add(f"gpu{g.index}.temp", g.temperature_c)
            self._add(f"gpu{g.index}.power", g.power_w)
            self._add(f"gpu{g.index}.clock_sm", g.clock_sm_mhz)

    def clear(self) -> None:
        self._series.clear()

    def snapshot(self) -> Histories:
        return Histories({k: tuple(v) for k, v in self._series.items()})


# -- queue -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueRow:
    request_id: str
    state: str
    model: str | None
    priority: str | None
    client: str | None
    age_s: float | None
    deadline_in_s: float | None
    tokens: int | None
    position: int | None = None
    eta_s: float | None = None
    slot: int | None = None  # running: the engine slot it holds
    cached_tokens: int | None = None  # running: prompt tokens that slot's cache held

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> QueueRow:
        """From a ``bodies.QueueRow`` of any daemon (either old spelling)."""
        r = bodies.queue_row_from_wire(d)
        return cls(
            request_id=r["request_id"] or "?", state=r["state"] or "queued",
            model=r["model"] or None, priority=r["priority"] or None,
            client=r["client"] or r["session"] or None,
            age_s=num(d.get("age_s")), deadline_in_s=r["deadline_in_s"],
            tokens=_i(d.get("tokens")), position=r["position"],
            eta_s=num(d.get("eta_s")),  # eta_s: from the request's `queued` events
            slot=_i(d.get("slot")), cached_tokens=_i(d.get("cached_tokens")))


@dataclass(frozen=True)
class QueueView:
    rows: tuple[QueueRow, ...] = ()
    running: int | None = None
    queued: int | None = None
    level: str | None = None

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], level: str | None = None) -> QueueView:
        rows = tuple(QueueRow.from_wire(_d(x)) for x in _l(d.get("items")))
        rows = tuple(sorted(rows, key=lambda r: (r.state != "running", r.position or 0,
                                                 -(r.age_s or 0))))
        lv = d.get("level")
        if isinstance(lv, Mapping):
            lv = max((str(v) for v in lv.values()), key=_level_rank, default=None)
        counts = bodies.queue_snapshot_from_wire({k: d.get(k) for k in ("running", "queued",
                                                                         "waiting") if k in d})
        return cls(rows=rows,
                   running=counts["running"] if "running" in d else None,
                   queued=counts["queued"] if "queued" in d or "waiting" in d else None,
                   level=_s(lv) or level)


def _level_rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else 0


# -- stats -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsRow:
    group: str  # "model" | "priority" | "overall"
    name: str
    count: int | None
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    tps_p50: float | None
    e2e_p95: float | None


def _window(metric: Any, window: str) -> Mapping[str, Any]:
    return _d(_d(metric).get(window))


def stats_rows(summary: Mapping[str, Any], window: str = "5m") -> tuple[StatsRow, ...]:
    """One row per model and per priority (then overall) from a ``stats`` summary."""

    def row(group: str, name: str, metrics: Any) -> StatsRow:
        m = _d(metrics)
        ttft = _window(m.get("ttft_ms"), window)
        return StatsRow(group, name, _i(ttft.get("count")), num(ttft.get("p50")),
                        num(ttft.get("p95")), num(ttft.get("p99")),
                        num(_window(m.get("tokens_per_s"), window).get("p50")),
                        num(_window(m.get("e2e_ms"), window).get("p95")))

    out = [row("model", str(k), v) for k, v in sorted(_d(summary.get("by_model")).items())]
    prio = _d(summary.get("by_priority"))
    out += [row("priority", p, prio[p]) for p in PRIORITIES if p in prio]
    out += [row("priority", str(p), v) for p, v in sorted(prio.items()) if p not in PRIORITIES]
    if summary.get("overall"):
        out.append(row("overall", "all", summary.get("overall")))
    return tuple(out)


@dataclass(frozen=True)
class RecentLatency:
    """Recent per-request TTFT and tok/s (from ``profiles`` events and finished streams)."""

    ttft_ms: tuple[float, ...] = ()
    tokens_per_s: tuple[float, ...] = ()


def add_profile(recent: RecentLatency, profile: Mapping[str, Any],
                keep: int = 120) -> RecentLatency:
    ttft, tps = num(profile.get("ttft_ms")), num(profile.get("tokens_per_s"))
    return RecentLatency(
        (recent.ttft_ms + ((ttft,) if ttft is not None else ()))[-keep:],
        (recent.tokens_per_s + ((tps,) if tps is not None else ()))[-keep:])

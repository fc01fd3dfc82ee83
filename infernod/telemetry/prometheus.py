"""Optional Prometheus text exposition of the same figures the ``metrics``/``stats`` topics push.

For operators who already run Grafana. Off by default; the server starts it when
``[telemetry] prometheus_port`` is set. The collector reads the sampler's latest sample and a
fresh statistics summary at scrape time (no second sampling loop, no duplicated state), and
lives in its own :class:`~prometheus_client.CollectorRegistry` so nothing leaks into the
process-global default registry (which tests and other libraries share).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# sample GPU key -> (metric name, help, scale)
_GPU_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("utilization_gpu_pct", "inferno_gpu_utilization_percent", "GPU utilisation (NVML)", 1.0),
    (
        "utilization_memory_pct",
        "inferno_gpu_memory_utilization_percent",
        "Memory controller utilisation",
        1.0,
    ),
    ("memory_used_bytes", "inferno_gpu_memory_used_bytes", "GPU memory used", 1.0),
    ("memory_total_bytes", "inferno_gpu_memory_total_bytes", "GPU memory total", 1.0),
    ("temperature_c", "inferno_gpu_temperature_celsius", "GPU temperature", 1.0),
    ("power_w", "inferno_gpu_power_watts", "GPU power draw", 1.0),
    ("power_limit_w", "inferno_gpu_power_limit_watts", "GPU enforced power limit", 1.0),
    ("clock_sm_mhz", "inferno_gpu_clock_sm_hertz", "SM clock", 1e6),
    ("clock_mem_mhz", "inferno_gpu_clock_memory_hertz", "Memory clock", 1e6),
    ("fan_pct", "inferno_gpu_fan_percent", "Fan speed (absent where unsupported)", 1.0),
    ("performance_state", "inferno_gpu_performance_state", "Performance state (0 = P0)", 1.0),
)

_SYSTEM_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("cpu_pct", "inferno_system_cpu_percent", "Host CPU utilisation"),
    ("memory_used_bytes", "inferno_system_memory_used_bytes", "Host RAM used"),
    ("memory_available_bytes", "inferno_system_memory_available_bytes", "Host RAM available"),
    ("memory_total_bytes", "inferno_system_memory_total_bytes", "Host RAM total"),
    ("swap_used_bytes", "inferno_system_swap_used_bytes", "Swap used"),
)

_PROCESS_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("rss_bytes", "inferno_process_resident_memory_bytes", "Daemon resident set size"),
    ("threads", "inferno_process_threads", "Daemon threads"),
    ("open_fds", "inferno_process_open_fds", "Daemon open file descriptors"),
)

_STATS = ("p50", "p95", "p99", "mean", "max", "count")


class InfernoCollector(Collector):
    """Turns the latest telemetry sample and a stats summary into Prometheus metrics.

    ``latest_sample`` and ``stats_summary`` are called at each scrape (from the exporter's
    thread); either may return None (nothing yet). Request statistics become one gauge family
    per metric (``inferno_ttft_ms`` ...) labelled ``scope`` (overall/model/priority),
    ``scope_value``, ``window`` (1m/5m/1h/all) and ``stat`` (p50/p95/p99/mean/max/count).
    """

    def __init__(
        self,
        latest_sample: Callable[[], dict[str, Any] | None],
        stats_summary: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self._latest_sample = latest_sample
        self._stats_summary = stats_summary

    def collect(self) -> Iterator[Metric]:
        sample = self._latest_sample()
        if sample is not None:
            yield from self._gpu(sample.get("gpu") or {}, sample.get("energy_j") or {})
            yield from self._system(sample.get("system") or {})
        if self._stats_summary is not None:
            summary = self._stats_summary()
            if summary is not None:
                yield from self._stats(summary)

    def _gpu(self, gpu: dict[str, Any], energy: dict[str, float]) -> Iterator[Metric]:
        available = GaugeMetricFamily("inferno_gpu_available", "1 when NVML answers, else 0")
        available.add_metric([], 1.0 if gpu.get("available") else 0.0)
        yield available
        gpus = gpu.get("gpus") or []
        labels = ["gpu", "name"]
        for key, name, help_text, scale in _GPU_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for g in gpus:
                value = g.get(key)
                if value is not None:  # unsupported fields are absent, not zero
                    family.add_metric([str(g["index"]), str(g.get("name"))], float(value) * scale)
            yield family
        joules = CounterMetricFamily(
            "inferno_gpu_energy_joules", "GPU energy since daemon start", labels=labels
        )
        for g in gpus:
            if str(g["index"]) in energy:
                joules.add_metric(
                    [str(g["index"]), str(g.get("name"))], float(energy[str(g["index"])])
                )
        yield joules

    def _system(self, system: dict[str, Any]) -> Iterator[Metric]:
        for key, name, help_text in _SYSTEM_GAUGES:
            if system.get(key) is not None:
                yield GaugeMetricFamily(name, help_text, value=float(system[key]))
        process = system.get("process") or {}
        for key, name, help_text in _PROCESS_GAUGES:
            if process.get(key) is not None:
                yield GaugeMetricFamily(name, help_text, value=float(process[key]))

    def _stats(self, summary: dict[str, Any]) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        scopes: list[tuple[str, str, dict[str, Any]]] = [
            ("overall", "", summary.get("overall") or {})
        ]
        for key, groups in summary.items():
            if key.startswith("by_") and isinstance(groups, dict):
                scopes.extend((key[3:], value, metrics) for value, metrics in groups.items())
        for scope, scope_value, metrics in scopes:
            for metric, per_window in metrics.items():
                family = families.get(metric)
                if family is None:
                    family = families[metric] = GaugeMetricFamily(
                        f"inferno_{metric}",
                        f"Request {metric} over sliding windows (DDSketch quantiles)",
                        labels=["scope", "scope_value", "window", "stat"],
                    )
                for window in summary.get("windows", ()):
                    w = per_window.get(window) or {}
                    for stat in _STATS:
                        if w.get(stat) is not None:
                            family.add_metric([scope, scope_value, window, stat], float(w[stat]))
        yield from families.values()


def build_registry(
    latest_sample: Callable[[], dict[str, Any] | None],
    stats_summary: Callable[[], dict[str, Any] | None] | None = None,
) -> CollectorRegistry:
    """A private registry holding only :class:`InfernoCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InfernoCollector(latest_sample, stats_summary))
    return registry


class PrometheusExporter:
    """The HTTP endpoint (``/metrics``), bound to ``addr`` (loopback by default)."""

    def __init__(self, port: int, registry: CollectorRegistry, addr: str = "127.0.0.1") -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.addr = addr
        self.port: int = int(self._server.server_port)
        log.info("Prometheus exposition on http://%s:%d/metrics", addr, self.port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)


def start_exporter(
    port: int,
    latest_sample: Callable[[], dict[str, Any] | None],
    stats_summary: Callable[[], dict[str, Any] | None] | None = None,
    addr: str = "127.0.0.1",
) -> PrometheusExporter:
    """Serve the collector on ``addr:port`` (``port=0`` picks a free one; see ``.port``)."""
    return PrometheusExporter(port, build_registry(latest_sample, stats_summary), addr=addr)

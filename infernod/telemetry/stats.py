"""Streaming latency statistics over sliding windows, computed in the daemon.

Why sketches: the ``stats`` request and topic need p50/p95/p99 over 1 m, 5 m, 1 h and since
start, by model, by priority and overall, every few seconds. Sorting a ring buffer per query
grows with traffic and forgets everything older than the buffer; a DDSketch (``ddsketch``,
relative-accuracy guarantee, mergeable) costs a few bins per bucket and merges in
microseconds.

How windows work: each (group, metric) series keeps time-bucketed sketches, ``FINE_S``-second
buckets (for 1 m, 5 m and the trend) and ``COARSE_S``-second buckets (for 1 h), plus one
sketch since start. A window merges the buckets that *start* inside it, so it never includes
data older than its span; its edge is bucket-aligned (the 1 m window covers the last 50 to 60
seconds). The merge of a window's closed buckets is cached until a new bucket opens, so a
query merges two sketches per window, not sixty.

Time is passed in (``record(..., now)``, ``summary(now)``), the same clock for both (the
daemon uses ``time.monotonic()``); there is no sleeping and no I/O here. Thread-safe: the
event loop records and summarises, the Prometheus exporter thread summarises.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddsketch import DDSketch

FINE_S = 10.0
COARSE_S = 60.0
# name -> (span seconds, bucket width seconds)
WINDOWS: dict[str, tuple[float, float]] = {
    "1m": (60.0, FINE_S),
    "5m": (300.0, FINE_S),
    "1h": (3600.0, COARSE_S),
}
WINDOW_NAMES: tuple[str, ...] = ("1m", "5m", "1h", "all")
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))

# The metrics the profiler records; others are accepted too (any name works).
KNOWN_METRICS: tuple[str, ...] = (
    "ttft_ms",
    "itl_ms",
    "e2e_ms",
    "queue_wait_ms",
    "load_wait_ms",
    "tokenize_ms",
    "prefill_ms",
    "decode_ms",
    "detokenize_ms",
    "tokens_per_s",
)


@dataclass
class _Agg:
    """A sketch plus exact count/sum/min/max (DDSketch's own max is private API)."""

    sketch: DDSketch
    count: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, value: float) -> None:
        self.sketch.add(value)
        self.count += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def merge(self, other: _Agg) -> None:
        if other.count == 0:
            return
        self.sketch.merge(other.sketch)
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)


@dataclass
class _Series:
    """Time-bucketed sketches of one metric in one group."""

    fine: dict[int, _Agg] = field(default_factory=dict)  # bucket index -> agg
    coarse: dict[int, _Agg] = field(default_factory=dict)
    total: _Agg | None = None
    # (window name, current bucket index, version) -> merged closed buckets
    cache: dict[str, tuple[int, int, _Agg]] = field(default_factory=dict)
    version: int = 0  # bumped when a record lands in an already-closed bucket


class LatencyStats:
    """Percentiles, mean, max and count per metric, per group, per sliding window.

    ``relative_accuracy``: the sketch's stated relative error on quantiles (0.01 = 1 %).
    ``anomaly_factor``: flag a metric when its 1 m p95 is above ``factor`` times the p95 of
    the 1 h baseline (the last hour without its last two minutes) or below it divided by
    ``factor``; ``anomaly_ratio`` is that quotient. ``trend_threshold``: the trend is "rising"
    when the median of the last ``trend_window_s`` exceeds the median of the window before by
    more than this fraction, "falling" when below by as much, else "stable".
    ``min_count``: fewer values than this on either side give trend/anomaly ``None``/False.
    """

    def __init__(
        self,
        relative_accuracy: float = 0.01,
        anomaly_factor: float = 2.0,
        trend_threshold: float = 0.2,
        trend_window_s: float = 300.0,
        min_count: int = 5,
    ) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError("relative_accuracy must be within (0, 1)")
        if anomaly_factor <= 1.0:
            raise ValueError("anomaly_factor must be > 1")
        if trend_threshold <= 0.0:
            raise ValueError("trend_threshold must be > 0")
        if not FINE_S <= trend_window_s <= 1800.0:
            raise ValueError(f"trend_window_s must be within [{FINE_S}, 1800]")
        self.relative_accuracy = relative_accuracy
        self.anomaly_factor = anomaly_factor
        self.trend_threshold = trend_threshold
        self.trend_window_s = trend_window_s
        self.min_count = max(1, int(min_count))
        self._fine_keep_s = max(300.0, 2 * trend_window_s) + FINE_S
        self._coarse_keep_s = 3600.0 + COARSE_S
        # group key ("overall" or (label, value)) -> metric -> series
        self._groups: dict[Any, dict[str, _Series]] = {}
        self._lock = threading.Lock()
        self.started_at: float | None = None

    def _agg(self) -> _Agg:
        return _Agg(DDSketch(relative_accuracy=self.relative_accuracy))

    # ------------------------------------------------------------------ writing
    def record(
        self,
        metric: str,
        value: float | None,
        labels: Mapping[str, Any] | None = None,
        now: float = 0.0,
    ) -> None:
        """Add one value to the overall group and to one group per label (model=..., ...).

        ``None`` and NaN are ignored (a phase that did not happen is not a zero).
        """
        if value is None:
            return
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return
        keys: list[Any] = ["overall"]
        for label, label_value in (labels or {}).items():
            if label_value is not None:
                keys.append((str(label), str(label_value)))
        fine_i = int(now // FINE_S)
        coarse_i = int(now // COARSE_S)
        with self._lock:
            if self.started_at is None:
                self.started_at = now
            for key in keys:
                series = self._groups.setdefault(key, {}).get(metric)
                if series is None:
                    series = self._groups[key][metric] = _Series()
                self._add(series, value, fine_i, coarse_i)

    def record_many(
        self,
        metric: str,
        values: Iterable[float],
        labels: Mapping[str, Any] | None = None,
        now: float = 0.0,
    ) -> None:
        """Record several values of one metric at once (e.g. a request's inter-token gaps)."""
        for v in values:
            self.record(metric, v, labels, now)

    def _add(self, series: _Series, value: float, fine_i: int, coarse_i: int) -> None:
        for buckets, i in ((series.fine, fine_i), (series.coarse, coarse_i)):
            agg = buckets.get(i)
            if agg is None:
                agg = buckets[i] = self._agg()
            if buckets and i < max(buckets):
                series.version += 1  # late value in a closed bucket: cached merges are stale
            agg.add(value)
        # A value older than a cached merge's current bucket (a summary taken at a later
        # ``now`` than this record's, e.g. in another thread) lands in a closed bucket too.
        for key, (current, _, _) in series.cache.items():
            if current > (fine_i if WINDOWS.get(key, (0.0, COARSE_S))[1] == FINE_S
                          else coarse_i):
                series.version += 1
                break
        if series.total is None:
            series.total = self._agg()
        series.total.add(value)

    # ------------------------------------------------------------------ reading
    def _prune(self, series: _Series, now: float) -> None:
        oldest_fine = int((now - self._fine_keep_s) // FINE_S)
        for i in [i for i in series.fine if i < oldest_fine]:
            del series.fine[i]
        oldest_coarse = int((now - self._coarse_keep_s) // COARSE_S)
        for i in [i for i in series.coarse if i < oldest_coarse]:
            del series.coarse[i]

    def _range(self, buckets: dict[int, _Agg], first: int, last: int) -> _Agg:
        out = self._agg()
        for i, agg in buckets.items():
            if first <= i <= last:
                out.merge(agg)
        return out

    def _closed(
        self, series: _Series, key: str, buckets: dict[int, _Agg], first: int, current: int
    ) -> _Agg:
        """Merge of buckets ``first .. current-1``, cached until a new bucket opens or a late
        value lands in a closed one."""
        cached = series.cache.get(key)
        if cached is not None and cached[0] == current and cached[1] == series.version:
            return cached[2]
        closed = self._range(buckets, first, current - 1)
        series.cache[key] = (current, series.version, closed)
        return closed

    def _window(self, series: _Series, name: str, now: float) -> _Agg:
        """Merge the buckets that start within the window: cached closed part + current."""
        span, width = WINDOWS[name]
        buckets = series.fine if width == FINE_S else series.coarse
        current = int(now // width)
        first = current - int(round(span / width)) + 1
        out = self._agg()
        out.merge(self._closed(series, name, buckets, first, current))
        cur = buckets.get(current)
        if cur is not None:
            out.merge(cur)
        return out

    def _baseline(self, series: _Series, now: float) -> _Agg:
        """The 1 h baseline for anomalies, without the last two minute-buckets (they hold the
        1 m window): a spike must not raise its own baseline."""
        current = int(now // COARSE_S)
        span = int(round(WINDOWS["1h"][0] / COARSE_S))
        return self._closed(series, "baseline", series.coarse, current - span + 1, current - 1)

    def _describe(self, agg: _Agg) -> dict[str, float | int | None]:
        if agg.count == 0:
            return {
                "count": 0,
                "mean": None,
                "min": None,
                "max": None,
                "p50": None,
                "p95": None,
                "p99": None,
            }
        out: dict[str, float | int | None] = {
            "count": agg.count,
            "mean": agg.total / agg.count,
            "min": agg.min,
            "max": agg.max,
        }
        for name, q in QUANTILES:
            v = agg.sketch.get_quantile_value(q)
            # Clamp to the exact extremes: the sketch's bin midpoint may overshoot them.
            out[name] = None if v is None else min(max(v, agg.min), agg.max)
        return out

    def _trend(self, series: _Series, now: float) -> str | None:
        """Median of the last trend window vs the one before it (fine buckets)."""
        n = int(round(self.trend_window_s / FINE_S))
        current = int(now // FINE_S)
        recent = self._range(series.fine, current - n + 1, current)
        previous = self._range(series.fine, current - 2 * n + 1, current - n)
        if recent.count < self.min_count or previous.count < self.min_count:
            return None
        a = recent.sketch.get_quantile_value(0.5)
        b = previous.sketch.get_quantile_value(0.5)
        if a is None or b is None:
            return None
        if b <= 0:
            return "rising" if a > 0 else "stable"
        ratio = a / b
        if ratio > 1.0 + self.trend_threshold:
            return "rising"
        if ratio < 1.0 / (1.0 + self.trend_threshold):
            return "falling"
        return "stable"

    def _anomaly(self, recent: dict[str, Any], baseline: _Agg) -> tuple[bool, float | None]:
        if recent["count"] < self.min_count or baseline.count < self.min_count:
            return False, None
        r, b = recent["p95"], self._describe(baseline)["p95"]
        if r is None or b is None or b <= 0:
            return False, None
        ratio = r / b
        return (ratio > self.anomaly_factor or ratio < 1.0 / self.anomaly_factor), ratio

    def _metric(self, series: _Series, now: float) -> dict[str, Any]:
        self._prune(series, now)
        out: dict[str, Any] = {
            name: self._describe(self._window(series, name, now)) for name in WINDOWS
        }
        out["all"] = self._describe(series.total if series.total is not None else self._agg())
        anomaly, ratio = self._anomaly(out["1m"], self._baseline(series, now))
        out["trend"] = self._trend(series, now)
        out["anomaly"] = anomaly
        out["anomaly_ratio"] = ratio
        return out

    def metric(
        self, metric: str, now: float, label: str | None = None, value: Any = None
    ) -> dict[str, Any] | None:
        """Summary of one metric in one group (overall when ``label`` is None), or None."""
        key: Any = "overall" if label is None else (label, str(value))
        with self._lock:
            series = self._groups.get(key, {}).get(metric)
            return None if series is None else self._metric(series, now)

    def summary(self, now: float) -> dict[str, Any]:
        """Everything, for the ``stats`` request/topic:

        ``{"now": now, "relative_accuracy": 0.01, "anomaly_factor": 2.0,
        "windows": ["1m", "5m", "1h", "all"],
        "overall": {metric: M}, "by_model": {model: {metric: M}}, "by_priority": {...}}``
        (one ``by_<label>`` per label seen), where ``M = {"1m": W, "5m": W, "1h": W, "all": W,
        "trend": "rising"|"falling"|"stable"|None, "anomaly": bool, "anomaly_ratio": float|None}``
        and ``W = {"count", "mean", "min", "max", "p50", "p95", "p99"}`` (None when empty).
        """
        out: dict[str, Any] = {
            "now": now,
            "relative_accuracy": self.relative_accuracy,
            "anomaly_factor": self.anomaly_factor,
            "windows": list(WINDOW_NAMES),
            "overall": {},
        }
        with self._lock:
            groups = [(key, sorted(self._groups[key].items())) for key in
                      sorted(self._groups, key=lambda k: ("", "") if k == "overall" else k)]
        for key, series in groups:
            metrics = {}
            for m, s in series:
                # The lock per series, not around all of them (~20 ms for a few models and
                # priorities): the event loop's record() never waits for a whole summary.
                with self._lock:
                    metrics[m] = self._metric(s, now)
            if key == "overall":
                out["overall"] = metrics
            else:
                label, value = key
                out.setdefault(f"by_{label}", {})[value] = metrics
        return out

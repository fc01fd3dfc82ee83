"""LatencyStats (DDSketch windows, trend, anomaly) and the Profiler. Time is injected: no
sleeps, no clocks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from infernod.telemetry.profiler import STAT_FIELDS, Profiler, RequestProfile, summarize_itl
from infernod.telemetry.stats import LatencyStats

ALPHA = 0.01


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261126)
    return {
        "lognormal": rng.lognormal(mean=3.0, sigma=1.0, size=20000),
        "uniform": rng.uniform(1.0, 500.0, size=20000),
        "bimodal": np.concatenate([rng.normal(20.0, 2.0, 12000), rng.normal(400.0, 40.0, 8000)]),
    }


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_percentiles_match_numpy_within_the_sketch_accuracy(dist):
    data = _distributions()[dist]
    data = data[data > 0]
    stats = LatencyStats(relative_accuracy=ALPHA)
    for i, v in enumerate(data):
        stats.record("e2e_ms", float(v), now=i * 0.002)  # 40 s: all inside the 1m window
    now = len(data) * 0.002
    m = stats.metric("e2e_ms", now)
    assert m is not None
    for window in ("1m", "5m", "1h", "all"):
        w = m[window]
        assert w["count"] == len(data)
        assert w["mean"] == pytest.approx(float(np.mean(data)), rel=1e-9)
        assert w["max"] == float(np.max(data)) and w["min"] == float(np.min(data))
        for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
            # The sketch answers a value within ALPHA of an order statistic at that rank.
            lo = np.percentile(data, q, method="lower")
            hi = np.percentile(data, q, method="higher")
            assert lo * (1 - ALPHA) <= w[name] <= hi * (1 + ALPHA), (window, name, w[name], lo, hi)
            if hi - lo < 1e-3 * lo:  # dense region: compare with numpy's interpolated value too
                assert w[name] == pytest.approx(np.percentile(data, q), rel=ALPHA)


def test_coarser_accuracy_is_honoured_and_stated():
    data = _distributions()["lognormal"]
    stats = LatencyStats(relative_accuracy=0.05)
    for v in data:
        stats.record("ttft_ms", float(v), now=1.0)
    s = stats.summary(now=2.0)
    assert s["relative_accuracy"] == 0.05
    p95 = s["overall"]["ttft_ms"]["all"]["p95"]
    assert p95 == pytest.approx(np.percentile(data, 95), rel=0.05)
    assert p95 != pytest.approx(np.percentile(data, 95), rel=1e-4)  # really a sketch, not a sort


def test_groups_by_model_and_priority_and_overall():
    stats = LatencyStats()
    for v in range(1, 11):
        stats.record("ttft_ms", float(v), {"model": "a", "priority": "high"}, now=5.0)
        stats.record("ttft_ms", 100.0 * v, {"model": "b", "priority": "low"}, now=5.0)
    stats.record("tokens_per_s", 50.0, {"model": "a", "priority": None}, now=5.0)
    s = stats.summary(now=6.0)
    assert s["windows"] == ["1m", "5m", "1h", "all"]
    assert s["overall"]["ttft_ms"]["all"]["count"] == 20
    assert s["overall"]["ttft_ms"]["all"]["max"] == 1000.0
    assert s["by_model"]["a"]["ttft_ms"]["1m"]["max"] == 10.0
    assert s["by_model"]["b"]["ttft_ms"]["1m"]["count"] == 10
    assert s["by_priority"]["high"]["ttft_ms"]["5m"]["mean"] == pytest.approx(5.5)
    assert s["by_priority"]["low"]["ttft_ms"]["1h"]["p50"] == pytest.approx(500.0, rel=0.02)
    assert "tokens_per_s" in s["by_model"]["a"] and "tokens_per_s" not in s["by_priority"].get(
        "high", {}
    )


def test_sliding_windows_drop_old_data():
    stats = LatencyStats()
    for _ in range(100):
        stats.record("e2e_ms", 1000.0, now=0.0)
    for _ in range(50):
        stats.record("e2e_ms", 10.0, now=100.0)

    def w(now: float) -> dict:
        m = stats.metric("e2e_ms", now)
        assert m is not None
        return m

    assert w(59.9)["1m"]["count"] == 100  # bucket [0, 10) is inside the last minute
    assert w(60.0)["1m"]["count"] == 0  # never data older than the window
    at = w(100.5)
    assert at["1m"]["count"] == 50 and at["1m"]["max"] == 10.0
    assert at["5m"]["count"] == 150 and at["5m"]["max"] == 1000.0
    at = w(350.0)
    assert at["1m"]["count"] == 0 and at["5m"]["count"] == 50 and at["1h"]["count"] == 150
    at = w(3700.0)
    assert at["5m"]["count"] == 0 and at["1h"]["count"] == 0
    assert at["1h"]["p95"] is None and at["1h"]["mean"] is None
    assert at["all"]["count"] == 150  # since start keeps everything


def test_memory_stays_bounded_over_long_runs():
    stats = LatencyStats()
    for t in range(0, 20000, 2):
        stats.record("itl_ms", 5.0, now=float(t))
    stats.summary(now=20000.0)
    series = stats._groups["overall"]["itl_ms"]
    assert len(series.fine) <= 62 and len(series.coarse) <= 62
    assert stats.metric("itl_ms", 20000.0)["all"]["count"] == 10000


def test_cached_window_merges_see_new_and_late_values():
    stats = LatencyStats()
    for t in range(0, 50):
        stats.record("ttft_ms", 10.0, now=float(t))
    assert stats.metric("ttft_ms", 55.0)["1m"]["count"] == 50
    stats.record("ttft_ms", 20.0, now=55.0)  # current bucket
    assert stats.metric("ttft_ms", 56.0)["1m"]["count"] == 51
    stats.record("ttft_ms", 30.0, now=15.0)  # late value into a closed, cached bucket
    m = stats.metric("ttft_ms", 57.0)
    assert m["1m"]["count"] == 52 and m["1m"]["max"] == 30.0


def test_a_value_recorded_after_a_later_summary_is_counted():
    """The statistics' thread may take a summary at a later ``now`` than a profile it
    records next (its time was read on the loop first): that value lands in the bucket the
    summary had closed and cached, and still counts, in every window."""
    stats = LatencyStats()
    stats.record("ttft_ms", 10.0, now=5.0)
    assert stats.metric("ttft_ms", 10.5)["1m"]["count"] == 1  # bucket 0 closed and cached
    stats.record("ttft_ms", 20.0, now=9.9)  # the latest bucket there is, but a closed one
    m = stats.metric("ttft_ms", 10.6)
    assert m["1m"]["count"] == m["5m"]["count"] == m["all"]["count"] == 2, m
    stats.record("ttft_ms", 30.0, now=59.9)  # coarse: the 1 h window's closed minute
    assert stats.metric("ttft_ms", 60.5)["1h"]["count"] == 3
    stats.record("ttft_ms", 40.0, now=59.95)
    assert stats.metric("ttft_ms", 60.6)["1h"]["count"] == 4


def test_none_nan_and_inf_are_ignored():
    stats = LatencyStats()
    stats.record("prefill_ms", None, now=1.0)
    stats.record("prefill_ms", float("nan"), now=1.0)
    stats.record("prefill_ms", float("inf"), now=1.0)
    assert stats.metric("prefill_ms", 2.0) is None
    stats.record("prefill_ms", 0.0, now=1.0)  # zero is a real value
    assert stats.metric("prefill_ms", 2.0)["all"]["count"] == 1


@pytest.mark.parametrize(
    "before, after, expected",
    [(100.0, 200.0, "rising"), (200.0, 100.0, "falling"), (100.0, 105.0, "stable")],
)
def test_trend_compares_recent_window_with_the_previous(before, after, expected):
    stats = LatencyStats(trend_threshold=0.2, trend_window_s=300.0)
    rng = np.random.default_rng(7)
    for t in range(0, 300, 3):
        stats.record("e2e_ms", before * rng.uniform(0.95, 1.05), now=float(t))
    for t in range(300, 600, 3):
        stats.record("e2e_ms", after * rng.uniform(0.95, 1.05), now=float(t))
    assert stats.metric("e2e_ms", 599.0)["trend"] == expected


def test_trend_is_unknown_without_enough_data():
    stats = LatencyStats(min_count=5)
    for t in range(300, 600, 3):
        stats.record("e2e_ms", 100.0, now=float(t))
    assert stats.metric("e2e_ms", 599.0)["trend"] is None  # nothing in the previous window


def test_anomaly_when_1m_p95_departs_from_1h_baseline():
    def run(recent_value: float, factor: float) -> dict:
        stats = LatencyStats(anomaly_factor=factor)
        for t in range(0, 3000, 5):
            stats.record("ttft_ms", 100.0, {"model": "m"}, now=float(t))
        for t in range(3000, 3060):
            stats.record("ttft_ms", recent_value, {"model": "m"}, now=float(t))
        return stats.summary(now=3061.0)

    spike = run(500.0, 2.0)
    m = spike["overall"]["ttft_ms"]
    assert m["anomaly"] is True and m["anomaly_ratio"] > 2.0
    assert spike["by_model"]["m"]["ttft_ms"]["anomaly"] is True
    assert run(500.0, 10.0)["overall"]["ttft_ms"]["anomaly"] is False  # threshold respected
    calm = run(100.0, 2.0)["overall"]["ttft_ms"]
    assert calm["anomaly"] is False and calm["anomaly_ratio"] == pytest.approx(1.0, rel=0.02)
    drop = run(10.0, 2.0)["overall"]["ttft_ms"]  # a collapse (e.g. tokens/s) departs too
    assert drop["anomaly"] is True and drop["anomaly_ratio"] < 0.5


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        LatencyStats(relative_accuracy=0.0)
    with pytest.raises(ValueError):
        LatencyStats(anomaly_factor=1.0)
    with pytest.raises(ValueError):
        LatencyStats(trend_window_s=1.0)


# ---------------------------------------------------------------------------- profiler
def _profile(i: int, model: str = "gemma", priority: str = "normal") -> RequestProfile:
    return RequestProfile(
        request_id=f"r{i}",
        client="cli",
        model=model,
        priority=priority,
        queue_wait_ms=float(i),
        tokenize_ms=1.0,
        prefill_ms=20.0,
        decode_ms=200.0,
        ttft_ms=25.0 + i,
        e2e_ms=230.0 + i,
        prompt_tokens=12,
        completion_tokens=40,
        tokens_per_s=200.0,
        finish_reason="stop",
        started_at=1000.0 + i,
        finished_at=1000.25 + i,
    )


def test_profiler_ring_buffer_keeps_the_latest():
    profiler = Profiler(ring_size=3, stats=LatencyStats())
    for i in range(5):
        profiler.finish(_profile(i), now=float(i))
    assert [p.request_id for p in profiler.recent()] == ["r2", "r3", "r4"]
    assert [p.request_id for p in profiler.recent(2)] == ["r3", "r4"]
    assert profiler.recent(0) == [] and profiler.ring_size == 3 and profiler.finished_total == 5


def test_profiler_records_into_stats_by_model_and_priority():
    stats = LatencyStats()
    profiler = Profiler(stats=stats)
    for i in range(10):
        profiler.finish(_profile(i, model="a" if i % 2 else "b", priority="high"), now=10.0)
    s = stats.summary(now=11.0)
    assert s["overall"]["ttft_ms"]["all"]["count"] == 10
    assert s["overall"]["ttft_ms"]["all"]["max"] == 34.0
    assert s["by_model"]["a"]["e2e_ms"]["1m"]["count"] == 5
    assert s["by_priority"]["high"]["queue_wait_ms"]["all"]["max"] == 9.0
    assert "load_wait_ms" not in s["overall"]  # None fields are not recorded as zeros
    assert set(s["overall"]) <= set(STAT_FIELDS) | {"itl_ms"}


def test_itl_samples_are_token_weighted_and_summarised():
    stats = LatencyStats()
    profiler = Profiler(stats=stats)
    gaps = [10.0] * 95 + [100.0] * 5
    profile = _profile(1)
    profiler.finish(profile, now=1.0, itl_samples_ms=gaps)
    assert profile.itl_ms == {
        "mean": pytest.approx(14.5),
        "p50": 10.0,
        "p95": pytest.approx(14.5),
        "max": 100.0,
    }
    itl = stats.metric("itl_ms", 2.0)["all"]
    assert itl["count"] == 100 and itl["max"] == 100.0
    other = _profile(2)
    other.itl_ms = summarize_itl([4.0, 6.0])
    profiler.finish(other, now=1.0)  # no raw gaps: its mean counts once
    assert stats.metric("itl_ms", 2.0)["all"]["count"] == 101
    assert summarize_itl([]) is None


def test_profile_to_dict_has_every_field():
    d = _profile(3).to_dict()
    for key in (
        "request_id",
        "client",
        "model",
        "priority",
        "queue_wait_ms",
        "load_wait_ms",
        "tokenize_ms",
        "prefill_ms",
        "decode_ms",
        "detokenize_ms",
        "ttft_ms",
        "itl_ms",
        "e2e_ms",
        "prompt_tokens",
        "prompt_cached_tokens",
        "completion_tokens",
        "tokens_per_s",
        "finish_reason",
        "rss_bytes_start",
        "rss_bytes_end",
        "gpu_memory_bytes_start",
        "gpu_memory_bytes_end",
        "energy_j",
        "started_at",
        "finished_at",
    ):
        assert key in d
    assert d["request_id"] == "r3" and d["energy_j"] is None and d["ttft_ms"] == 28.0
    assert msgpack.unpackb(msgpack.packb(d)) == d

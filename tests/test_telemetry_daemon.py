"""Telemetry in the real daemon: metrics samples, request profiles, statistics, Prometheus.

No NVIDIA driver here: the samples must say so and everything else must work.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import psutil
import pytest

from infernod.client import Event

MODEL = "gemma3-270m"
PHASES = ("queue_wait_ms", "load_wait_ms", "tokenize_ms", "prefill_ms", "decode_ms",
          "detokenize_ms", "ttft_ms", "e2e_ms")
FAST = {"telemetry": {"sample_hz": 10.0, "stats_interval_s": 0.5}}


def _collect(c, topic: str, n: int, timeout: float = 30.0) -> list:
    """Pump until ``n`` events of ``topic`` arrived (bounded: only a hang fails here)."""
    end = time.monotonic() + timeout
    got = []
    while len(got) < n:
        assert time.monotonic() < end, f"only {len(got)} of {n} '{topic}' events"
        got += [ev for ev in c.event_batch(0.1) if isinstance(ev, Event) and ev.topic == topic]
    return got


def _generate(c, n: int, max_tokens: int = 6) -> list[dict]:
    stats = []
    for i in range(n):
        stream = c.generate(MODEL, f"Count to {i + 3}:", max_tokens=max_tokens,
                            temperature=0.0, ignore_eos=True)
        for _ in stream:
            pass
        stats.append(stream.stats)
    return stats


def test_metrics_topic_and_welcome_without_gpu(daemon_factory):
    d = daemon_factory(FAST)
    with d.client(topics=("metrics",)) as c:
        c.wait_welcome()
        samples = _collect(c, "metrics", 3)
    for ev in samples:
        assert ev.type == "metrics"
        system, gpu = ev.body["system"], ev.body["gpu"]
        assert gpu["available"] is False and gpu["gpus"] == [] and gpu["reason"]
        assert system["memory_total_bytes"] > 0 and system["cpu_count"] >= 1
        assert len(system["cpu_per_core_pct"]) == system["cpu_count"]
        assert system["process"]["pid"] == d.pid and system["process"]["rss_bytes"] > 0
    assert samples[0].body["ts"] < samples[-1].body["ts"]
    # A newcomer gets the latest sample in its welcome, before the next one is published.
    with d.client() as late:
        welcome = late.wait_welcome()
        state = welcome["state"]["metrics"]
        assert state["header"]["topic"] == "metrics"
        assert state["body"]["system"]["process"]["pid"] == d.pid
        assert state["header"]["seq"] >= samples[-1].seq
        latest = late.metrics()
        assert latest is not None and latest["ts"] >= state["body"]["ts"]
        assert latest["gpu"]["available"] is False


def test_profiles_stats_and_recent(daemon_factory):
    d = daemon_factory(FAST)
    n = 4
    with d.client(topics=("profiles", "stats")) as c:
        c.wait_welcome()
        done = _generate(c, n)
        profiles = [ev.body for ev in _collect(c, "profiles", n)]
        summary = c.stats()
        recent = c.request("profiles.recent", {"n": 2})
        pushed = _collect(c, "stats", 1)[0].body
    by_id = {p["request_id"]: p for p in profiles}
    # The first request waited for the model to load (a fresh daemon), the others did not.
    assert profiles[0]["load_wait_ms"] > 10 * max(p["load_wait_ms"] for p in profiles[1:])
    assert profiles[0]["queue_wait_ms"] >= profiles[0]["load_wait_ms"]
    assert len(by_id) == n
    for p, stats in zip(profiles, done, strict=True):
        assert p["model"] == MODEL and p["priority"] == "normal" and p["client"]
        assert p["finish_reason"] == "length"
        for phase in PHASES:
            assert isinstance(p[phase], float) and p[phase] >= 0, phase
        assert p["completion_tokens"] == stats["completion_tokens"] == 6
        assert p["prompt_tokens"] > 0 and 0 <= p["prompt_cached_tokens"] <= p["prompt_tokens"]
        assert p["tokens_per_s"] > 0
        assert p["itl_ms"]["p50"] > 0 and p["itl_ms"]["max"] >= p["itl_ms"]["p95"]
        assert p["ttft_ms"] <= p["e2e_ms"] and p["queue_wait_ms"] <= p["ttft_ms"]
        assert p["rss_bytes_start"] > 0 and p["rss_bytes_end"] > 0
        assert p["gpu_memory_bytes_start"] is None and p["energy_j"] is None  # no NVML here
        assert p["started_at"] <= p["finished_at"]
    # The daemon's statistics count exactly these requests and agree with their profiles.
    overall = summary["overall"]
    for metric in ("ttft_ms", "e2e_ms", "decode_ms", "queue_wait_ms"):
        values = sorted(p[metric] for p in profiles)
        for window in ("1m", "all"):
            w = overall[metric][window]
            assert w["count"] == n, (metric, window)
            assert w["min"] == pytest.approx(values[0]) and w["max"] == pytest.approx(values[-1])
            assert w["mean"] == pytest.approx(sum(values) / n)
            # DDSketch: the value at rank floor(q * (n - 1)) within its 1 % relative error.
            assert w["p50"] == pytest.approx(values[(n - 1) // 2], rel=0.02)
            assert values[0] <= w["p50"] <= w["p95"] <= w["p99"] <= values[-1]
    itl_count = sum(p["completion_tokens"] - 1 for p in profiles)  # every raw gap recorded
    assert overall["itl_ms"]["all"]["count"] == itl_count
    assert summary["by_model"][MODEL]["e2e_ms"]["all"]["count"] == n
    assert summary["by_priority"]["normal"]["ttft_ms"]["all"]["count"] == n
    assert overall["ttft_ms"]["anomaly"] is False
    assert pushed["overall"]["e2e_ms"]["all"]["count"] == n  # the 'stats' topic
    assert [p["request_id"] for p in recent["profiles"]] == [p["request_id"]
                                                              for p in profiles[-2:]]
    assert recent["finished_total"] == n and recent["ring_size"] == 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_prometheus_exporter(daemon_factory):
    port = _free_port()
    d = daemon_factory({"telemetry": {"prometheus_port": port, "sample_hz": 10.0}})
    with d.client() as c:
        c.wait_welcome()
        _generate(c, 2, max_tokens=4)
        assert c.request("metrics.get")["prometheus_port"] == port
    assert port in _listening_ports(d.pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "inferno_gpu_available 0.0" in text
    assert "inferno_system_memory_total_bytes" in text
    assert "inferno_process_resident_memory_bytes" in text
    lines = [ln for ln in text.splitlines()
             if ln.startswith("inferno_ttft_ms{") and 'scope="overall"' in ln
             and 'window="all"' in ln and 'stat="count"' in ln]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == 2.0
    assert f'scope="model",scope_value="{MODEL}"' in text


def test_no_listener_when_prometheus_disabled(daemon_factory):
    d = daemon_factory()
    with d.client() as c:
        assert c.request("metrics.get")["prometheus_port"] == 0
    assert _listening_ports(d.pid) == set()

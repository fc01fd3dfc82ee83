"""Telemetry: NVML replay of a real H100 trace, the no-driver path, the sampler thread, energy,
Prometheus exposition. No GPU needed: ``tests/fake_pynvml.py`` replays the recorded trace."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any

import msgpack
import numpy as np
import pynvml
import pytest
from fake_pynvml import TRACE_PATH, FakePynvml, load_trace
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infernod.config import Config
from infernod.daemon.requests import Kind, Request
from infernod.telemetry.nvml import GPU_FIELDS, NvmlReader
from infernod.telemetry.prometheus import build_registry, start_exporter
from infernod.telemetry.sampler import TelemetrySampler
from infernod.telemetry.service import TelemetryService
from infernod.telemetry.stats import LatencyStats
from infernod.telemetry.system import SystemReader

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(not TRACE_PATH.exists(), reason=f"NVML trace missing: {TRACE_PATH}")


@pytest.fixture(scope="module")
def trace() -> dict[str, Any]:
    return load_trace()


@pytest.fixture(scope="module")
def system() -> SystemReader:
    return SystemReader()


def replay(
    trace: dict[str, Any], system: SystemReader, **fake_kw: Any
) -> tuple[list[dict[str, Any]], TelemetrySampler]:
    """Publish one sample per recorded row, at the row's own timestamp."""
    fake = FakePynvml(trace, **fake_kw)
    published: list[dict[str, Any]] = []
    sampler = TelemetrySampler(
        rate_hz=4.0,
        on_sample=published.append,
        nvml=NvmlReader(fake, own_pid=trace["load_pid"]),
        system=system,
    )
    for i, row in enumerate(trace["samples"]):
        fake.index = i
        sampler.sample_once(now=row[0]["t"])
    return published, sampler


def smi_rows(trace: dict[str, Any]) -> list[dict[str, float]]:
    """nvidia-smi's CSV (timestamp UTC, util %, memory.used MiB, power W, temp C, SM MHz)."""
    rows = []
    for line in trace["nvidia_smi_csv"]:
        stamp, util, mem, power, temp, sm = (x.strip() for x in line.split(","))
        when = dt.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
        rows.append(
            {
                "t": when.timestamp(),
                "util": float(util),
                "mem_mib": float(mem),
                "power_w": float(power),
                "temp_c": float(temp),
                "sm_mhz": float(sm),
            }
        )
    return rows


# ---------------------------------------------------------------------------- trace replay
def test_replay_publishes_the_recorded_values_with_units_converted(trace, system):
    published, _ = replay(trace, system)
    assert len(published) == len(trace["samples"])
    device = trace["devices"][0]
    for sample, row in zip(published, trace["samples"], strict=True):
        rec = row[0]
        assert sample["ts"] == rec["t"]
        gpu = sample["gpu"]
        assert gpu["available"] is True and gpu["driver_version"] == trace["driver_version"]
        assert len(gpu["gpus"]) == 1
        g = gpu["gpus"][0]
        assert list(g) == list(GPU_FIELDS)
        assert g["index"] == 0 and g["name"] == device["name"] and g["uuid"] == device["uuid"]
        assert g["utilization_gpu_pct"] == rec["utilization"]["gpu"]
        assert g["utilization_memory_pct"] == rec["utilization"]["memory"]
        # v1 memory info (the fake answers like a driver without the v2 call)
        assert g["memory_used_bytes"] == rec["memory"]["used"]
        assert g["memory_total_bytes"] == rec["memory"]["total"] == device["memory_total"]
        assert g["memory_free_bytes"] == rec["memory"]["free"]
        assert g["memory_reserved_bytes"] is None
        assert g["temperature_c"] == rec["temperature_c"]
        assert g["power_w"] == pytest.approx(rec["power_mw"] / 1000.0)  # mW -> W
        assert g["power_limit_w"] == pytest.approx(700.0)
        assert g["clock_sm_mhz"] == rec["clock_sm_mhz"]
        assert g["clock_mem_mhz"] == rec["clock_mem_mhz"]
        assert g["performance_state"] == rec["pstate"]
        assert g["encoder_util_pct"] == rec["encoder_util"]
        assert g["decoder_util_pct"] == rec["decoder_util"]
        assert g["fan_pct"] is None  # "Not Supported" on an H100
        expected = [(p["pid"], p["used_gpu_memory"]) for p in rec["processes"]]
        assert [(p["pid"], p["used_memory_bytes"]) for p in g["processes"]] == expected
        for p in g["processes"]:
            assert p["kind"] == "compute"
            assert p["is_daemon"] is True  # own_pid=load_pid marks the daemon's entry
        assert sample["gpu"]["daemon_pid"] == trace["load_pid"]


def test_published_values_agree_with_nvidia_smi_per_phase(trace, system):
    """nvidia-smi read the same run: phase medians must agree (catches unit mistakes)."""
    published, _ = replay(trace, system, memory_reserved_bytes=480 * MIB)
    gpus = [(s["ts"], s["gpu"]["gpus"][0]) for s in published]
    load_ts = [t for t, g in gpus if g["utilization_gpu_pct"] >= 90]
    start, end = min(load_ts), max(load_ts)
    ours = {
        "load": [g for t, g in gpus if start <= t <= end and g["utilization_gpu_pct"] >= 90],
        "idle_after": [g for t, g in gpus if t > end + 1.0],
        "idle_before": [g for t, g in gpus if t < start - 1.0],
    }
    smi_all = smi_rows(trace)
    smi_load = [r["t"] for r in smi_all if r["util"] >= 90]
    s0, s1 = min(smi_load), max(smi_load)
    smi = {
        "load": [r for r in smi_all if s0 <= r["t"] <= s1 and r["util"] >= 90],
        "idle_after": [r for r in smi_all if r["t"] > s1 + 1.0],
        "idle_before": [r for r in smi_all if r["t"] < s0 - 1.0],
    }
    for phase in ("idle_before", "load", "idle_after"):
        assert len(ours[phase]) >= 5 and len(smi[phase]) >= 5, phase
        assert median(g["power_w"] for g in ours[phase]) == pytest.approx(
            median(r["power_w"] for r in smi[phase]), rel=0.03
        ), phase
        assert median(g["temperature_c"] for g in ours[phase]) == pytest.approx(
            median(r["temp_c"] for r in smi[phase]), abs=1.5
        ), phase
        assert median(g["clock_sm_mhz"] for g in ours[phase]) == pytest.approx(
            median(r["sm_mhz"] for r in smi[phase]), rel=0.03
        ), phase
    # With the v2 memory struct, "used" excludes the reserved 480 MiB, as nvidia-smi's does.
    assert median(g["memory_used_bytes"] for g in ours["load"]) / MIB == pytest.approx(
        median(r["mem_mib"] for r in smi["load"]), abs=1.0
    )
    assert median(g["memory_used_bytes"] for g in ours["idle_after"]) / MIB == pytest.approx(
        median(r["mem_mib"] for r in smi["idle_after"]), abs=1.0
    )
    assert all(g["memory_reserved_bytes"] == 480 * MIB for g in ours["load"])


def test_unsupported_field_is_null_and_logged_once(trace, system, caplog):
    caplog.set_level(logging.DEBUG, logger="infernod.telemetry")
    published, _ = replay(trace, system)
    assert len(published) > 50
    assert all(s["gpu"]["gpus"][0]["fan_pct"] is None for s in published)
    fan_records = [r for r in caplog.records if "fan_pct" in r.getMessage()]
    assert len(fan_records) == 1
    assert "Not Supported" in fan_records[0].getMessage()


def test_other_nvml_errors_become_null_logged_once_and_never_raise(trace, system, caplog):
    broken = load_trace()
    for row in broken["samples"][10:20]:
        row[0]["power_mw"] = {"error": "GPU is lost"}
    caplog.set_level(logging.INFO, logger="infernod.telemetry")
    published, sampler = replay(broken, system)
    powers = [s["gpu"]["gpus"][0]["power_w"] for s in published]
    assert powers[9] is not None and powers[20] is not None
    assert powers[10:20] == [None] * 10
    lost = [r for r in caplog.records if "power_w" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert sampler.energy_j(0) is not None  # the integral resumed after the gap


def test_utilisation_ramp_idle_load_idle(trace, system):
    published, _ = replay(trace, system)
    util = [s["gpu"]["gpus"][0]["utilization_gpu_pct"] for s in published]
    used = [s["gpu"]["gpus"][0]["memory_used_bytes"] for s in published]
    peak = util.index(max(util))
    first_load = next(i for i, u in enumerate(util) if u >= 90)
    last_load = max(i for i, u in enumerate(util) if u >= 90)
    assert max(util) >= 95
    assert all(u == 0 for u in util[: first_load - 2])  # idle before
    assert all(u == 0 for u in util[last_load + 2 :])  # idle after
    assert first_load >= 10 and len(util) - last_load >= 10
    assert first_load <= peak <= last_load
    assert sum(u >= 90 for u in util[first_load : last_load + 1]) >= 0.9 * (
        last_load - first_load + 1
    )
    # the 20 GB held during the load shows in memory and then goes away
    assert used[peak] - used[0] > 20e9 and used[-1] < used[peak] / 10


def test_energy_is_the_trapezoid_integral_of_power(trace, system):
    _, sampler = replay(trace, system)
    t = np.array([row[0]["t"] for row in trace["samples"]])
    watts = np.array([row[0]["power_mw"] for row in trace["samples"]]) / 1000.0
    expected = float(np.trapezoid(watts, t))
    assert sampler.energy_j(0) == pytest.approx(expected, rel=1e-9)
    assert sampler.energy_j() == pytest.approx(expected, rel=1e-9)
    assert 5000 < expected < 15000  # ~12 s at ~690 W plus idle: joules, not millijoules
    assert sampler.latest()["energy_j"] == {"0": pytest.approx(expected, rel=1e-9)}
    msgpack.unpackb(msgpack.packb(sampler.latest()))  # the sample travels on the wire as is


def test_gpu_memory_used_helper_reads_latest_sample(trace, system):
    _, sampler = replay(trace, system)
    assert sampler.gpu_memory_used_bytes() == trace["samples"][-1][0]["memory"]["used"]


def test_sampler_thread_publishes_the_trace_in_order(trace, system):
    fake = FakePynvml(trace)
    got: list[dict[str, Any]] = []
    enough = threading.Event()

    def on_sample(sample: dict[str, Any]) -> None:
        got.append(sample)
        fake.advance()  # next recorded row for the next tick
        if len(got) >= 8:
            enough.set()

    sampler = TelemetrySampler(
        rate_hz=20.0, on_sample=on_sample, nvml=NvmlReader(fake), system=system
    )
    sampler.start()
    try:
        assert enough.wait(10.0), "sampler published nothing"
    finally:
        assert sampler.stop(timeout=5.0)
    assert not sampler.running
    for i, sample in enumerate(got[:8]):
        rec = trace["samples"][i][0]
        g = sample["gpu"]["gpus"][0]
        assert g["power_w"] == pytest.approx(rec["power_mw"] / 1000.0)
        assert g["memory_used_bytes"] == rec["memory"]["used"]
        assert sample["system"]["memory_total_bytes"] > 0
    assert sampler.latest() is got[-1]
    assert fake.shutdown_calls == 0  # an injected reader belongs to the caller


def test_close_calls_nvml_shutdown_once(trace):
    fake = FakePynvml(trace)
    reader = NvmlReader(fake)
    assert reader.available and reader.gpu_count == 1
    reader.close()
    reader.close()
    assert fake.shutdown_calls == 1 and fake.initialized == 0
    assert reader.sample()["available"] is False


def test_default_reader_imports_pynvml_lazily(trace, monkeypatch):
    fake = FakePynvml(trace)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader()
    assert reader.available and fake.init_calls == 1
    assert reader.sample()["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"


# ---------------------------------------------------------------------------- no NVML
@pytest.mark.parametrize(
    "code, text",
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"),
    ],
)
def test_no_driver_sampler_still_publishes_system_metrics(trace, system, code, text):
    fake = FakePynvml(trace, init_error=code)
    reader = NvmlReader(fake)
    assert reader.available is False
    assert reader.reason == f"no NVIDIA driver ({text})"
    published: list[dict[str, Any]] = []
    sampler = TelemetrySampler(on_sample=published.append, nvml=reader, system=system)
    sample = sampler.sample_once()
    assert sample["gpu"] == {"available": False, "reason": reader.reason, "gpus": []}
    assert (
        sample["system"]["memory_total_bytes"] > 0 and sample["system"]["process"]["rss_bytes"] > 0
    )
    assert published == [sample]
    assert sampler.energy_j(0) is None and sampler.energy_j() is None
    assert sampler.gpu_memory_used_bytes() is None
    assert fake.calls.get("nvmlDeviceGetUtilizationRates", 0) == 0


def test_pynvml_not_importable_sampler_thread_keeps_working(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    got = threading.Event()
    samples: list[dict[str, Any]] = []

    def on_sample(s: dict[str, Any]) -> None:
        samples.append(s)
        got.set()

    sampler = TelemetrySampler(rate_hz=10.0, on_sample=on_sample)  # creates its own readers
    assert sampler.nvml.available is False
    assert sampler.nvml.reason.startswith("no NVIDIA driver (pynvml not importable")
    sampler.start()
    try:
        assert got.wait(10.0)
    finally:
        assert sampler.stop(timeout=5.0)
    assert samples[0]["gpu"]["available"] is False and samples[0]["gpu"]["gpus"] == []
    assert samples[0]["system"]["cpu_count"] >= 1


def test_real_pynvml_without_a_driver_reports_no_gpu():
    reader = NvmlReader()
    if reader.available:
        reader.close()
        pytest.skip("this machine has an NVIDIA driver")
    assert reader.reason.startswith("no NVIDIA driver (")
    assert reader.sample() == {"available": False, "reason": reader.reason, "gpus": []}
    reader.close()


def test_importing_telemetry_does_not_import_pynvml():
    code = "import sys, infernod.telemetry; assert 'pynvml' not in sys.modules, 'pynvml imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_nvml_py_is_the_only_module_that_calls_pynvml():
    uses = re.compile(
        r"^\s*(import|from)\s+pynvml\b|\bnvml(Init|Shutdown|Device\w+|System\w+)\(", re.M
    )
    nvml_py = REPO / "infernod" / "telemetry" / "nvml.py"
    assert uses.search(nvml_py.read_text())  # the pattern does find real uses
    offenders = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "infernod").rglob("*.py")
        if p != nvml_py and uses.search(p.read_text())
    ]
    assert offenders == []


# ---------------------------------------------------------------------------- system, thread
def test_system_reader_fields(system):
    s = system.sample()
    assert 0.0 <= s["cpu_pct"] <= 100.0
    assert len(s["cpu_per_core_pct"]) == s["cpu_count"]
    assert s["memory_total_bytes"] >= s["memory_available_bytes"] > 0
    assert s["swap_total_bytes"] >= 0 and len(s["load_avg"]) == 3
    p = s["process"]
    assert p["rss_bytes"] > 0 and p["threads"] >= 1 and p["open_fds"] >= 3 and p["uptime_s"] >= 0
    assert system.rss_bytes() > 0


class _QuickSystem(SystemReader):
    """psutil without the per-core sweep: the thread test measures scheduling, not psutil."""

    def sample(self) -> dict[str, Any]:
        return {"cpu_pct": 0.0}


def test_sampler_rate_is_roughly_honoured_and_stop_is_bounded(trace):
    sampler = TelemetrySampler(
        rate_hz=20.0, nvml=NvmlReader(FakePynvml(trace)), system=_QuickSystem()
    )
    sampler.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    assert sampler.stop(timeout=5.0)
    assert time.monotonic() - t0 < 5.0
    # 20 Hz for ~1 s: bound only the absurd (a stuck thread, or a busy loop)
    assert 3 <= sampler.samples_taken <= 60


def test_stop_does_not_wait_out_a_long_period(system):
    sampler = TelemetrySampler(
        rate_hz=0.1, nvml=NvmlReader(FakePynvml(load_trace())), system=system
    )
    sampler.start()
    deadline = time.monotonic() + 10.0
    while sampler.samples_taken == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    assert sampler.stop(timeout=5.0)
    assert time.monotonic() - t0 < 5.0  # the period is 10 s: stop interrupts the wait
    assert sampler.samples_taken == 1


def test_failing_callback_does_not_kill_the_thread(trace, caplog):
    calls = 0
    two = threading.Event()

    def on_sample(_: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            two.set()
        raise RuntimeError("subscriber bug")

    caplog.set_level(logging.ERROR, logger="infernod.telemetry")
    sampler = TelemetrySampler(
        20.0, on_sample, nvml=NvmlReader(FakePynvml(trace)), system=_QuickSystem()
    )
    sampler.start()
    try:
        assert two.wait(10.0)
    finally:
        assert sampler.stop(timeout=5.0)
    assert len([r for r in caplog.records if "callback failed" in r.getMessage()]) == 1


def test_rate_out_of_range_is_refused():
    with pytest.raises(ValueError):
        TelemetrySampler(
            rate_hz=0.0, nvml=NvmlReader(FakePynvml(load_trace())), system=_QuickSystem()
        )
    with pytest.raises(ValueError):
        TelemetrySampler(
            rate_hz=1000.0, nvml=NvmlReader(FakePynvml(load_trace())), system=_QuickSystem()
        )


# ---------------------------------------------------------------------------- prometheus
def _load_phase_sampler(
    trace: dict[str, Any], system: SystemReader
) -> tuple[TelemetrySampler, dict[str, Any]]:
    fake = FakePynvml(trace)
    sampler = TelemetrySampler(nvml=NvmlReader(fake), system=system)
    rows = trace["samples"]
    i = next(k for k, row in enumerate(rows) if row[0]["utilization"]["gpu"] >= 95)
    for k in (i - 1, i):
        fake.index = k
        sampler.sample_once(now=rows[k][0]["t"])
    return sampler, rows[i][0]


def test_prometheus_collector_exposes_sample_and_stats(trace, system):
    sampler, rec = _load_phase_sampler(trace, system)
    stats = LatencyStats()
    for v in (100.0, 120.0, 140.0):
        stats.record("ttft_ms", v, {"model": "gemma", "priority": "high"}, now=10.0)
    registry = build_registry(sampler.latest, lambda: stats.summary(now=11.0))
    text = generate_latest(registry).decode()
    values = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for family in text_string_to_metric_families(text)
        for smp in family.samples
    }
    gpu0 = (("gpu", "0"), ("name", "NVIDIA H100 80GB HBM3"))
    assert values[("inferno_gpu_power_watts", gpu0)] == pytest.approx(rec["power_mw"] / 1000.0)
    assert values[("inferno_gpu_utilization_percent", gpu0)] == rec["utilization"]["gpu"]
    assert values[("inferno_gpu_clock_sm_hertz", gpu0)] == rec["clock_sm_mhz"] * 1e6
    assert values[("inferno_gpu_memory_used_bytes", gpu0)] == rec["memory"]["used"]
    assert values[("inferno_gpu_available", ())] == 1.0
    assert values[("inferno_gpu_energy_joules_total", gpu0)] == pytest.approx(sampler.energy_j(0))
    assert not any(name == "inferno_gpu_fan_percent" for name, _ in values)  # absent, not zero
    overall = (("scope", "overall"), ("scope_value", ""), ("stat", "count"), ("window", "1m"))
    assert values[("inferno_ttft_ms", overall)] == 3.0
    by_model = (("scope", "model"), ("scope_value", "gemma"), ("stat", "max"), ("window", "all"))
    assert values[("inferno_ttft_ms", by_model)] == 140.0
    assert values[("inferno_system_memory_total_bytes", ())] > 0
    assert b"inferno_" not in generate_latest(REGISTRY)  # the global registry is untouched


def test_prometheus_http_endpoint_on_loopback(trace, system):
    sampler, _ = _load_phase_sampler(trace, system)
    exporter = start_exporter(0, sampler.latest)
    try:
        assert exporter.addr == "127.0.0.1" and exporter.port > 0
        with urllib.request.urlopen(
            f"http://127.0.0.1:{exporter.port}/metrics", timeout=10
        ) as resp:
            body = resp.read().decode()
        assert "inferno_gpu_power_watts" in body
    finally:
        exporter.close()


async def test_the_statistics_are_built_off_the_event_loop():
    """A summary takes ~20 ms of CPU with a few models, a finished request's profile ~1.5 ms:
    on the loop they would hold up every reply (a ping) that long."""
    class Publisher:
        def __init__(self) -> None:
            self.published: list[tuple[str, dict]] = []

        def publish(self, topic: str, type_: str, body: dict) -> int:
            self.published.append((topic, body))
            return 0

    loop = asyncio.get_running_loop()
    pub = Publisher()
    svc = TelemetryService(Config(), pub, loop)  # type: ignore[arg-type]
    stats = svc.stats
    for i in range(50):
        stats.record("ttft_ms", float(i), {"model": "m", "priority": "normal"}, now=1.0)
    threads: list[int] = []
    summary = stats.summary

    def spy(now: float) -> dict:
        threads.append(threading.get_ident())
        stats.record("ttft_ms", 1.0, now=now)  # another thread may record meanwhile
        return summary(now)

    stats.summary = spy  # type: ignore[method-assign]
    got = await svc.stats_summary_async()
    assert threads and threads[0] != threading.get_ident()
    assert got["overall"]["ttft_ms"]["all"]["count"] == 51
    assert got["by_model"]["m"]["ttft_ms"]["all"]["count"] == 50

    # A finished request's profile: kept at once (profiles.recent), its 64 inter-token gaps
    # recorded in the statistics' thread, before any summary asked for after it.
    gen = Request(request_id="s.1", kind=Kind.GENERATE, session="s", model="m", body={},
                  priority="normal", submitted=0.0, deadline=None, timeout_s=60.0)
    gen.itl_gaps_ms = [5.0] * 64
    recorded: list[int] = []
    record = svc.profiler.record

    def record_spy(*args: Any) -> None:
        recorded.append(threading.get_ident())
        record(*args)

    svc.profiler.record = record_spy  # type: ignore[method-assign]
    svc.on_profile(gen, "length", {"completion_tokens": 65})
    assert [p.request_id for p in svc.profiler.recent()] == ["s.1"]  # at once
    assert pub.published[-1][0] == "profiles"
    got = await svc.stats_summary_async()
    assert recorded and recorded[0] != threading.get_ident()
    assert got["overall"]["itl_ms"]["all"]["count"] == 64
    await svc.close()

"""Memory per device: the estimate split between host RAM and the GPUs by the layers
offloaded, a budget per GPU read from NVML (others' memory excepted, models.vram_budget_bytes
as the cap), the planner evicting per device, and `n_gpu_layers = auto` fitted to the room.
Pure tests, the recorded H100 trace replayed through the NVML test double, and the real
daemon reading that double."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from fake_pynvml import TRACE_PATH, FakePynvml, load_trace

from infernod.daemon.memory import (
    GPU_RESERVE_BYTES,
    HOST,
    LoadedModel,
    MemoryEstimate,
    fit_gpu_layers,
    gpu_budgets,
    plan_devices,
    split_memory,
)
from infernod.protocol.errors import InfernoError
from infernod.telemetry.nvml import NvmlReader

MiB = 1 << 20
GiB = 1 << 30
IDLE, LOADED = 0, 40  # trace samples: an idle H100, then 20 GB held by another process (pid 419)
needs_trace = pytest.mark.skipif(not TRACE_PATH.exists(), reason=f"no NVML trace: {TRACE_PATH}")

# A 70B-class model at Q4: 80 layers, 40 GiB of weights, 4 GiB of KV cache.
BIG = SimpleNamespace(kind="gguf", n_layer=80, name="big")
BIG_EST = MemoryEstimate(weights_bytes=40 * GiB, kv_bytes=4 * GiB, overhead_bytes=1 * GiB,
                         total_bytes=45 * GiB)


def _info(ns: SimpleNamespace) -> Any:
    return cast(Any, ns)


# -- pure: the split, the fit, the planner per device ---------------------------------------------
def test_the_estimate_splits_by_the_layers_offloaded() -> None:
    assert split_memory(BIG_EST, _info(BIG), 0, {"gpu0": 1.0}) == {HOST: 45 * GiB}
    assert split_memory(BIG_EST, _info(BIG), -1, {}) == {HOST: 45 * GiB}  # no GPU: all host
    every = split_memory(BIG_EST, _info(BIG), -1, {"gpu0": 1.0})
    assert every == {HOST: 1 * GiB, "gpu0": 44 * GiB + GPU_RESERVE_BYTES}
    half = split_memory(BIG_EST, _info(BIG), 40, {"gpu0": 1.0})
    moved = 44 * GiB * 40 // 81
    assert half == {HOST: 45 * GiB - moved, "gpu0": moved + GPU_RESERVE_BYTES}
    two = split_memory(BIG_EST, _info(BIG), -1, {"gpu0": 3.0, "gpu1": 1.0})  # by free memory
    assert two["gpu0"] - GPU_RESERVE_BYTES == 33 * GiB
    assert two["gpu1"] - GPU_RESERVE_BYTES == 11 * GiB


def test_auto_fits_the_layers_to_the_room() -> None:
    assert fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": 80 * GiB}) == -1  # all of them
    per_layer = 44 * GiB / 81
    n = fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": 20 * GiB})
    assert n == int((20 * GiB - GPU_RESERVE_BYTES) // per_layer) and 0 < n < 80
    assert fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": 100 * MiB}) == 0
    assert fit_gpu_layers(BIG_EST, _info(BIG), {}) == 0


def test_the_planner_evicts_on_the_device_that_is_short() -> None:
    loaded = [  # "old-cpu" is the least recently used, but holds nothing on the GPU
        LoadedModel("old-cpu", 2 * GiB, last_used_s=1.0, device_bytes={HOST: 2 * GiB}),
        LoadedModel("gpu-a", 1 * GiB, last_used_s=5.0,
                    device_bytes={HOST: 1 * GiB, "gpu0": 30 * GiB}),
        LoadedModel("gpu-b", 1 * GiB, last_used_s=9.0,
                    device_bytes={HOST: 1 * GiB, "gpu0": 30 * GiB}),
    ]
    budgets = {HOST: 64 * GiB, "gpu0": 72 * GiB}
    plan = plan_devices("new", {HOST: 2 * GiB, "gpu0": 20 * GiB}, budgets, loaded, now=100.0)
    assert plan.evict == ["gpu-a"]
    assert plan.messages == ["unloaded gpu-a (idle 1m, 30720 MiB) to fit new on gpu0"]
    # the host is short too: its own LRU order, and gpu-a already gone counts there
    plan = plan_devices("new", {HOST: 62 * GiB, "gpu0": 20 * GiB}, budgets, loaded, now=100.0)
    assert plan.evict == ["old-cpu", "gpu-a"]
    # fits on the host, but a pinned model holds the GPU: refused, naming the device
    pinned = [LoadedModel("p", 1 * GiB, pinned=True, device_bytes={HOST: 1, "gpu0": 70 * GiB})]
    with pytest.raises(InfernoError) as e:
        plan_devices("new", {HOST: 1 * GiB, "gpu0": 20 * GiB}, budgets, pinned, now=0.0)
    assert e.value.code == "insufficient_memory" and e.value.extra["device"] == "gpu0"
    assert e.value.message.startswith("on gpu0: cannot load new") and "p pinned" in e.value.message
    # a model needing nothing on a GPU never looks at its budget (a machine without one)
    assert plan_devices("new", {HOST: 1 * GiB}, {HOST: 2 * GiB}, [], now=0.0).evict == []


def test_gpu_budgets_count_others_memory_and_the_cap() -> None:
    gpu = {"index": 0, "memory_total_bytes": 80 * GiB, "memory_used_bytes": 30 * GiB,
           "processes": [{"pid": 7, "used_memory_bytes": 10 * GiB},
                         {"pid": 8, "used_memory_bytes": 19 * GiB}]}
    sample = {"available": True, "gpus": [gpu]}
    b = gpu_budgets(sample, 0, {"gpu0": 10 * GiB}, our_pids={7})["gpu0"]
    assert b["others_bytes"] == 20 * GiB  # used less our runner's 10 GiB
    assert b["budget_bytes"] == 60 * GiB  # min(90% of 80, 80 - 20)
    assert b["free_bytes"] == 50 * GiB  # the budget less what our models are charged
    capped = gpu_budgets(sample, 8 * GiB, {}, our_pids=set())["gpu0"]
    assert capped["budget_bytes"] == 8 * GiB  # models.vram_budget_bytes, per GPU
    no_procs = {"available": True, "gpus": [{**gpu, "processes": None}]}
    assert gpu_budgets(no_procs, 0, {"gpu0": 10 * GiB}, set())["gpu0"]["others_bytes"] == \
        20 * GiB  # without per-process memory: used less what our models are charged
    assert gpu_budgets({"available": False, "gpus": []}, 0, {}, set()) == {}
    assert gpu_budgets(None, 0, {}, set()) == {}


# -- the recorded H100 trace through the NVML test double ------------------------------------
@needs_trace
def test_the_h100_trace_drives_the_budget_the_fit_and_the_planner() -> None:
    fake = FakePynvml(load_trace())
    reader = NvmlReader(nvml_module=fake, own_pid=os.getpid())
    try:
        idle = gpu_budgets(reader.sample(), 0, {}, set())["gpu0"]
        fake.index = LOADED  # another process now holds 20 GB (pid 419 in the trace)
        busy = gpu_budgets(reader.sample(), 0, {}, set())["gpu0"]
        fake.index = IDLE
        ours = gpu_budgets(reader.sample(), 0, {}, set())["gpu0"]
        fake.index = LOADED  # the same 20 GB, but the process is one of our runners
        mine = gpu_budgets(reader.sample(), 0, {"gpu0": 19 * GiB}, {419})["gpu0"]
    finally:
        reader.close()
    total = 85520809984
    used = fake.samples[LOADED][0]["memory"]["used"]  # the driver's 480 MiB + pid 419's
    held_by_419 = fake.samples[LOADED][0]["processes"][0]["used_gpu_memory"]
    assert idle["total_bytes"] == total and idle["budget_bytes"] == int(total * 0.9)
    assert busy["others_bytes"] == used > held_by_419 > 19 * GiB
    assert busy["budget_bytes"] == total - used
    assert ours == idle
    assert mine["others_bytes"] == used - held_by_419  # only the driver's reservation
    # n_gpu_layers = auto: every layer of the 45 GiB model fits the idle GPU, fewer once
    # another process holds 20 GB, and with a 24 GiB cap fewer still
    assert fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": idle["free_bytes"]}) == -1
    assert fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": busy["free_bytes"]}) == -1
    fake.index = LOADED
    reader = NvmlReader(nvml_module=fake, own_pid=os.getpid())
    try:
        capped = gpu_budgets(reader.sample(), 24 * GiB, {}, set())["gpu0"]
    finally:
        reader.close()
    n = fit_gpu_layers(BIG_EST, _info(BIG), {"gpu0": capped["free_bytes"]})
    assert 0 < n < 80
    need = split_memory(BIG_EST, _info(BIG), n, {"gpu0": 1.0})
    assert need["gpu0"] <= capped["budget_bytes"] < need["gpu0"] + 44 * GiB / 81 * 2
    # the planner on the busy GPU: a 50 GiB idle model there must go for an all-GPU load
    held = [LoadedModel("other", 1 * GiB, last_used_s=0.0,
                        device_bytes={HOST: 1 * GiB, "gpu0": 50 * GiB})]
    all_gpu = split_memory(BIG_EST, _info(BIG), -1, {"gpu0": 1.0})
    budgets = {HOST: 64 * GiB, "gpu0": busy["budget_bytes"]}
    assert plan_devices("big", all_gpu, budgets, held, now=60.0).evict == ["other"]
    with pytest.raises(InfernoError) as e:
        plan_devices("big", all_gpu, {HOST: 64 * GiB, "gpu0": capped["budget_bytes"]}, [],
                     now=0.0)
    assert e.value.extra["device"] == "gpu0"


# -- the real daemon, its telemetry reading the test double ----------------------------------
def _nvml_shim(tmp: Path, index: int) -> dict[str, str]:
    """PYTHONPATH for a daemon whose ``import pynvml`` gets the replaying double."""
    shim = tmp / "shim"
    shim.mkdir()
    tests = Path(__file__).resolve().parent
    (shim / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tests)!r})
        import fake_pynvml
        fake = fake_pynvml.FakePynvml(fake_pynvml.load_trace())
        fake.index = {index}
        sys.modules["pynvml"] = fake
    """))
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


@needs_trace
def test_the_daemon_budgets_the_gpu_nvml_reports(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory({"models": {"vram_budget_bytes": 8 * GiB},
                        "telemetry": {"sample_hz": 5}}, env=_nvml_shim(tmp_path, LOADED))
    with d.client(timeout=30) as c:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sample = c.request("metrics.get", {})["sample"]
            if sample and sample["gpu"]["gpus"]:
                break
            time.sleep(0.2)
        c.request("models.set", {"model": "gemma3-270m", "settings": {"n_gpu_layers": "auto"}})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            mem = c.show("gemma3-270m")["memory"]
            if "gpu0" in mem["devices"] and mem["gpu_offload_supported"] is not None:
                break
            time.sleep(0.2)
        gpu, host = mem["devices"]["gpu0"], mem["devices"][HOST]
        assert gpu["total_bytes"] == 85520809984
        used = load_trace()["samples"][LOADED][0]["memory"]["used"]
        assert gpu["others_bytes"] == used  # pid 419's 20 GB and the driver's reservation
        assert gpu["budget_bytes"] == 8 * GiB  # models.vram_budget_bytes caps it
        assert host["estimate_bytes"] > 0 and host["budget_bytes"] > 0
        if mem["gpu_offload_supported"]:  # a CUDA build: the small model fits entirely
            assert mem["n_gpu_layers"] == -1 and gpu["estimate_bytes"] > GPU_RESERVE_BYTES
        else:  # a CPU build offloads nothing, whatever the GPU has room for
            assert mem["n_gpu_layers"] == 0 and gpu["estimate_bytes"] == 0
        c.load("gemma3-270m")
        (lm,) = c.status()["models_loaded"]
        assert lm["n_gpu_layers"] == mem["n_gpu_layers"]
        assert set(lm["gpu_memory_bytes"]) <= {"gpu0"}

"""Snapshot tests of each screen at 80x24 with fixed data (no daemon, no clock, no blink).

Regenerate after an intended change: pytest tests/test_tui_snapshots.py --snapshot-update,
then look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Input

from inferno_tui.app import InfernoApp
from inferno_tui.connection import Settings
from inferno_tui.state import Progress, Snapshot
from inferno_tui.store import ChatSettings, ChatStore
from inferno_tui.views import (
    MetricsHistory,
    MetricsView,
    QueueView,
    RecentLatency,
    models_from_list,
    stats_rows,
)

SIZE = (80, 24)
MODELS = [
    {"name": "gemma3-270m", "kind": "gguf", "architecture": "gemma3", "size_label": "270M",
     "quantization": "Q4_K_M", "size_bytes": 253113024, "context_length": 32768,
     "state": "loaded", "memory_bytes": 412_000_000, "keep_alive_left_s": 245.0,
     "has_chat_template": False},
    {"name": "qwen2.5-7b-instruct", "kind": "gguf", "architecture": "qwen2",
     "size_label": "7.6B", "quantization": "Q4_K_M", "size_bytes": 4_683_073_536,
     "context_length": 32768, "state": "available"},
    {"name": "minilm", "kind": "onnx", "size_bytes": 90_400_000},
]


def gpu_sample(i: int) -> dict:
    return {"ts": 1000.0 + i, "system": {
        "cpu_pct": 20 + (i * 7) % 60, "cpu_per_core_pct": [10.0, 55.5, 93.0, None],
        "memory_used_bytes": 12 * 2**30 + i * 2**26, "memory_total_bytes": 64 * 2**30,
        "swap_used_bytes": 0, "swap_total_bytes": 8 * 2**30,
        "process": {"rss_bytes": 900 * 2**20, "cpu_pct": 12.0}},
        "gpu": {"available": True, "reason": None, "gpus": [{
            "index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization_gpu_pct": (i * 13) % 100,
            "memory_used_bytes": 30 * 2**30 + i * 2**27, "memory_total_bytes": 80 * 2**30,
            "temperature_c": 40 + i % 20, "power_w": 150.0 + 10 * (i % 30),
            "power_limit_w": 700.0, "clock_sm_mhz": 1755 + (i % 5) * 50,
            "clock_mem_mhz": 2619, "fan_pct": None,
            "processes": [{"pid": 4242, "name": "infernod", "used_memory_bytes": 28 * 2**30,
                           "is_daemon": True},
                          {"pid": 999, "name": "python3", "used_memory_bytes": 2 * 2**30,
                           "is_daemon": False}]}]}}


def base_snapshot(**changes) -> Snapshot:
    snap = Snapshot(connection="connected", role="operator", version="0.1.0",
                    capabilities=frozenset({"reprioritize", "queue.list", "stats"}),
                    models=models_from_list(MODELS), notice="gemma3-270m loaded in 0.42s")
    return Snapshot(**{**snap.__dict__, **changes})


def make_app(tmp_path: Path, snap: Snapshot, **settings) -> InfernoApp:
    return InfernoApp(Settings(data_dir=str(tmp_path), **settings), connect=False,
                      snapshot=snap)


def no_blink(pilot) -> None:
    for inp in pilot.app.screen.query(Input):
        inp.cursor_blink = False


def test_models_screen(snap_compare, tmp_path: Path) -> None:
    snap = base_snapshot(progress={"qwen2.5-7b-instruct": Progress(
        "qwen2.5-7b-instruct", "importing", 1_500_000_000, 4_683_073_536, "copying")})
    app = make_app(tmp_path, snap)

    async def run_before(pilot) -> None:
        app.screen.show_detail_for_test("gemma3-270m", {
            "kind": "gguf", "path": "/var/lib/inferno/models/gemma3-270m.gguf",
            "display_name": "Gemma 3 270m", "n_layer": 18, "n_head": 4, "n_head_kv": 1,
            "embedding_length": 640, "vocab_size": 262144, "sliding_window": 512,
            "weights_bytes": 241_000_000, "chat_template_name": "gemma (fallback)",
            "has_chat_template": False})
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_gpu_screen(snap_compare, tmp_path: Path) -> None:
    history = MetricsHistory()
    for i in range(60):
        history.add(MetricsView.from_wire(gpu_sample(i)))
    snap = base_snapshot(metrics=history.latest, histories=history.snapshot())
    assert snap_compare(make_app(tmp_path, snap), terminal_size=SIZE, press=["g"])


def test_gpu_screen_without_gpu(snap_compare, tmp_path: Path) -> None:
    sample = gpu_sample(1)
    sample["gpu"] = {"available": False, "reason": "NVML library not found", "gpus": []}
    snap = base_snapshot(metrics=MetricsView.from_wire(sample),
                         connection="disconnected", detail="daemon lost (retrying)")
    assert snap_compare(make_app(tmp_path, snap, readonly=True), terminal_size=SIZE,
                        press=["g"])


def test_queue_screen(snap_compare, tmp_path: Path) -> None:
    queue = QueueView.from_wire({"running": 2, "queued": 2, "level": "elevated", "items": [
        {"request_id": "a1b2c3d4.7", "state": "running", "model": "gemma3-270m",
         "priority": "normal", "client": "inferno-tui", "age_s": 3.2, "tokens": 57},
        {"request_id": "ffee0011.2", "state": "running", "model": "gemma3-270m",
         "priority": "vip", "client": "batch", "age_s": 12.0, "deadline_in_s": 48.0,
         "tokens": 210},
        {"request_id": "0badcafe.9", "state": "queued", "model": "gemma3-270m",
         "priority": "low", "client": "cli", "age_s": 1.0, "position": 1, "eta_s": 4.0},
        {"request_id": "0badcafe.10", "state": "queued", "model": "gemma3-270m",
         "priority": "low", "client": "cli", "age_s": 0.5, "position": 2}]})
    w = {"count": 42, "p50": 85.0, "p95": 140.0, "p99": 210.0}
    m = {"ttft_ms": {"5m": w}, "tokens_per_s": {"5m": {"p50": 61.5}},
         "e2e_ms": {"5m": {"p95": 4100.0}}}
    stats = stats_rows({"by_model": {"gemma3-270m": m},
                        "by_priority": {"normal": m, "vip": m}, "overall": m})
    recent = RecentLatency(tuple(60.0 + (i * 17) % 90 for i in range(50)),
                           tuple(40.0 + (i * 7) % 30 for i in range(50)))
    snap = base_snapshot(queue=queue, stats=stats, recent=recent)
    assert snap_compare(make_app(tmp_path, snap), terminal_size=SIZE, press=["q"])


def test_chat_screen(snap_compare, tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    conv = store.create("capital cities", ChatSettings(model="gemma3-270m", mode="chat",
                                                       system="Be brief."))
    store.add_message(conv.id, "user", "What is the capital of France?")
    store.add_message(conv.id, "assistant",
                      "The capital of France is **Paris**.\n\n- population: ~2.1M\n"
                      "- river: `Seine`",
                      {"completion_tokens": 21, "ttft_ms": 84.0, "tokens_per_s": 63.2,
                       "finish_reason": "eos"})
    store.close()
    assert snap_compare(make_app(tmp_path, base_snapshot()), terminal_size=SIZE,
                        press=["c"], run_before=no_blink)


def test_queue_slots_view(snap_compare, tmp_path: Path) -> None:
    """``s`` on the queue screen: who holds which slot, its tokens so far, its cached prefix."""
    models = [{**MODELS[0], "slots": 4}, *MODELS[1:]]
    queue = QueueView.from_wire({"running": 2, "queued": 1, "level": "healthy", "items": [
        {"request_id": "a1b2c3d4.7", "state": "running", "model": "gemma3-270m",
         "priority": "normal", "client": "inferno-tui", "age_s": 3.2, "tokens": 57,
         "slot": 0, "cached_tokens": 0},
        {"request_id": "ffee0011.2", "state": "running", "model": "gemma3-270m",
         "priority": "vip", "client": "batch", "age_s": 12.0, "tokens": 210, "slot": 2,
         "cached_tokens": 384},
        {"request_id": "0badcafe.9", "state": "queued", "model": "gemma3-270m",
         "priority": "low", "client": "cli", "age_s": 1.0, "position": 1}]})
    snap = base_snapshot(models=models_from_list(models), queue=queue)
    assert snap_compare(make_app(tmp_path, snap), terminal_size=SIZE, press=["q", "s"])


def test_error_state(snap_compare, tmp_path: Path, monkeypatch) -> None:
    """A lost daemon in words: since when, why, and what to check (no libzmq strings)."""
    import time

    from inferno_tui import errors

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    down = 1_796_160_840.0  # 21:34 UTC
    snap = base_snapshot(connection="disconnected", down_since=down,
                         detail="the connection to the daemon broke (retrying)",
                         notice=f"infernod {errors.lost(down)}")
    try:
        assert snap_compare(make_app(tmp_path, snap), terminal_size=SIZE)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()

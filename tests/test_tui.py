"""inferno-tui against the real daemon and the real default model (Textual pilot tests).

Plus the pure parts (defensive parsing, chat store) and the import boundary.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input
from tui_harness import cell as _cell
from tui_harness import until as _until

from inferno_tui.app import InfernoApp
from inferno_tui.connection import Settings
from inferno_tui.screens.chat import ChatScreen, MessageView
from inferno_tui.screens.gpu import GpuScreen
from inferno_tui.store import ChatSettings, ChatStore
from inferno_tui.views import MetricsView, QueueView, stats_rows
from inferno_tui.widgets.status import status_text
from infernod.protocol.errors import DaemonUnavailable

MODEL = "gemma3-270m"


def test_tui_imports_no_backend_code() -> None:
    code = ("import sys, inferno_tui.app, inferno_tui.__main__; "
            "import json; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    mods = set(json.loads(out.stdout))
    assert "textual" in mods and "infernod.client" in mods
    for banned in ("llama_cpp", "onnxruntime", "pynvml", "infernod.backends",
                   "infernod.daemon", "infernod.telemetry"):
        assert banned not in mods, banned


def test_views_show_na_for_missing_fields() -> None:
    m = MetricsView.from_wire({"gpu": {"available": True, "gpus": [
        {"index": 0, "name": "Fake GPU", "utilization_gpu_pct": None, "power_w": 50.0,
         "processes": [{"pid": 7, "name": "infernod", "used_memory_bytes": None,
                        "is_daemon": True}]}]}, "system": {"cpu_pct": "bogus"}})
    assert m.gpu_available and m.gpus[0].utilization_pct is None
    assert m.gpus[0].processes[0].is_daemon
    assert m.system.cpu_pct is None
    none = MetricsView.from_wire({"gpu": {"available": False, "reason": "NVML not found"}})
    assert not none.gpu_available and none.gpu_reason == "NVML not found"
    q = QueueView.from_wire({"items": [{"request_id": "a", "state": "queued", "position": 2},
                                       {"request_id": "b", "state": "running"}],
                             "running": 1, "queued": 1})
    assert [r.request_id for r in q.rows] == ["b", "a"]
    rows = stats_rows({"by_model": {MODEL: {"ttft_ms": {"5m": {"count": 3, "p50": 12.0}}}},
                       "by_priority": {"high": {}}, "overall": {"ttft_ms": {}}})
    assert [(r.group, r.name, r.count, r.ttft_p50) for r in rows] == [
        ("model", MODEL, 3, 12.0), ("priority", "high", None, None),
        ("overall", "all", None, None)]


def test_chat_store_persists_and_exports(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    conv = store.create("first", ChatSettings(model=MODEL, mode="completion"))
    store.add_message(conv.id, "user", "Hello")
    store.add_message(conv.id, "assistant", "**world**",
                      {"completion_tokens": 2, "ttft_ms": 12.5, "tokens_per_s": 40.0,
                       "finish_reason": "stop"})
    store.rename(conv.id, "renamed")
    store.close()
    again = ChatStore(tmp_path / "chats.sqlite3")
    [c] = again.conversations()
    assert c.title == "renamed" and c.settings.mode == "completion"
    assert [m.content for m in again.messages(c.id)] == ["Hello", "**world**"]
    md = again.export_markdown(c.id)
    assert md.startswith("# renamed") and "## Assistant" in md and "TTFT 12ms" in md
    again.delete(c.id)
    assert again.conversations() == [] and again.messages(c.id) == []


def test_status_bar_text_states() -> None:
    from inferno_tui.state import Snapshot

    s = status_text(Snapshot(connection="disconnected", detail="daemon lost"), "models", True)
    assert "disconnected" in s.plain and "daemon lost" in s.plain and "RO" in s.plain


# -- against the real daemon -----------------------------------------------------------------
@pytest.mark.model
@pytest.mark.slow
async def test_load_chat_queue_and_cancel(daemon, tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected" and app.snapshot.models,
                     30, "connected with a model list")
        table = app.screen.query_one("#models-table", DataTable)
        await _until(pilot, lambda: table.row_count >= 1, 5, "models table")
        assert _cell(table, 0, 0) == MODEL and _cell(table, 0, 1) == "avail"

        # Load from the Models screen: the State column turns "loaded".
        await pilot.press("l")
        await _until(pilot, lambda: _cell(table, 0, 1) == "loaded", 120, "model loaded")
        assert "[gemma3-270m]" in str(app.screen.query_one("#status").render())

        # Chat: the default model is a base model, so the conversation is in completion mode.
        await pilot.press("c")
        chat = app.screen
        assert isinstance(chat, ChatScreen) and chat.settings.mode == "completion"
        # Greedy: deterministic, and this prompt runs on without an end-of-text token (a
        # sampled run sometimes ended by itself before the cancel arrived).
        chat.settings = replace(chat.settings, max_tokens=2000, temperature=0.0)
        await pilot.press(*"Once upon a time", "enter")
        await _until(pilot, lambda: chat.generating, 5, "generation started")
        views = list(chat.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        reply = views[-1]
        # Streamed text appears while the generation is still running.
        await _until(pilot, lambda: len(reply.shown_text) > 20 and chat.generating, 60,
                     "streamed text")

        # The queue screen lists the running request.
        await pilot.press("f4")
        qtable = app.screen.query_one("#queue-table", DataTable)
        await _until(pilot, lambda: qtable.row_count >= 1 and _cell(qtable, 0, 1) == "running",
                     10, "running request in the queue table")
        assert chat._stream is not None
        assert app.snapshot.queue.rows[0].request_id == chat._stream.request_id

        # Cancel from the chat screen (esc): the stream ends as cancelled, text is kept.
        await pilot.press("f3")
        await pilot.press("escape")
        await _until(pilot, lambda: not chat.generating, 30, "generation stopped")
        assert chat.history[-1].role == "assistant"
        assert chat.history[-1].stats.get("finish_reason") == "cancelled"
        assert 0 < chat.history[-1].stats["completion_tokens"] < 2000
        assert "cancelled" in str(reply._header.render())

        # Persisted: a second store sees the conversation.
        store = ChatStore(tmp_path / "chats.sqlite3")
        [conv] = store.conversations()
        assert [m.role for m in store.messages(conv.id)] == ["user", "assistant"]
        store.close()


@pytest.mark.slow
async def test_reconnects_after_daemon_kill_and_restart(daemon, tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "connected")
        await pilot.press("g")  # any screen: the status bar is on all of them
        assert isinstance(app.screen, GpuScreen)
        daemon.kill()
        await _until(pilot, lambda: app.snapshot.connection == "disconnected", 20,
                     "disconnected shown")
        await pilot.pause(0.5)
        assert "disconnected" in str(app.screen.query_one("#status").render())
        daemon.start()
        await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "reconnected")
        await pilot.pause(0.5)
        assert "connected" in str(app.screen.query_one("#status").render())
        assert app.snapshot.models and app.snapshot.models[0].name == MODEL
        assert app.is_running


async def test_a_request_to_a_stopped_daemon_fails_fast_and_the_console_recovers(
        daemon, tmp_path: Path) -> None:
    """A load asked from the console used to wait its whole 600 s timeout for a daemon that
    was stopped (SIGSTOP) or dead; now three missed heartbeats end it."""
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "connected")
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                await asyncio.wait_for(app.connection.request(
                    "models.load", {"model": MODEL}, timeout=600), 20)
            took = time.monotonic() - t0
            await _until(pilot, lambda: app.snapshot.connection == "disconnected", 10,
                         "disconnected shown")
            await pilot.pause(0.5)
            assert "disconnected" in str(app.screen.query_one("#status").render())
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert took < 4.5, took
        await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "reconnected")
        assert app.is_running


async def test_stray_output_and_shutdown_do_not_break_the_console(tmp_path: Path) -> None:
    """Textual captures stdout/stderr while the app runs and calls App._flush(stderr=...) on
    each flush: a library that prints (a warning) must not crash the console, and a redraw
    due while the app stops (no screen left) must do nothing."""
    endpoint = f"ipc://{tmp_path}/nothing/control.sock"
    app = InfernoApp(Settings(endpoint=endpoint, data_dir=str(tmp_path), readonly=True))
    async with app.run_test(size=(80, 24)) as pilot:
        print("stray output", flush=True)
        print("stray warning", file=sys.stderr, flush=True)
        await pilot.pause(0.3)
        assert app.is_running
    app.update_snapshot()  # dirty after the last screen is gone
    app._redraw()


async def test_background_refreshes_leave_no_coroutine_unawaited(tmp_path: Path) -> None:
    """A refresh cancelled before it ran (a newer one in its exclusive group) or asked for
    while the console stops never ran: no 'coroutine ... was never awaited' at shutdown."""
    endpoint = f"ipc://{tmp_path}/nothing/control.sock"
    app = InfernoApp(Settings(endpoint=endpoint, data_dir=str(tmp_path), readonly=True),
                     connect=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with app.run_test(size=(80, 24)) as pilot:
            app.refresh_models()
            app.refresh_models()  # cancels the first before it started
            await pilot.pause(0.1)
        app.refresh_models()  # stopped
        del app
        gc.collect()
    assert not [str(w.message) for w in caught if "never awaited" in str(w.message)]


async def test_a_redraw_during_a_mode_switch_waits_for_the_new_screen(tmp_path: Path) -> None:
    """The redraw timer can fire while switch_mode is still composing the next screen (CI
    caught it once: NoMatches for the status bar on a half-built ChatScreen). It must wait
    for the next tick, not crash the console, and still show the snapshot once mounted."""
    endpoint = f"ipc://{tmp_path}/nothing/control.sock"
    app = InfernoApp(Settings(endpoint=endpoint, data_dir=str(tmp_path), readonly=True),
                     connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        for mode in ("chat", "queue", "gpu", "models"):
            switching = app.switch_mode(mode)
            app.update_snapshot()
            app._redraw()  # the new screen is on the stack but not yet composed
            await switching
            await pilot.pause(0.05)
            assert app.is_running
            assert app.screen.query_one("#status") is not None
        app.update_snapshot(detail="after the switch")
        await _until(pilot, lambda: not app._dirty, 5, "redrawn once mounted")


async def test_disconnected_without_daemon_and_readonly(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nothing/control.sock"
    app = InfernoApp(Settings(endpoint=endpoint, data_dir=str(tmp_path), readonly=True))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "disconnected", 10, "state")
        assert "no daemon socket" in app.snapshot.detail
        bindings = {b.binding.action for b in app.screen.active_bindings.values()}
        assert "load" not in bindings or not app.screen.check_action("load", ())
        await pilot.press("c")
        assert app.screen.query_one("#chat-input", Input).disabled
        assert app.screen.check_action("submit", ()) is False

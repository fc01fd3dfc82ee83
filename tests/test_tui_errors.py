"""Errors in words, against the real daemon: each failure path the console meets (a daemon
that stops answering, one that restarts during a load or a reply, a refused request, bad
input) shows what failed, why and what to do, and never an exception class name or a
libzmq string.
"""

from __future__ import annotations

import io
import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import DataTable, Input, Static
from tui_harness import until as _until

from inferno_tui import errors
from inferno_tui.app import InfernoApp
from inferno_tui.connection import Settings
from inferno_tui.screens.chat import ChatScreen, MessageView
from inferno_tui.screens.dialogs import AskText
from infernod.protocol.errors import DaemonUnavailable, InfernoError

MODEL = "gemma3-270m"
# What must never reach the screen: class names, Python reprs, libzmq's strings.
LEAKS = re.compile(r"Error\b|Exception|ZMQ|zmq|Traceback|non-socket|Errno|Resource temporarily")


def _text(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(renderable)
    return out.getvalue()


def on_screen(app: InfernoApp) -> str:
    """Every text the screen shows (toasts included) and every notification sent."""
    parts = [_text(w.content) for w in app.screen.query(Static)]
    parts += [f"{n.title}\n{n.message}" for n in app._notifications]
    return "\n".join(parts)


def no_leaks(app: InfernoApp) -> str:
    text = on_screen(app)
    found = LEAKS.findall(text)
    assert not found, (found, text)
    return text


def _cell0(table: DataTable) -> str:
    value = table.get_row_at(0)[1]
    return getattr(value, "plain", str(value))


def _notice(app: InfernoApp) -> str:
    return _text(app.screen.query_one("#models-notice", Static).content)


def test_words_for_each_kind_of_failure(tmp_path: Path) -> None:
    import zmq

    refused = errors.in_words(InfernoError("unknown_model", "no model named x"), "the reply")
    assert refused.code == "unknown_model" and "inferno models" in refused.todo
    lost = errors.in_words(DaemonUnavailable("no heartbeat"), "loading m", 0.0)
    assert "not answering since" in lost.why and "systemctl status infernod" in lost.todo
    broke = errors.in_words(zmq.ZMQError(zmq.ENOTSOCK), "the reply")
    assert broke.short == "unavailable" and "non-socket" not in broke.line
    try:
        open(tmp_path / "missing.gguf")
    except OSError as e:
        missing = errors.in_words(e, "importing it")
    assert "no such file" in missing.why and "missing.gguf" in missing.why
    odd = errors.in_words(KeyError("x"), "the reply")
    for w in (refused, lost, broke, missing, odd):
        assert not LEAKS.search(w.title + w.body + w.line), w
    assert "restarted while loading m; it restarted 3 s later" in errors.restarted("m", 3.2)


@pytest.mark.model
@pytest.mark.slow
async def test_a_stopped_daemon_a_refusal_and_bad_input_in_words(daemon, tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected" and app.snapshot.models,
                     30, "connected")

        # Bad input: a file that is not there.
        await pilot.press("i")
        await _until(pilot, lambda: isinstance(app.screen, AskText), 5, "dialog")
        app.screen.query_one("#answer", Input).value = str(tmp_path / "nothing.gguf")
        await pilot.press("enter")
        await _until(pilot, lambda: "failed" in _notice(app), 20, "import refused")
        assert "nothing.gguf" in _notice(app)
        no_leaks(app)

        # Refused by the daemon: a chat with a model it does not have.
        await pilot.press("c")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        chat.settings = replace(chat.settings, model="no-such-model", max_tokens=4)
        await pilot.press(*"Hello", "enter")
        await _until(pilot, lambda: not chat.generating and len(chat.history) == 2, 30, "refusal")
        assert chat.history[-1].stats["finish_reason"] == "error: unknown_model"
        text = no_leaks(app)
        assert "no-such-model" in text and "inferno models" in text  # message and hint

        # A daemon that stops answering (SIGSTOP): a load fails in words, with since when.
        await pilot.press("escape", "m")
        app.clear_notifications()
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            await pilot.press("l")
            await _until(pilot, lambda: f"loading {MODEL} failed" in _notice(app)
                         or "not answering since" in _notice(app), 30, "lost daemon")
            await _until(pilot, lambda: app.snapshot.connection == "disconnected", 20, "lost")
            await pilot.pause(0.5)
            text = no_leaks(app)
            assert "not answering since" in text and "systemctl status infernod" in text
            assert "since" in _text(app.screen.query_one("#status", Static).content)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "back")
        no_leaks(app)


@pytest.mark.model
@pytest.mark.slow
async def test_a_daemon_restarted_during_a_load_and_a_reply_in_words(daemon,
                                                                     tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("#models-table", DataTable)
        await _until(pilot, lambda: app.snapshot.connection == "connected"
                     and table.row_count >= 1, 30, "connected, the models table drawn")

        # Killed while loading, started again: the console says so when it is back.
        # (a load can end between two looks: unload and try again)
        for _ in range(5):
            await pilot.press("l")
            for _ in range(3000):
                if MODEL in app.snapshot.progress or _cell0(table) == "loaded":
                    break
                await pilot.pause(0.02)
            if MODEL in app.snapshot.progress:
                break
            await pilot.press("u")
            await _until(pilot, lambda: _cell0(table) == "avail", 60, "unloaded")
        assert MODEL in app.snapshot.progress, "never saw the load in progress"
        daemon.kill()
        daemon.start()
        await _until(pilot, lambda: app.snapshot.connection == "connected"
                     and "restarted" in _notice(app), 60, "restart said")
        notice = _notice(app)
        assert f"infernod restarted while loading {MODEL}; it restarted" in notice, notice
        no_leaks(app)

        # Killed while a reply streams: the reply ends in words, not a class name.
        await pilot.press("l")
        await _until(pilot, lambda: app.snapshot.model(MODEL).state == "loaded", 120, "loaded")
        assert table.row_count == 1
        await pilot.press("c")
        chat = app.screen
        assert isinstance(chat, ChatScreen)
        chat.settings = replace(chat.settings, max_tokens=4000, temperature=0.0)
        await pilot.press(*"Once upon a time", "enter")
        views = list(chat.query(MessageView))
        await _until(pilot, lambda: chat.generating and len(list(chat.query(MessageView))) == 2
                     and len(list(chat.query(MessageView))[-1].shown_text) > 10, 60, "streaming")
        app.clear_notifications()
        daemon.kill()
        await _until(pilot, lambda: not chat.generating, 30, "reply ended")
        reason = chat.history[-1].stats["finish_reason"]
        assert reason in ("error: unavailable", "error: daemon lost"), reason
        assert views is not None
        text = no_leaks(app)
        assert "systemctl status infernod" in text
        daemon.start()
        await _until(pilot, lambda: app.snapshot.connection == "connected", 60, "back")

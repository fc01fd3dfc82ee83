"""Every console action against the real daemon and the real model (Textual pilot tests):
models (load, pin, unpin, settings, unload, import, remove), queue (slots, reprioritize,
cancel) and chat (settings, regenerate, export).
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import DataTable, Input, Static
from tui_harness import cell as _cell
from tui_harness import until as _until

from inferno_tui.app import InfernoApp
from inferno_tui.connection import Settings
from inferno_tui.screens.ab import ABScreen
from inferno_tui.screens.chat import ChatScreen, MessageView
from inferno_tui.screens.chat_dialogs import ConversationsDialog, SettingsDialog
from inferno_tui.screens.dialogs import AskText, ModelSettingsForm
from infernod.client import AsyncClient

MODEL = "gemma3-270m"
pytestmark = [pytest.mark.model, pytest.mark.slow]


def _rows(table: DataTable) -> dict[str, list[str]]:
    return {_cell(table, i, 0): [_cell(table, i, c) for c in range(len(table.columns))]
            for i in range(table.row_count)}


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def _shown(app: InfernoApp, widget_id: str) -> str:
    """The text a Static shows (a Rich table rendered at 80 columns)."""
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(
        app.screen.query_one(widget_id, Static).content)
    return out.getvalue()


async def _type(pilot, text: str) -> None:
    """Into the open AskText dialog, then Enter."""
    await _until(pilot, lambda: isinstance(pilot.app.screen, AskText), 5, "the dialog")
    pilot.app.screen.query_one("#answer", Input).value = text
    await pilot.press("enter")


@pytest.fixture
def own_models(tmp_path: Path, default_model_path: Path) -> Path:
    """A models dir of this test's own (imports land in it, not in the shared one)."""
    d = tmp_path / "models"
    d.mkdir()
    os.link(default_model_path, d / f"{MODEL}.gguf")
    return d


async def test_models_load_pin_unpin_settings_unload_import_remove(
        daemon_factory, own_models: Path, default_model_path: Path, tmp_path: Path) -> None:
    daemon = daemon_factory({"models": {"dirs": [str(own_models)]}})
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected" and app.snapshot.models,
                     30, "connected with a model list")
        table = app.screen.query_one("#models-table", DataTable)
        await _until(pilot, lambda: table.row_count == 1, 5, "models table")

        # Load: while it loads the line says so, how long so far, and that no fraction comes.
        seen: list[str] = []
        await pilot.press("l")
        for _ in range(1200):
            seen.append(_shown(app, "#models-notice"))
            if _cell(table, 0, 1) == "loaded":
                break
            await pilot.pause(0.1)
        assert _cell(table, 0, 1) == "loaded"
        assert any(f"loading {MODEL}" in s and "no fraction" in s for s in seen), seen[:5]

        # Pin, then unpin: the Idle column says "pinned", then a keep-alive again.
        await pilot.press("p")
        await _until(pilot, lambda: _cell(table, 0, 8) == "pinned", 30, "pinned")
        await pilot.press("P")
        await _until(pilot, lambda: _cell(table, 0, 8) not in ("pinned", ""), 30, "unpinned")
        assert not app.snapshot.model(MODEL).pinned
        assert f"{MODEL}: unpinned" in _shown(app, "#models-notice")

        # Settings, in a form listing models.show's settings: a value typed is kept by the
        # daemon, a bad one shows its error in words, an emptied field removes it.
        async def form(key: str, value: str) -> None:
            await pilot.press("s")
            await _until(pilot, lambda: isinstance(app.screen, ModelSettingsForm), 30, "form")
            field = app.screen.query_one(f"#ms-{key}", Input)
            assert field.value or field.placeholder.endswith(")")  # value (source)
            field.value = value
            await pilot.press("ctrl+s")
            await _until(pilot, lambda: not isinstance(app.screen, ModelSettingsForm), 5,
                         "form closed")

        await form("temperature", "0.25")
        await _until(pilot, lambda: "temperature changed" in _shown(app, "#models-notice"), 30,
                     "settings changed")
        shown = await app.connection.request("models.show", {"model": MODEL})
        assert shown["settings"]["temperature"] == {"value": 0.25, "source": "model"}
        await _until(pilot, lambda: "temperature=0.25" in _shown(app, "#models-detail"), 10,
                     "detail")
        await form("temperature", "hot")
        await _until(pilot, lambda: "failed" in _shown(app, "#models-notice"), 30, "refusal")
        notice = _shown(app, "#models-notice")
        assert f"changing {MODEL}'s settings failed: " in notice and "temperature" in notice
        assert "Error" not in notice and "Exception" not in notice
        await form("temperature", "")
        await _until(pilot, lambda: "temperature changed" in _shown(app, "#models-notice"), 30,
                     "setting removed")
        shown = await app.connection.request("models.show", {"model": MODEL})
        assert shown["settings"]["temperature"]["source"] != "model"

        # Unload.
        await pilot.press("u")
        await _until(pilot, lambda: _cell(table, 0, 1) == "avail", 60, "unloaded")

        # Import: the file is sent to the daemon and shows up in the table.
        src = tmp_path / "upload" / "copy-270m.gguf"
        src.parent.mkdir()
        os.link(default_model_path, src)
        await pilot.press("i")
        await _type(pilot, str(src))
        await _until(pilot, lambda: "copy-270m" in _rows(table), 180, "imported model listed")
        path = Path((await app.connection.request("models.show",
                                                   {"model": "copy-270m"}))["path"])
        assert path.exists()

        # Remove asks first: "n" keeps it, "y" removes it.
        table.move_cursor(row=list(_rows(table)).index("copy-270m"))
        await pilot.press("x")
        await pilot.press("n")
        await pilot.pause(0.5)
        assert "copy-270m" in _rows(table)
        await pilot.press("x")
        await pilot.press("y")
        await _until(pilot, lambda: "copy-270m" not in _rows(table), 30, "removed")
        assert not path.exists()


async def test_queue_slots_reprioritize_and_cancel(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory({"models": {"slots": 1}})
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    client = AsyncClient(daemon.endpoint, timeout=10, name="test")
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: app.snapshot.connection == "connected", 30, "connected")
            await client.request("models.load", {"model": MODEL}, timeout=300)
            # One slot: the first request runs, the second waits behind it.
            first = await client.generate(MODEL, prompt="Once upon a time", max_tokens=4000,
                                          temperature=0.0, ignore_eos=True)
            second = await client.generate(MODEL, prompt="The sea", max_tokens=8,
                                           priority="low")
            drains = [asyncio.create_task(_drain(s)) for s in (first, second)]
            await pilot.press("q")
            table = app.screen.query_one("#queue-table", DataTable)
            await _until(pilot, lambda: table.row_count == 2, 30,
                         f"two rows {app.snapshot.queue} {app.screen}")
            rows = _rows(table)
            run_id = next(r for r in app.snapshot.queue.rows if r.state == "running").request_id
            assert run_id == first.request_id

            # Slots: slot 0 is held by the running request, with its tokens and cached prefix.
            await pilot.press("s")
            await _until(pilot, lambda: "slots" in _shown(app, "#queue-stats"), 5,
                         f"slots view {app.screen.show_slots} {_shown(app, '#queue-stats')!r}")
            await _until(pilot, lambda: app.snapshot.queue.rows[0].slot == 0
                         and (app.snapshot.queue.rows[0].tokens or 0) > 0, 30, "slot on wire")
            await pilot.pause(0.6)
            slots = _shown(app, "#queue-stats")
            line = next(x for x in slots.splitlines() if first.request_id[-8:] in x)
            assert MODEL in line and " 0 " in line, slots
            assert app.snapshot.queue.rows[0].cached_tokens is not None

            # Reprioritize the waiting one: low -> normal (+), shown in its Class column.
            waiting = [i for i in range(table.row_count) if _cell(table, i, 1) != "running"]
            table.move_cursor(row=waiting[0])
            await pilot.press("plus")
            await _until(pilot, lambda: any(r.priority == "normal" and r.request_id
                                            == second.request_id
                                            for r in app.snapshot.queue.rows), 30, "promoted")
            await pilot.press("minus")
            await _until(pilot, lambda: any(r.priority == "low" and r.request_id
                                            == second.request_id
                                            for r in app.snapshot.queue.rows), 30, "demoted")

            # Cancel the running one (after a confirmation): it ends cancelled.
            running = next(i for i in range(table.row_count) if _cell(table, i, 1) == "running")
            table.move_cursor(row=running)
            await pilot.press("x")
            await pilot.press("y")
            await asyncio.wait_for(drains[0], 60)
            assert (first.stats or {}).get("finish_reason") == "cancelled"
            await _until(pilot, lambda: first.request_id not in
                         {r.request_id for r in app.snapshot.queue.rows}, 30, "gone")
            assert rows  # both were listed
            await asyncio.wait_for(drains[1], 120)
    finally:
        client.close()


async def test_chat_settings_regenerate_and_export(daemon, tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected" and app.snapshot.models,
                     30, "connected")
        await pilot.press("c")
        chat = app.screen
        assert isinstance(chat, ChatScreen)

        # Settings: the dialog's values become the conversation's (and are kept).
        await pilot.press("ctrl+s")
        await _until(pilot, lambda: isinstance(app.screen, SettingsDialog), 5, "settings")
        app.screen.query_one("#set-max-tokens", Input).value = "6"
        app.screen.query_one("#set-temperature", Input).value = "0"
        await pilot.press("ctrl+s")
        await _until(pilot, lambda: app.screen is chat, 5, "dialog closed")
        assert chat.settings.max_tokens == 6 and chat.settings.temperature == 0.0
        assert chat.store is not None and chat.conv_id is not None
        assert chat.store.get(chat.conv_id).settings.max_tokens == 6

        chat.query_one("#chat-input", Input).focus()
        await pilot.press(*"The capital of France is", "enter")
        await _until(pilot, lambda: len(chat.history) == 2 and not chat.generating, 180,
                     "a reply")
        first = chat.history[-1]
        assert first.role == "assistant" and 0 < first.stats["completion_tokens"] <= 6

        # Regenerate: the last reply is replaced by a new one (greedy: the same text).
        await pilot.press("escape")
        await pilot.press("ctrl+g")
        await _until(pilot, lambda: not chat.generating and len(chat.history) == 2
                     and chat.history[-1].id != first.id, 180, "regenerated")
        again = chat.history[-1]
        assert again.id != first.id and again.content == first.content
        assert [m.role for m in chat.store.messages(chat.conv_id)] == ["user", "assistant"]
        assert [v.role for v in chat.query(MessageView)] == ["user", "assistant"]

        # Export to a file through the conversations dialog.
        target = tmp_path / "out" / "chat.md"
        await pilot.press("ctrl+o")
        await _until(pilot, lambda: isinstance(app.screen, ConversationsDialog), 5, "list")
        await pilot.press("e")
        await _type(pilot, str(target))
        await _until(pilot, target.exists, 10, "exported file")
        text = target.read_text()
        assert "## User" in text and "The capital of France is" in text
        assert again.content.strip() in text


async def _open_ab(pilot, prompt: str, sides: str) -> tuple[ChatScreen, ABScreen]:
    """Connected, in chat, ``prompt`` typed: ctrl+b with ``sides``; the A/B screen open."""
    app = pilot.app
    await _until(pilot, lambda: app.snapshot.connection == "connected" and app.snapshot.models,
                 30, "connected")
    await pilot.press("c")
    chat = app.screen
    assert isinstance(chat, ChatScreen)
    chat.query_one("#chat-input", Input).value = prompt
    await pilot.press("ctrl+b")
    await _type(pilot, sides)
    await _until(pilot, lambda: isinstance(app.screen, ABScreen), 10, "A/B screen")
    return chat, app.screen


async def test_chat_ab_two_settings_side_by_side(daemon, tmp_path: Path) -> None:
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        chat, ab = await _open_ab(pilot, "The capital of France is",
                                  f"{MODEL} max_tokens=3 temperature=0 | {MODEL} max_tokens=7 "
                                  "temperature=0")
        await _until(pilot, lambda: ab.finished, 240, "both sides done")
        await pilot.pause(0.5)
        a, b = ab.sides
        assert (a.params, b.params) == ({"max_tokens": 3, "temperature": 0},
                                        {"max_tokens": 7, "temperature": 0})
        assert not a.error and not b.error
        assert a.tokens == 3 and 3 <= (b.tokens or 0) <= 7
        assert a.ttft_ms and b.ttft_ms and a.tokens_per_s and b.tokens_per_s
        assert "".join(b.parts).startswith("".join(a.parts))  # greedy: the same start
        figures = _shown(app, "#ab-figures-0")
        assert "TTFT" in figures and "tok/s" in figures and "3 tok" in figures
        await pilot.press("escape")
        await _until(pilot, lambda: app.screen is chat, 5, "closed")


async def test_chat_ab_escape_cancels_both_requests(daemon, tmp_path: Path) -> None:
    """Leaving the A/B view stops both generations on the daemon, not only their display."""
    app = InfernoApp(Settings(endpoint=daemon.endpoint, data_dir=str(tmp_path)))
    client = AsyncClient(daemon.endpoint, timeout=30, name="test")
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            chat, ab = await _open_ab(pilot, "Once upon a time",
                                      f"{MODEL} max_tokens=1000 ignore_eos=true | {MODEL} "
                                      "max_tokens=1000 ignore_eos=true temperature=0")
            assert ab.sides[0].params == {"max_tokens": 1000, "ignore_eos": True}
            await _until(pilot, lambda: all(s.parts for s in ab.sides), 240, "both streaming")
            running = {r["request_id"] for r in (await client.request("queue.list"))["items"]
                       if r.get("state") == "running"}
            assert len(running) == 2, running

            await pilot.press("escape")
            await _until(pilot, lambda: app.screen is chat, 5, "closed")

            async def queue_empty() -> bool:
                return not (await client.request("queue.list"))["items"]

            for _ in range(600):  # the cancels land within a decode step or two
                if await queue_empty():
                    break
                await pilot.pause(0.1)
            assert await queue_empty()
            profiles = (await client.request("profiles.recent", {"n": 10}))["profiles"]
            ends = {p["request_id"]: p["finish_reason"] for p in profiles
                    if p["request_id"] in running}
            assert ends == dict.fromkeys(running, "cancelled"), ends
    finally:
        client.close()

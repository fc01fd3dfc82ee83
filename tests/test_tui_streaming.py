"""The chat's live text (widgets/streaming.py) repaints only what changed: the cells a token
added, and past the log's height one jump of its own lines, never a layout per line."""

from __future__ import annotations

from pathlib import Path

from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.geometry import Region
from textual.widgets import Static

from inferno_tui.widgets.streaming import StreamingText, wrap


class Live(App[None]):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("earlier message")
            yield StreamingText(reserve=3, max_height=6)


def _screen_lines(live: StreamingText) -> list[str]:
    return ["".join(s.text for s in live.render_line(y)).rstrip()
            for y in range(live.size.height)]


def test_wrap_keeps_every_character_and_breaks_at_words() -> None:
    text = "Once upon a time there was a village by the sea, and a verylongwordindeed."
    lines = wrap(text, 20)
    assert "".join(lines) == text
    assert all(len(line.rstrip()) <= 20 for line in lines)
    assert lines[0] == "Once upon a time "


async def test_a_token_repaints_only_the_cells_it_added() -> None:
    app = Live()
    async with app.run_test(size=(30, 12)) as pilot:
        live = app.query_one(StreamingText)
        assert live.content_size.width == 30
        refreshed: list[tuple[Region, ...]] = []
        refresh = live.refresh

        def spy(*regions: Region, **kw: bool) -> StreamingText:
            refreshed.append(regions)
            return refresh(*regions, **kw)

        live.refresh = spy  # type: ignore[method-assign]
        live.append("Once upon a time ")
        live.flush()
        await pilot.pause()
        height = live.size.height
        refreshed.clear()
        live.append("there")
        live.flush()
        assert refreshed == [(Region(17, 0, 5, 1),)]  # "there", nothing else
        live.append(" was a village by the sea")  # wraps: the rest of line 0, then line 1
        live.flush()
        await pilot.pause()
        assert refreshed[-1] == (Region(22, 0, 7, 1), Region(0, 1, 18, 1))
        assert _screen_lines(live)[:2] == ["Once upon a time there was a", "village by the sea"]
        assert live.size.height == height  # no layout: the blank reserve took the new line


async def test_past_its_height_it_jumps_its_own_lines_at_most_once_per_move() -> None:
    app = Live()
    async with app.run_test(size=(40, 12)) as pilot:
        live = app.query_one(StreamingText)
        live.MOVE_S = 0.0
        for i in range(20):
            live.append(f"line {i}\n")
            live.flush()
            await pilot.pause()
        assert live.size.height == 6  # grew to max_height, then stopped
        assert live.top > 0
        shown = _screen_lines(live)
        assert "line 19" in shown and "line 0" not in shown
        assert shown[-1] == ""  # room below for what comes
        assert live.shown.splitlines()[0] == "line 0"  # all of it is kept

        live.MOVE_S = 3600.0  # lines that come faster than a jump wait for the next one
        top = live.top
        for i in range(20, 30):
            live.append(f"line {i}\n")
            live.flush()
        await pilot.pause()
        assert live.top == top and "line 29" not in _screen_lines(live)
        live.MOVE_S = 0.0
        live.flush()  # nothing new arrived: the waiting lines still come
        await pilot.pause()
        assert "line 29" in _screen_lines(live)


async def test_the_bytes_bench_runs_the_chat_screen() -> None:
    """bench/tui_bytes.py (the chat screen fed at a set token rate) still measures: a reply
    streamed, its terminal bytes counted."""
    import importlib.util

    path = Path(__file__).parent.parent / "bench" / "tui_bytes.py"
    spec = importlib.util.spec_from_file_location("tui_bytes_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = await bench.one_run(bench.TEXTS["list"], 40.0, 3.0)  # a jump is 2 s at most
    assert result["tok_s"] > 0 and result["bytes_per_s"] > 0, result

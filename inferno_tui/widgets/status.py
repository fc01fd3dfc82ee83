"""The one-line bar at the top of every screen: screen tabs and the connection state."""

from __future__ import annotations

import time

from rich.console import RenderableType
from rich.text import Text
from textual.widgets import Static

from inferno_tui.state import Snapshot

TABS = (("models", "m", "Models"), ("gpu", "g", "GPU"), ("chat", "c", "Chat"),
        ("queue", "q", "Queue"))
STATE_STYLE = {"connected": "bold green", "connecting": "bold yellow",
               "disconnected": "bold red"}


def status_text(snap: Snapshot, current: str, readonly: bool, width: int = 80,
                daemon: str = "") -> Text:
    """``daemon``: the name of the daemon shown, when the console watches several."""
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("inferno", "bold reverse")
    if daemon:
        t.append(" ")
        t.append(daemon, "bold cyan")
    tabs = ((("fleet", "0", "Fleet"),) if daemon else ()) + TABS
    for mode, key, label in tabs:
        style = "bold reverse" if mode == current else "dim"
        t.append(" ")
        t.append(f"{key}:{label}", style)
    t.append("  ")
    t.append("● " + snap.connection, STATE_STYLE.get(snap.connection, "bold"))
    if snap.connection == "connected":
        loaded = [r.name for r in snap.models if r.state == "loaded"]
        if snap.role:
            t.append(" ")
            t.append(snap.role, "cyan")
        if loaded:
            t.append(" ")
            t.append(f"[{', '.join(loaded)}]", "dim")
    else:
        if snap.down_since is not None:
            t.append(time.strftime(" since %H:%M", time.localtime(snap.down_since)), "bold red")
        if snap.detail:
            t.append(" ")
            t.append(snap.detail, "dim")
    if readonly:
        t.append(" ")
        t.append("RO", "bold magenta")
    t.truncate(width, overflow="ellipsis")
    return t


class StatusBar(Static):
    DEFAULT_CSS = "StatusBar { height: 1; background: $panel; }"

    def show(self, snap: Snapshot, current: str, readonly: bool, daemon: str = "") -> None:
        update_if_changed(self, status_text(snap, current, readonly,
                                            max(20, self.size.width or 80), daemon))


def update_if_changed(widget: Static, content: RenderableType, key: object = None) -> bool:
    """``widget.update(content)`` unless it already shows the same: Textual repaints (and
    so writes to the terminal, across the SSH link) every line of an updated widget, even
    when nothing in it changed. ``key`` stands for content that cannot be compared
    (a Rich table): pass the data it was made from. True when it updated."""
    mark = content if key is None else key
    if getattr(widget, "_inferno_shown", None) == mark:
        return False
    widget._inferno_shown = mark  # type: ignore[attr-defined]
    widget.update(content)
    return True

"""What every screen shares: the status bar, the footer, readonly action hiding."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from inferno_tui.errors import Words, in_words
from inferno_tui.state import Snapshot
from inferno_tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from inferno_tui.app import InfernoApp


class InfernoScreen(Screen[None]):
    MODE: ClassVar[str] = ""
    # Actions that change daemon state or local data: hidden in --readonly / monitor role.
    MUTATING: ClassVar[frozenset[str]] = frozenset()

    @property
    def inferno(self) -> InfernoApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_screen_resume(self) -> None:
        self.show(self.inferno.snapshot)

    def show(self, snap: Snapshot) -> None:
        """Render the app's latest snapshot (called at most REDRAW_HZ times a second)."""
        app = self.inferno
        bars = self.query(StatusBar)
        if not bars:  # resumed before its children were composed: the next redraw shows it
            return
        bars.first().show(snap, self.MODE, app.readonly, app.current.name if app.fleet else "")
        self.render_snapshot(snap)

    def render_snapshot(self, snap: Snapshot) -> None:
        pass

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.MUTATING and self.inferno.readonly:
            return False
        return True

    def notify_error(self, e: BaseException, what: str = "the request") -> Words:
        """Show a failure in words (see inferno_tui/errors.py): what failed, why, what to
        do; the daemon's code, message and hint for a refusal. Returns the words."""
        words = in_words(e, what, self.inferno.current.down_since)
        self.notify(words.body, title=words.title, severity="error", timeout=8)
        return words

"""Fleet: every daemon the console watches, one row each; Enter opens one in the other
screens. Shown first when two or more daemons are configured."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from inferno_tui.fleet import COLUMNS, fleet_detail, fleet_row
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.state import Snapshot
from inferno_tui.widgets.status import update_if_changed

STATE_STYLE = {"connected": "bold green", "connecting": "yellow", "reconnecting": "bold red",
               "refused": "bold red"}


class FleetScreen(InfernoScreen):
    MODE = "fleet"
    BINDINGS = [Binding("enter", "open", "Open", priority=True)]

    def __init__(self) -> None:
        super().__init__()
        self._rows: list[tuple[str, ...]] = []

    def compose_body(self) -> ComposeResult:
        table: DataTable[Any] = DataTable(id="fleet-table", cursor_type="row")
        for label, width in COLUMNS:
            table.add_column(label, key=label, width=width)
        yield table
        yield Static(id="fleet-detail")

    def render_snapshot(self, snap: Snapshot) -> None:
        rows = [fleet_row(d) for d in self.inferno.daemons]
        table = self.query_one(DataTable)
        if rows != self._rows:
            cursor = table.cursor_row
            table.clear()
            for row in rows:
                state = Text(row[1], STATE_STYLE.get(row[1], "bold"))
                table.add_row(row[0], state, *row[2:])
            self._rows = rows
            table.move_cursor(row=min(max(cursor, 0), len(rows) - 1))
        self._show_detail()

    def _show_detail(self) -> None:
        i = self.query_one(DataTable).cursor_row
        daemons = self.inferno.daemons
        text = fleet_detail(daemons[i]) if 0 <= i < len(daemons) else ""
        update_if_changed(self.query_one("#fleet-detail", Static), Text(text, "dim"))

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def action_open(self) -> None:
        i = self.query_one(DataTable).cursor_row
        if 0 <= i < len(self.inferno.daemons):
            self.inferno.open_daemon(i)

"""Queue & profiler: running and waiting requests, backpressure, operator actions, latency."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from inferno_tui import fmt
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.screens.dialogs import Confirm
from inferno_tui.state import Snapshot
from inferno_tui.views import QueueRow, QueueView, RecentLatency, StatsRow
from inferno_tui.widgets.graphs import spark
from inferno_tui.widgets.status import update_if_changed
from infernod.protocol.vocabulary import PRIORITIES

# 60 columns of content + 2 padding per column = 76 (fits 80 columns with a scrollbar).
COLUMNS = (("id", "Request", 12), ("state", "State", 8), ("model", "Model", 11),
           ("prio", "Class", 6), ("client", "Client", 8), ("age", "Age", 4),
           ("dl", "Dline", 5), ("tok", "Tok", 5))
LEVEL_STYLE = {"healthy": "green", "elevated": "yellow", "critical": "bold red"}


def queue_cells(r: QueueRow) -> tuple[Any, ...]:
    if r.state == "running":
        state = Text("running", "bold green")
    else:
        pos = f"#{r.position}" if r.position is not None else r.state
        state = Text(pos + (f" ~{fmt.secs(r.eta_s)}" if r.eta_s is not None else ""), "yellow")
    rid = r.request_id if len(r.request_id) <= 12 else "…" + r.request_id[-11:]
    return (rid, state, fmt.text(r.model), fmt.text(r.priority), fmt.text(r.client),
            fmt.secs(r.age_s), fmt.secs(r.deadline_in_s), fmt.text(r.tokens))


def summary_text(q: QueueView) -> Text:
    t = Text()
    t.append(f"running {fmt.text(q.running)}  ", "bold")
    t.append(f"waiting {fmt.text(q.queued)}  ", "bold")
    t.append("backpressure ")
    level = q.level or "n/a"
    t.append(level, LEVEL_STYLE.get(level, "bold"))
    return t


def stats_table(rows: tuple[StatsRow, ...]) -> Table:
    t = Table(box=None, expand=True, padding=(0, 1), header_style="bold",
              title="latency, last 5 min", title_justify="left", title_style="bold underline")
    for col in ("Group", "n", "TTFT p50", "p95", "p99", "tok/s p50", "e2e p95"):
        t.add_column(col, justify="left" if col == "Group" else "right")
    for r in rows:
        label = r.name if r.group != "priority" else f"prio {r.name}"
        t.add_row(label, fmt.text(r.count), fmt.ms(r.ttft_p50), fmt.ms(r.ttft_p95),
                  fmt.ms(r.ttft_p99), fmt.fixed(r.tps_p50), fmt.ms(r.e2e_p95),
                  style="bold" if r.group == "overall" else "")
    if not rows:
        t.add_row(Text("no statistics yet", "dim"), "", "", "", "", "", "")
    return t


def slots_table(snap: Snapshot) -> Table:
    """Which request holds which slot of each loaded model, its tokens so far and the
    prompt tokens its slot's cache already held (``slot``/``cached_tokens`` of running
    queue rows); free slots as such."""
    t = Table(box=None, expand=True, padding=(0, 1), header_style="bold",
              title="slots (s: back to latency)", title_justify="left",
              title_style="bold underline")
    for col in ("Model", "Slot", "Request", "Tokens", "Cached", "Class"):
        t.add_column(col, justify="right" if col in ("Slot", "Tokens", "Cached") else "left")
    running = [r for r in snap.queue.rows if r.state in ("running", "preempting")]
    models = sorted({*(m.name for m in snap.models if m.state == "loaded"),
                     *(r.model for r in running if r.model)})
    for name in models:
        rows = [r for r in running if r.model == name]
        held = {r.slot: r for r in rows if r.slot is not None}
        row = snap.model(name)
        n = row.slots if row is not None and row.slots else 0
        for i in range(max(n, max(held, default=-1) + 1)):
            r = held.get(i)
            if r is None:
                t.add_row(name, str(i), Text("free", "dim"), "", "", "")
            else:
                t.add_row(name, str(i), r.request_id, fmt.text(r.tokens),
                          fmt.text(r.cached_tokens), fmt.text(r.priority))
        for r in rows:
            if r.slot is None:  # a daemon that does not say which slot
                t.add_row(name, "?", r.request_id, fmt.text(r.tokens),
                          fmt.text(r.cached_tokens), fmt.text(r.priority))
    if not models:
        t.add_row(Text("no model loaded", "dim"), "", "", "", "", "")
    return t


def recent_text(recent: RecentLatency, width: int = 48) -> Group:
    ttft = Text("TTFT   ", "bold")
    ttft.append(spark(recent.ttft_ms, width, 0, None), "magenta")
    ttft.append(f" {fmt.ms(recent.ttft_ms[-1] if recent.ttft_ms else None)}")
    tps = Text("tok/s  ", "bold")
    tps.append(spark(recent.tokens_per_s, width, 0, None), "cyan")
    tps.append(f" {fmt.fixed(recent.tokens_per_s[-1] if recent.tokens_per_s else None)}")
    return Group(ttft, tps)


class QueueScreen(InfernoScreen):
    MODE = "queue"
    MUTATING = frozenset({"cancel", "promote", "demote"})
    POLL_S = 1.0
    BINDINGS = [
        Binding("x", "cancel", "Cancel"),
        Binding("plus,equals_sign", "promote", "Prio+"),
        Binding("minus", "demote", "Prio-"),
        Binding("s", "slots", "Slots"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._queue: QueueView | None = None
        self.show_slots = False

    def compose_body(self) -> ComposeResult:
        yield Static(id="queue-summary")
        table: DataTable[Any] = DataTable(id="queue-table", cursor_type="row")
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield Static(id="queue-stats")
        yield Static(id="queue-recent")

    def on_mount(self) -> None:
        self.set_interval(self.POLL_S, self._poll)

    def _poll(self) -> None:
        if self.app.screen is self:  # only while shown: tokens so far, slots, new waiters
            self.inferno.refresh_queue()

    def render_snapshot(self, snap: Snapshot) -> None:
        q = snap.queue
        update_if_changed(self.query_one("#queue-summary", Static), summary_text(q))
        if q != self._queue:
            self._queue = q
            table = self.query_one(DataTable)
            cursor = table.cursor_row
            table.clear()
            for r in q.rows:
                table.add_row(*queue_cells(r), key=r.request_id)
            if q.rows:
                table.move_cursor(row=min(cursor, len(q.rows) - 1))
        if self.show_slots:
            update_if_changed(self.query_one("#queue-stats", Static), slots_table(snap),
                              key=("slots", q.rows, snap.models))
        else:
            update_if_changed(self.query_one("#queue-stats", Static),
                              stats_table(snap.stats), key=snap.stats)
        update_if_changed(self.query_one("#queue-recent", Static), recent_text(snap.recent),
                          key=snap.recent)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        caps = self.inferno.snapshot.capabilities
        if allowed and action in ("promote", "demote") and caps and "reprioritize" not in caps:
            return False
        return allowed

    def action_slots(self) -> None:
        """Show the slots (who holds which, tokens, cached prefix) instead of latency."""
        self.show_slots = not self.show_slots
        self.show(self.inferno.snapshot)

    def selected(self) -> QueueRow | None:
        table = self.query_one(DataTable)
        rows = self._queue.rows if self._queue else ()
        if 0 <= table.cursor_row < len(rows):
            return rows[table.cursor_row]
        return None

    def action_cancel(self) -> None:
        row = self.selected()
        if row is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.queue_request("cancel", {"request_id": row.request_id}, "cancelling")

        self.app.push_screen(Confirm(f"Cancel request {row.request_id}?"), done)

    def _shift(self, step: int) -> None:
        row = self.selected()
        if row is None:
            return
        current = row.priority if row.priority in PRIORITIES else "normal"
        i = min(len(PRIORITIES) - 1, max(0, PRIORITIES.index(current) - step))
        self.queue_request("reprioritize", {"request_id": row.request_id,
                                            "priority": PRIORITIES[i]},
                           f"moving to {PRIORITIES[i]}")

    def action_promote(self) -> None:
        self._shift(1)

    def action_demote(self) -> None:
        self._shift(-1)

    @work(group="queue-actions", exit_on_error=False)
    async def queue_request(self, type_: str, body: dict[str, Any], what: str) -> None:
        try:
            reply = await self.inferno.connection.request(type_, body)
        except Exception as e:
            self.notify_error(e, f"{what} of {body['request_id']}")
            return
        self.notify(f"{body['request_id']}: {reply.get('state', what)}", timeout=3)

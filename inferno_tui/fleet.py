"""Several daemons in one console: one :class:`DaemonView` per daemon, each with its own
connection (its subscriptions stay open while another daemon is on screen), snapshot and
metrics history, plus the ``status`` figures the fleet screen shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from inferno_tui import fmt
from inferno_tui.connection import Connection
from inferno_tui.state import Snapshot
from inferno_tui.views import MetricsHistory

STATUS_EVERY_S = 2.0  # how often the fleet asks each daemon for its status figures


@dataclass
class DaemonView:
    name: str
    endpoint: str  # for people: "local" for the default ipc socket
    connection: Connection
    snapshot: Snapshot = field(default_factory=Snapshot)
    history: MetricsHistory = field(default_factory=MetricsHistory)
    profiles_seen: bool = False
    status: dict[str, Any] = field(default_factory=dict)  # the last `status` reply
    status_at: float = 0.0  # monotonic time of that reply
    boot_id: str | None = None
    restarted_at: float | None = None  # wall clock of the last boot change we saw
    down_since: float | None = None  # wall clock: not answering since then
    hello_boot: str | None = None  # the boot id of the daemon we were connected to
    loading_when_lost: str | None = None  # the model it was loading when it went away

    def note_status(self, status: dict[str, Any]) -> None:
        boot = status.get("boot_id")
        if self.boot_id is not None and boot != self.boot_id:
            self.restarted_at = time.time()
        self.boot_id = str(boot) if boot is not None else None
        self.status, self.status_at = status, time.monotonic()

    def note_connection(self, state: str) -> None:
        if state == "connected":
            self.down_since = None
        elif state == "disconnected" and self.down_since is None:
            self.down_since = time.time()


# (label, width): 61 columns of content + 2 padding per column fit 80 with a scrollbar
COLUMNS = (("Daemon", 8), ("State", 12), ("Up", 6), ("Models", 6), ("Queue", 9),
           ("tok/s", 6), ("GPU", 9), ("Crash", 5))
LEVEL_SHORT = {"elevated": "elev", "critical": "CRIT"}  # healthy: nothing to say


def fleet_row(d: DaemonView) -> tuple[str, ...]:
    """One row of the fleet table: what an operator scans first for each daemon."""
    snap = d.snapshot
    if snap.connection != "connected":
        state = "reconnecting" if snap.connection == "disconnected" else snap.connection
        if "forbidden" in snap.detail or "refused" in snap.detail:
            state = "refused"
        return (d.name, state, "", "", "", "", "", "")
    st = d.status
    queue = st.get("queue") or {}
    level = queue.get("level") or snap.queue.level
    depth = f"{queue.get('running', 0)}+{queue.get('queued', 0)}" if queue else "?"
    if level in LEVEL_SHORT:
        depth += f" {LEVEL_SHORT[level]}"
    loaded = sum(1 for m in snap.models if m.state == "loaded")
    failed = sum(1 for m in snap.models if m.state == "failed")
    models = f"{loaded}" + (f" ({failed} failed)" if failed else "")
    gpus = snap.metrics.gpus
    gpu = " ".join(f"{fmt.pct(g.utilization_pct)} {fmt.size_short(g.memory_used_bytes)}"
                   for g in gpus) or "-"
    tps = st.get("tokens_per_s")
    return (d.name, "connected", fmt.secs(st.get("uptime_s")),
            models, depth, "?" if tps is None else f"{tps:.1f}", gpu,
            str(st.get("runner_crashes_1h", "?")))


def fleet_detail(d: DaemonView) -> str:
    """The line under the table for the highlighted daemon: where it is and, when it is
    not connected, why and what to do."""
    snap = d.snapshot
    if snap.connection == "connected":
        line = f"{d.name}: {d.endpoint}, infernod {snap.version or '?'}"
        if d.restarted_at is not None:
            line += f"; restarted at {time.strftime('%H:%M:%S', time.localtime(d.restarted_at))}"
        return line + " (Enter: open it)"
    since = "" if d.down_since is None else \
        f" since {time.strftime('%H:%M:%S', time.localtime(d.down_since))}"
    why = snap.detail or "no answer yet"
    return (f"{d.name}: not answering{since}: {why}. Is it running? On its host: "
            "systemctl status infernod")

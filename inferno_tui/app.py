"""InfernoApp: the connection, the connection-state reactive, global bindings, redraw cap.

Screens lay out and render the frozen :class:`Snapshot` they are given; the app replaces the
snapshot as messages arrive and pushes it to the visible screen at most ``REDRAW_HZ`` times a
second, so a slow SSH link is never flooded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import Any

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen

from inferno_tui import errors, fmt
from inferno_tui import messages as m
from inferno_tui.connection import Connection, Settings
from inferno_tui.fleet import STATUS_EVERY_S, DaemonView
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.screens.chat import ChatScreen
from inferno_tui.screens.fleet import FleetScreen
from inferno_tui.screens.gpu import GpuScreen
from inferno_tui.screens.models import ModelsScreen
from inferno_tui.screens.queue import QueueScreen
from inferno_tui.state import Progress, Snapshot, hello_fields
from inferno_tui.views import (
    MetricsHistory,
    MetricsView,
    QueueView,
    add_profile,
    merge_loaded,
    models_from_list,
    stats_rows,
)
from inferno_tui.workers import start as start_worker
from infernod.client.config import DaemonEntry

SCREENS = (("models", "Models", "m"), ("gpu", "GPU & system", "g"), ("chat", "Chat", "c"),
           ("queue", "Queue & profiler", "q"))


class InfernoApp(App[None]):
    CSS_PATH = "inferno.tcss"
    TITLE = "inferno"
    MODES = {"models": ModelsScreen, "gpu": GpuScreen, "chat": ChatScreen,
             "queue": QueueScreen, "fleet": FleetScreen}
    DEFAULT_MODE = "models"
    BINDINGS = [
        *(Binding(key, f"switch_mode('{mode}')", label.split(" ")[0], show=False)
          for mode, label, key in SCREENS),
        *(Binding(str(i), f"switch_mode('{mode}')", label, show=False)
          for i, (mode, label, _) in enumerate(SCREENS, 1)),
        *(Binding(f"f{i}", f"switch_mode('{mode}')", label, show=False, priority=True)
          for i, (mode, label, _) in enumerate(SCREENS, 1)),
        Binding("0,f5", "switch_mode('fleet')", "Fleet", show=False, priority=True),
        Binding("f6,right_square_bracket", "next_daemon", "Next daemon", show=False,
                priority=True),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]
    REDRAW_HZ = 4.0

    connection_state: reactive[str] = reactive("connecting")

    def __init__(self, settings: Settings | None = None, *, connect: bool = True,
                 snapshot: Snapshot | None = None,
                 daemons: list[DaemonEntry] | None = None) -> None:
        super().__init__()
        self.settings = s = settings or Settings()
        entries = daemons or [DaemonEntry(s.endpoint or "local", s.endpoint, s.server_key,
                                          s.client_key)]
        self.daemons = [self._daemon_view(i, e) for i, e in enumerate(entries)]
        self.active = 0
        if snapshot is not None:
            self.daemons[0].snapshot = snapshot
        self._connect = connect
        self._dirty = True

    def _daemon_view(self, i: int, entry: DaemonEntry) -> DaemonView:
        settings = replace(self.settings, endpoint=entry.endpoint, server_key=entry.server_key,
                           client_key=entry.client_key)

        def post(msg: Message) -> None:
            if isinstance(msg, m.DaemonMessage):
                msg.daemon = i
            self.post_message(msg)

        return DaemonView(entry.name, entry.endpoint or "local", Connection(settings, post))

    @property
    def fleet(self) -> bool:
        return len(self.daemons) > 1

    @property
    def current(self) -> DaemonView:
        """The daemon the models, GPU, chat and queue screens show."""
        return self.daemons[self.active]

    @property
    def connection(self) -> Connection:
        return self.current.connection

    @property
    def snapshot(self) -> Snapshot:
        return self.current.snapshot

    @property
    def history(self) -> MetricsHistory:
        return self.current.history

    # -- lifecycle --------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.set_interval(1 / self.REDRAW_HZ, self._redraw)
        if self._connect:
            for i, d in enumerate(self.daemons):  # each keeps its subscriptions open
                start_worker(self, d.connection.run, f"connection-{i}", exclusive=True)
            if self.fleet:
                self.set_interval(STATUS_EVERY_S, self._poll_status)
        if self.fleet:
            self.switch_mode("fleet")

    def _poll_status(self) -> None:
        for i, d in enumerate(self.daemons):
            if d.snapshot.connection == "connected":
                start_worker(self, partial(self._status, d), f"status-{i}", exclusive=True)

    async def _status(self, d: DaemonView) -> None:
        try:
            d.note_status(await d.connection.request("status", timeout=STATUS_EVERY_S * 2))
        except Exception:  # the connection worker reports a lost daemon in words
            return
        self._dirty = True

    def open_daemon(self, i: int) -> None:
        """Show daemon ``i`` in the other screens (the fleet screen's Enter)."""
        self.active = i
        self._dirty = True
        self.connection_state = self.current.snapshot.connection
        if self.current_mode == "fleet":
            self.switch_mode("models")
        else:
            self._redraw()

    def action_next_daemon(self) -> None:
        self.open_daemon((self.active + 1) % len(self.daemons))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_daemon" or (action == "switch_mode" and parameters == ("fleet",)):
            return self.fleet
        return True

    @property
    def readonly(self) -> bool:
        return self.settings.readonly or self.snapshot.role == "monitor"

    def update_snapshot(self, **changes: Any) -> None:
        """Change what the screens show for the current daemon."""
        self._update(self.current, **changes)

    def _update(self, d: DaemonView, **changes: Any) -> None:
        d.snapshot = replace(d.snapshot, **changes)
        if d is self.current or self.fleet:
            self._dirty = True

    def _source(self, msg: m.DaemonMessage) -> DaemonView:
        return self.daemons[msg.daemon] if 0 <= msg.daemon < len(self.daemons) else self.current

    def _redraw(self) -> None:
        """Show the newest snapshot, at most REDRAW_HZ times a second. (Not ``_flush``:
        Textual's App._flush is what its stdout/stderr capture calls on every flush.)"""
        if not self._dirty or not self.screen_stack:  # no screen while starting or stopping
            return
        screen = self.screen
        if not isinstance(screen, InfernoScreen):
            return
        if not screen.is_mounted or not screen.is_attached:
            return  # a mode switch is still composing it (or tearing it down): next tick
        self._dirty = False
        screen.show(self.snapshot)

    def on_screen_resume(self) -> None:  # a mode switch shows fresh data at once
        self._dirty = True
        self._redraw()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, label, key in SCREENS:
            yield SystemCommand(f"Go to {label}", f"Switch to the {label} screen ({key})",
                                lambda mode=mode: self.switch_mode(mode))

    def watch_connection_state(self, state: str) -> None:
        self._dirty = True
        self.refresh_bindings()

    # -- messages from the connection workers (one per daemon) -----------------------------
    @on(m.ConnectionChanged)
    def _connection_changed(self, msg: m.ConnectionChanged) -> None:
        d = self._source(msg)
        changes: dict[str, object] = {"connection": msg.state, "detail": msg.detail}
        if msg.state == "connected":
            changes.update(hello_fields(msg.hello))
            d.history.clear()
            boot = msg.hello.get("boot_id")
            if d.hello_boot is not None and boot is not None and boot != d.hello_boot:
                after = None if d.down_since is None else time.time() - d.down_since
                changes["notice"] = errors.restarted(d.loading_when_lost, after)
            elif d.down_since is not None:
                changes["notice"] = f"infernod answers again (lost at {errors.clock(d.down_since)})"
            d.hello_boot = str(boot) if boot is not None else d.hello_boot
            d.loading_when_lost = None
        elif msg.state == "disconnected":
            if d.down_since is None:  # what it was doing when it went away
                d.loading_when_lost = next((p.model for p in d.snapshot.progress.values()
                                            if p.action == "loading"), None)
            changes["queue"] = QueueView()
            changes["progress"] = {}
        d.note_connection(msg.state)
        changes["down_since"] = d.down_since
        if msg.state == "disconnected":  # why (msg.detail) is on the status bar
            changes["notice"] = f"infernod {errors.lost(d.down_since)}"
        self._update(d, **changes)
        if d is self.current:
            self.connection_state = msg.state

    @on(m.ModelsListed)
    def _models_listed(self, msg: m.ModelsListed) -> None:
        self._update(self._source(msg), models=models_from_list(msg.models))

    @on(m.ModelsEventReceived)
    def _models_event(self, msg: m.ModelsEventReceived) -> None:
        d = self._source(msg)
        body, snap = msg.body, d.snapshot
        event, name = str(body.get("event") or msg.type), str(body.get("model") or "")
        progress = dict(snap.progress)
        if event == "progress":
            action, words = _progress_words(body)
            progress[name] = Progress(name, action, body.get("done_bytes"),
                                      body.get("total_bytes"), words)
        elif event == "loading":
            progress[name] = Progress(name, "loading", None, body.get("estimate_bytes"),
                                      since=time.monotonic())
        else:
            progress.pop(name, None)
        notice = {
            "loaded": f"{name} loaded in {body.get('load_s', '?')}s",
            "unloaded": f"{name} unloaded ({body.get('reason', '')})",
            "load_failed": f"loading {name} failed: {body.get('error', '')}",
            "failed": str(body.get("reason") or f"{name} failed"),
            "imported": f"{name} imported", "removed": f"{name} removed",
            "pulled": f"{name} pulled",
            "pull_failed": f"pull of {name} {body.get('state', 'failed')}: "
                           f"{(body.get('error') or {}).get('message', '')}",
        }.get(event, snap.notice)
        models = snap.models
        if isinstance(body.get("loaded"), list):
            models = merge_loaded(models, body["loaded"], body.get("failed") or ())
        self._update(d, progress=progress, notice=notice, models=models)
        if event in ("imported", "pulled", "removed", "ready") or (name and snap.model(name) is None
                                                         and event != "progress"):
            self.refresh_models(msg.daemon)

    def refresh_models(self, daemon: int | None = None) -> None:
        i = self.active if daemon is None else daemon
        start_worker(self, partial(self._refresh_models, self.daemons[i]), f"models-list-{i}",
                     exclusive=True)

    async def _refresh_models(self, d: DaemonView) -> None:
        try:
            models = await d.connection.request("models.list", timeout=30)
        except Exception:
            return
        self._update(d, models=models_from_list(models.get("models") or []))

    def refresh_queue(self) -> None:
        """queue.list now: the ``queue`` topic says when requests start and end, not how
        many tokens each has so far nor always when one starts waiting."""
        d = self.current
        if d.snapshot.connection == "connected" and "queue.list" in d.snapshot.capabilities:
            start_worker(self, partial(self._refresh_queue, d), f"queue-list-{self.active}",
                         exclusive=True)

    async def _refresh_queue(self, d: DaemonView) -> None:
        try:
            reply = await d.connection.request("queue.list", timeout=10)
        except Exception:  # the connection worker reports a lost daemon in words
            return
        self._update(d, queue=QueueView.from_wire(reply, d.snapshot.queue.level))

    @on(m.MetricsSampled)
    def _metrics(self, msg: m.MetricsSampled) -> None:
        d = self._source(msg)
        view = MetricsView.from_wire(msg.sample)
        d.history.add(view)
        self._update(d, metrics=view, histories=d.history.snapshot())

    @on(m.QueueUpdated)
    def _queue(self, msg: m.QueueUpdated) -> None:
        d = self._source(msg)
        self._update(d, queue=QueueView.from_wire(msg.snapshot, d.snapshot.queue.level))

    @on(m.BackpressureChanged)
    def _backpressure(self, msg: m.BackpressureChanged) -> None:
        d = self._source(msg)
        level = msg.body.get("level")
        self._update(d, queue=replace(d.snapshot.queue,
                                      level=None if level is None else str(level)))

    @on(m.StatsUpdated)
    def _stats(self, msg: m.StatsUpdated) -> None:
        self._update(self._source(msg), stats=stats_rows(msg.summary))

    @on(m.ProfileReceived)
    def _profile(self, msg: m.ProfileReceived) -> None:
        d = self._source(msg)
        d.profiles_seen = True
        self._update(d, recent=add_profile(d.snapshot.recent, msg.profile))

    def record_local_profile(self, stats: dict) -> None:
        """Our own finished generations feed the sparklines on daemons without ``profiles``."""
        if self.current.profiles_seen:
            return
        self.update_snapshot(recent=add_profile(self.snapshot.recent, stats))


def _progress_words(body: dict[str, Any]) -> tuple[str, str]:
    """(action, message) of a ``progress`` event: a pull's says its rate and time left."""
    if body.get("pull_id") is None:
        return "importing", str(body.get("message") or "")
    state = str(body.get("state") or "downloading")
    if state != "downloading":
        return "pulling", state
    return "pulling", (f"{fmt.size(body.get('done_bytes'))} of "
                       f"{fmt.size(body.get('total_bytes'))}, "
                       f"{fmt.size(body.get('rate_bytes_s'))}/s, "
                       f"{fmt.secs(body.get('eta_s'))} left (D stops)")

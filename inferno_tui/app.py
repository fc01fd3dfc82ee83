"""InfernoApp: the connection, the connection-state reactive, global bindings, redraw cap.

Screens lay out and render the frozen :class:`Snapshot` they are given; the app replaces the
snapshot as messages arrive and pushes it to the visible screen at most ``REDRAW_HZ`` times a
second, so a slow SSH link is never flooded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from inferno_tui import messages as m
from inferno_tui.connection import Connection, Settings
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.screens.chat import ChatScreen
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

SCREENS = (("models", "Models", "m"), ("gpu", "GPU & system", "g"), ("chat", "Chat", "c"),
           ("queue", "Queue & profiler", "q"))


class InfernoApp(App[None]):
    CSS_PATH = "inferno.tcss"
    TITLE = "inferno"
    MODES = {"models": ModelsScreen, "gpu": GpuScreen, "chat": ChatScreen,
             "queue": QueueScreen}
    DEFAULT_MODE = "models"
    BINDINGS = [
        *(Binding(key, f"switch_mode('{mode}')", label.split(" ")[0], show=False)
          for mode, label, key in SCREENS),
        *(Binding(str(i), f"switch_mode('{mode}')", label, show=False)
          for i, (mode, label, _) in enumerate(SCREENS, 1)),
        *(Binding(f"f{i}", f"switch_mode('{mode}')", label, show=False, priority=True)
          for i, (mode, label, _) in enumerate(SCREENS, 1)),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]
    REDRAW_HZ = 4.0

    connection_state: reactive[str] = reactive("connecting")

    def __init__(self, settings: Settings | None = None, *, connect: bool = True,
                 snapshot: Snapshot | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings()
        self.connection = Connection(self.settings, self.post_message)
        self.snapshot = snapshot or Snapshot()
        self.history = MetricsHistory()
        self._connect = connect
        self._dirty = True
        self._profiles_seen = False

    # -- lifecycle --------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.set_interval(1 / self.REDRAW_HZ, self._redraw)
        if self._connect:
            self.run_connection()

    @work(exclusive=True, group="connection", exit_on_error=False)
    async def run_connection(self) -> None:
        await self.connection.run()

    @property
    def readonly(self) -> bool:
        return self.settings.readonly or self.snapshot.role == "monitor"

    def update_snapshot(self, **changes: Any) -> None:
        self.snapshot = replace(self.snapshot, **changes)
        self._dirty = True

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

    # -- messages from the connection worker ------------------------------------------------
    @on(m.ConnectionChanged)
    def _connection_changed(self, msg: m.ConnectionChanged) -> None:
        changes: dict[str, object] = {"connection": msg.state, "detail": msg.detail}
        if msg.state == "connected":
            changes.update(hello_fields(msg.hello))
            self.history.clear()
        elif msg.state == "disconnected":
            changes["queue"] = QueueView()
            changes["progress"] = {}
        self.update_snapshot(**changes)
        self.connection_state = msg.state

    @on(m.ModelsListed)
    def _models_listed(self, msg: m.ModelsListed) -> None:
        self.update_snapshot(models=models_from_list(msg.models))

    @on(m.ModelsEventReceived)
    def _models_event(self, msg: m.ModelsEventReceived) -> None:
        body, snap = msg.body, self.snapshot
        event, name = str(body.get("event") or msg.type), str(body.get("model") or "")
        progress = dict(snap.progress)
        if event == "progress":
            progress[name] = Progress(name, "importing", body.get("done_bytes"),
                                      body.get("total_bytes"), str(body.get("message") or ""))
        elif event == "loading":
            progress[name] = Progress(name, "loading", None, body.get("estimate_bytes"))
        else:
            progress.pop(name, None)
        notice = {
            "loaded": f"{name} loaded in {body.get('load_s', '?')}s",
            "unloaded": f"{name} unloaded ({body.get('reason', '')})",
            "load_failed": f"loading {name} failed: {body.get('error', '')}",
            "failed": str(body.get("reason") or f"{name} failed"),
            "imported": f"{name} imported", "removed": f"{name} removed",
        }.get(event, snap.notice)
        models = snap.models
        if isinstance(body.get("loaded"), list):
            models = merge_loaded(models, body["loaded"], body.get("failed") or ())
        self.update_snapshot(progress=progress, notice=notice, models=models)
        if event in ("imported", "removed", "ready") or (name and snap.model(name) is None
                                                         and event != "progress"):
            self.refresh_models()

    @work(exclusive=True, group="models-list", exit_on_error=False)
    async def refresh_models(self) -> None:
        try:
            models = await self.connection.request("models.list", timeout=30)
        except Exception:
            return
        self.update_snapshot(models=models_from_list(models.get("models") or []))

    @on(m.MetricsSampled)
    def _metrics(self, msg: m.MetricsSampled) -> None:
        view = MetricsView.from_wire(msg.sample)
        self.history.add(view)
        self.update_snapshot(metrics=view, histories=self.history.snapshot())

    @on(m.QueueUpdated)
    def _queue(self, msg: m.QueueUpdated) -> None:
        self.update_snapshot(queue=QueueView.from_wire(msg.snapshot, self.snapshot.queue.level))

    @on(m.BackpressureChanged)
    def _backpressure(self, msg: m.BackpressureChanged) -> None:
        level = msg.body.get("level")
        self.update_snapshot(queue=replace(self.snapshot.queue,
                                           level=None if level is None else str(level)))

    @on(m.StatsUpdated)
    def _stats(self, msg: m.StatsUpdated) -> None:
        self.update_snapshot(stats=stats_rows(msg.summary))

    @on(m.ProfileReceived)
    def _profile(self, msg: m.ProfileReceived) -> None:
        self._profiles_seen = True
        self.update_snapshot(recent=add_profile(self.snapshot.recent, msg.profile))

    def record_local_profile(self, stats: dict) -> None:
        """Our own finished generations feed the sparklines on daemons without ``profiles``."""
        if self._profiles_seen:
            return
        self.update_snapshot(recent=add_profile(self.snapshot.recent, stats))

"""The app's view of the daemon: one frozen snapshot, replaced (never mutated) on updates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inferno_tui.views import (
    Histories,
    MetricsView,
    ModelRow,
    QueueView,
    RecentLatency,
    StatsRow,
)


@dataclass(frozen=True)
class Progress:
    """A model operation in flight (load/import/remove) with optional byte progress."""

    model: str
    action: str
    done_bytes: int | None = None
    total_bytes: int | None = None
    message: str = ""
    since: float | None = None  # monotonic: when it began (a load says how long so far)


@dataclass(frozen=True)
class Snapshot:
    connection: str = "connecting"  # connecting | connected | disconnected
    detail: str = ""
    down_since: float | None = None  # wall clock: not answering since then
    role: str | None = None
    version: str | None = None
    capabilities: frozenset[str] = frozenset()
    models: tuple[ModelRow, ...] = ()
    progress: Mapping[str, Progress] = field(default_factory=dict)
    metrics: MetricsView = field(default_factory=MetricsView)
    histories: Histories = field(default_factory=lambda: Histories({}))
    queue: QueueView = field(default_factory=QueueView)
    stats: tuple[StatsRow, ...] = ()
    recent: RecentLatency = field(default_factory=RecentLatency)
    notice: str = ""  # last model event or refusal, shown on the Models screen

    def model(self, name: str) -> ModelRow | None:
        return next((m for m in self.models if m.name == name), None)


def hello_fields(hello: Mapping[str, Any]) -> dict[str, Any]:
    caps = hello.get("capabilities")
    return {"role": hello.get("role"), "version": hello.get("version"),
            "capabilities": frozenset(caps) if isinstance(caps, list) else frozenset()}

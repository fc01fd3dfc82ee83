"""Messages between the connection worker, the app and the screens (past-tense names).

High-rate ones implement ``can_replace`` so queued copies merge instead of piling up on a
slow terminal: only the newest metrics/queue/stats snapshot matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


class DaemonMessage(Message):
    """From one daemon's connection: ``daemon`` is its index in the app's fleet (0 when the
    console watches one daemon)."""

    daemon: int = 0


@dataclass
class ConnectionChanged(DaemonMessage):
    """state: connecting | connected | disconnected."""

    state: str
    detail: str = ""
    hello: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelsListed(DaemonMessage):
    models: list[dict[str, Any]]


@dataclass
class ModelsEventReceived(DaemonMessage):
    """A ``models`` topic event: loading/loaded/unloaded/progress/imported/removed/..."""

    type: str
    body: dict[str, Any]


@dataclass
class MetricsSampled(DaemonMessage):
    sample: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MetricsSampled) and message.daemon == self.daemon


@dataclass
class QueueUpdated(DaemonMessage):
    snapshot: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, QueueUpdated) and message.daemon == self.daemon


@dataclass
class BackpressureChanged(DaemonMessage):
    body: dict[str, Any]


@dataclass
class StatsUpdated(DaemonMessage):
    summary: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatsUpdated) and message.daemon == self.daemon


@dataclass
class ProfileReceived(DaemonMessage):
    profile: dict[str, Any]

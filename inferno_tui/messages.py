"""Messages between the connection worker, the app and the screens (past-tense names).

High-rate ones implement ``can_replace`` so queued copies merge instead of piling up on a
slow terminal: only the newest metrics/queue/stats snapshot matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class ConnectionChanged(Message):
    """state: connecting | connected | disconnected."""

    state: str
    detail: str = ""
    hello: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelsListed(Message):
    models: list[dict[str, Any]]


@dataclass
class ModelsEventReceived(Message):
    """A ``models`` topic event: loading/loaded/unloaded/progress/imported/removed/..."""

    type: str
    body: dict[str, Any]


@dataclass
class MetricsSampled(Message):
    sample: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MetricsSampled)


@dataclass
class QueueUpdated(Message):
    snapshot: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, QueueUpdated)


@dataclass
class BackpressureChanged(Message):
    body: dict[str, Any]


@dataclass
class StatsUpdated(Message):
    summary: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatsUpdated)


@dataclass
class ProfileReceived(Message):
    profile: dict[str, Any]

"""The one table of requests: request type -> minimum role, body schema, handler.

The server's dispatch (``infernod.daemon.server.Daemon._admit``) reads only this table: it
refuses an unknown type, checks the caller's role before decoding the body, bounds and
validates the body against the schema, then runs the handler. The schemas themselves are
part of the wire and live in ``infernod.protocol.messages.SCHEMAS`` (docs/protocol.md is
checked against them); each row takes its own by the request type. Roles, lowest first:
none < monitor < user < operator (``server.ROLES``).

A handler is a method of its family's class (one module per family in this package); the
daemon builds each family once with its collaborators and :func:`bind` turns the rows into
the server's :class:`~infernod.daemon.server.Route` s.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from infernod.daemon.handlers.config import ConfigHandlers
from infernod.daemon.handlers.inference import InferenceHandlers
from infernod.daemon.handlers.jobs import JobHandlers
from infernod.daemon.handlers.models import ModelHandlers
from infernod.daemon.handlers.queue import QueueHandlers
from infernod.daemon.handlers.session import SessionHandlers
from infernod.daemon.handlers.streams import StreamHandlers
from infernod.daemon.handlers.telemetry import TelemetryHandlers
from infernod.daemon.pulls import Pulls
from infernod.daemon.server import ROLES, Call, Handler, Route
from infernod.daemon.uploads import Uploads
from infernod.protocol.messages import SCHEMAS, F

Method = Callable[[Any, Call], Awaitable[dict[str, Any]]]  # unbound: (family, request)


@dataclass(frozen=True)
class Row:
    role: str  # the minimum role
    method: Method  # a handler family's method


# cancel, stream.fetch and jobs.get/list/cancel: a monitor acts on its own requests, streams
# and jobs only; the handler checks the owner, and an operator may act on anyone's.
TABLE: dict[str, Row] = {
    # request type          minimum role  handler              (schema: SCHEMAS[request type])
    "hello":                Row("monitor",  SessionHandlers.hello),
    "ping":                 Row("monitor",  SessionHandlers.ping),
    "status":               Row("monitor",  SessionHandlers.status),
    "config.get":           Row("monitor",  ConfigHandlers.get),
    "models.list":          Row("monitor",  ModelHandlers.list),
    "models.show":          Row("monitor",  ModelHandlers.show),
    "models.load":          Row("operator", ModelHandlers.load),
    "models.unload":        Row("operator", ModelHandlers.unload),
    "models.import":        Row("operator", ModelHandlers.import_),
    "models.remove":        Row("operator", ModelHandlers.remove),
    "models.set":           Row("operator", ModelHandlers.set),
    "models.unset":         Row("operator", ModelHandlers.unset),
    "models.upload.begin":  Row("operator", Uploads.begin),
    "models.upload.chunk":  Row("operator", Uploads.chunk),
    "models.upload.finish": Row("operator", Uploads.finish),
    "models.upload.abort":  Row("operator", Uploads.abort),
    "models.pull":          Row("operator", Pulls.pull),
    "models.pull.cancel":   Row("operator", Pulls.cancel),
    "models.pulls":         Row("monitor",  Pulls.list),
    "generate":             Row("user",     InferenceHandlers.generate),
    "embed":                Row("user",     InferenceHandlers.embed),
    "infer":                Row("user",     InferenceHandlers.infer),
    "cancel":               Row("monitor",  InferenceHandlers.cancel),
    "stream.fetch":         Row("monitor",  StreamHandlers.fetch),
    "queue.list":           Row("monitor",  QueueHandlers.list),
    "reprioritize":         Row("operator", QueueHandlers.reprioritize),
    "jobs.submit":          Row("user",     JobHandlers.submit),
    "jobs.get":             Row("monitor",  JobHandlers.get),
    "jobs.list":            Row("monitor",  JobHandlers.list),
    "jobs.cancel":          Row("monitor",  JobHandlers.cancel),
    "stats":                Row("monitor",  TelemetryHandlers.stats),
    "profiles.recent":      Row("monitor",  TelemetryHandlers.profiles_recent),
    "metrics.get":          Row("monitor",  TelemetryHandlers.metrics_get),
}  # fmt: skip


def schema_of(type_: str) -> dict[str, F]:
    return SCHEMAS[type_]


def bind(families: Iterable[object]) -> dict[str, Route]:
    """The server's routes: each row's method bound to the one instance of its family."""
    if set(TABLE) != set(SCHEMAS):  # a request with no handler, or a handler with no schema
        raise ValueError(f"handler table and protocol schemas differ: "
                         f"{sorted(set(TABLE) ^ set(SCHEMAS))}")
    by_class = {type(f).__name__: f for f in families}
    routes: dict[str, Route] = {}
    for type_, row in TABLE.items():
        if row.role not in ROLES:
            raise ValueError(f"{type_}: unknown role {row.role!r}")
        family = row.method.__qualname__.split(".")[0]
        instance = by_class.get(family)
        if instance is None:
            raise ValueError(f"{type_}: no {family} given to bind()")
        handler = cast(Handler, types.MethodType(row.method, instance))
        routes[type_] = Route(row.role, schema_of(type_), handler)
    return routes

"""``hello``, ``ping``, ``status``: the daemon itself, as a client sees it."""

from __future__ import annotations

import time
from typing import Any, Protocol

from infernod import __version__
from infernod.config import Config
from infernod.daemon.auth import Security
from infernod.daemon.server import Call, Route
from infernod.protocol.codec import PROTOCOL_VERSION


class DaemonFacts(Protocol):
    """What these handlers read from the daemon (``InfernoDaemon``)."""

    boot_id: str
    cfg: Config
    routes: dict[str, Route]
    security: Security

    def status_report(self) -> dict[str, Any]: ...


class SessionHandlers:
    def __init__(self, daemon: DaemonFacts) -> None:
        self.daemon = daemon

    async def hello(self, req: Call) -> dict[str, Any]:
        d = self.daemon
        return {"protocol": PROTOCOL_VERSION, "server": "infernod", "version": __version__,
                "boot_id": d.boot_id, "role": req.role, "session": req.session,
                "capabilities": sorted(d.routes),
                "heartbeat_interval_s": d.cfg.daemon.heartbeat_interval_s,
                "max_message_bytes": d.cfg.daemon.max_message_bytes,
                "principal": req.principal, "api_keys": d.security.api_keys.count()}

    async def ping(self, req: Call) -> dict[str, Any]:
        return {"pong": True, "ts": time.time()}

    async def status(self, req: Call) -> dict[str, Any]:
        return self.daemon.status_report()

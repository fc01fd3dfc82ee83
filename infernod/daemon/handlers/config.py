"""``config.get``: the daemon's effective configuration, whole or one dotted key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infernod import config as config_mod
from infernod.config import Config
from infernod.daemon.server import Call
from infernod.protocol.errors import InfernoError


class ConfigHandlers:
    def __init__(self, cfg: Callable[[], Config]) -> None:
        self.cfg = cfg  # read per request: SIGHUP replaces the daemon's config

    async def get(self, req: Call) -> dict[str, Any]:
        cfg = self.cfg()
        key = req.body.get("key")
        if key:
            try:
                return {"key": key, "value": config_mod.get_key(cfg, key)}
            except config_mod.ConfigError as e:
                raise InfernoError("bad_request", str(e)) from e
        return {"config": cfg.to_dict(), "source": cfg.source}

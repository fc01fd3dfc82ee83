"""``stats``, ``profiles.recent``, ``metrics.get``: what the telemetry service has measured."""

from __future__ import annotations

from typing import Any

from infernod.daemon.server import Call
from infernod.telemetry.service import TelemetryService

DEFAULT_RECENT = 20  # profiles.recent without ``n``


class TelemetryHandlers:
    def __init__(self, telemetry: TelemetryService) -> None:
        self.telemetry = telemetry

    async def stats(self, req: Call) -> dict[str, Any]:
        return await self.telemetry.stats_summary_async()

    async def profiles_recent(self, req: Call) -> dict[str, Any]:
        return self.telemetry.recent(req.body.get("n") or DEFAULT_RECENT)

    async def metrics_get(self, req: Call) -> dict[str, Any]:
        t = self.telemetry
        return {"sample": t.latest(), "sample_hz": t.sampler.rate_hz if t.sampler else None,
                "prometheus_port": t.exporter.port if t.exporter else 0}

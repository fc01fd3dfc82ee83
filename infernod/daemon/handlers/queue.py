"""``queue.list`` and ``reprioritize``: the waiting and running work, as the scheduler sees it."""

from __future__ import annotations

import time
from typing import Any

from infernod.daemon.queue import QueueService
from infernod.daemon.scheduler import Scheduler
from infernod.daemon.server import Call


class QueueHandlers:
    def __init__(self, queue: QueueService, scheduler: Scheduler) -> None:
        self.queue = queue
        self.scheduler = scheduler

    async def list(self, req: Call) -> dict[str, Any]:
        rows = self.queue.snapshot(time.monotonic(), req.body.get("model"))
        return {"items": rows, "running": sum(r["state"] == "running" for r in rows),
                "waiting": sum(r["state"] == "queued" for r in rows),
                "level": self.scheduler.level()}

    async def reprioritize(self, req: Call) -> dict[str, Any]:
        rid, priority = req.body["request_id"], req.body["priority"]
        state = self.queue.reprioritize(rid, priority, time.monotonic())
        return {"request_id": rid, "priority": priority, "state": state}

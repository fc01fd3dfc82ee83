"""``queue.list`` and ``reprioritize``: the waiting and running work, as the scheduler sees it."""

from __future__ import annotations

import time
from typing import Any

from infernod.daemon.queue import QueueService
from infernod.daemon.scheduler import Scheduler
from infernod.daemon.server import Call
from infernod.protocol.bodies import to_wire


class QueueHandlers:
    def __init__(self, queue: QueueService, scheduler: Scheduler) -> None:
        self.queue = queue
        self.scheduler = scheduler

    async def list(self, req: Call) -> dict[str, Any]:
        return to_wire(self.queue.snapshot(time.monotonic(), req.body.get("model")))

    async def reprioritize(self, req: Call) -> dict[str, Any]:
        rid, priority = req.body["request_id"], req.body["priority"]
        state = self.queue.reprioritize(rid, priority, time.monotonic())
        return {"request_id": rid, "priority": priority, "state": state}

"""The model registry as requests see it: wait for the first scan, rescan only as fresh as
the caller's role may ask for, share one scan among everyone who arrives while it runs.

The registry itself (``infernod.daemon.registry``) is blocking and knows nothing of roles or
the event loop; this object is the loop-side gate in front of it.
"""

from __future__ import annotations

import asyncio
import time

from infernod.backends.gguf_meta import ModelInfo
from infernod.daemon.registry import Registry
from infernod.daemon.server import Call
from infernod.protocol.errors import InfernoError

MONITOR_SCAN_AGE_S = 30.0  # a non-operator's models.list/show reuses a scan this recent
FIRST_SCAN_WAIT_S = 60.0  # how long a request waits for the daemon's first scan


class ModelCatalog:
    """Owned by the event loop. ``scanned`` is set once the first scan (and on a first start
    the default model's assembly) has finished: requests that name a model wait for it."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.scanned = asyncio.Event()
        self.scans = 0  # registry scans done (status: model_scans)
        self._scan_started_at = float("-inf")  # start of the newest finished scan
        self._scan_task: asyncio.Task[None] | None = None

    async def wait_scanned(self) -> None:
        await asyncio.wait_for(self.scanned.wait(), FIRST_SCAN_WAIT_S)

    async def lookup(self, name: str, req: Call | None = None) -> ModelInfo:
        """The model's info. For an operator a file dropped into a model dir before the
        request arrived is found (a rescan); others see the newest scan (see ``scan_for``)."""
        await self.wait_scanned()
        try:
            return self.registry.get(name)
        except InfernoError as e:
            if e.code not in ("unknown_model", "not_supported"):  # not_supported: skipped file
                raise
        await self.scan_for(req)
        return self.registry.get(name)

    async def scan_for(self, req: Call | None) -> None:
        """Rescan the model directories as fresh as ``req``'s role may ask for: an operator's
        request sees the directories as they were when it arrived; anyone else's (monitors
        listing models or naming unknown ones) reuses a scan up to MONITOR_SCAN_AGE_S old,
        so a flood of monitor requests costs at most one scan per that interval."""
        if req is None or req.role == "operator":
            await self.rescan(req.received if req is not None else time.monotonic())
        else:
            await self.rescan(time.monotonic() - MONITOR_SCAN_AGE_S)

    async def rescan(self, not_before: float) -> None:
        """Return once a scan that started at or after ``not_before`` (monotonic) finished.
        One scan runs at a time; every caller that arrives while it runs shares the next."""
        while self._scan_started_at < not_before:
            task = self._scan_task
            if task is None or task.done():
                started = time.monotonic()
                task = self._scan_task = asyncio.get_running_loop().create_task(
                    self._scan(started))
            await asyncio.shield(task)

    async def _scan(self, started: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.registry.scan)
        self.scans += 1
        self._scan_started_at = max(self._scan_started_at, started)

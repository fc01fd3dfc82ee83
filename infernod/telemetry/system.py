"""Host and daemon-process readings through psutil.

Kept apart from NVML so a machine without a GPU still gets full CPU/RAM telemetry, and so the
sampler can be tested without either. Percentages from psutil are deltas since the previous
call, so the reader primes them once at construction: the first real sample is meaningful.
"""

from __future__ import annotations

import logging
import os
import time

import psutil

from infernod.protocol.bodies import ProcessSample, SystemSample

log = logging.getLogger(__name__)


class SystemReader:
    """Reads CPU, load, RAM, swap and the daemon process (``pid``, default: this process)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._proc = psutil.Process(self.pid)
        self._proc_started = self._proc.create_time()
        # Prime the delta-based percentages (the first call always answers 0.0).
        psutil.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None, percpu=True)
        self._proc.cpu_percent(interval=None)

    def sample(self) -> SystemSample:
        """One reading. Never raises: a value psutil cannot read here becomes ``None``.

        ``{"cpu_pct", "cpu_per_core_pct": [..], "cpu_count", "load_avg": [1m, 5m, 15m],
        "memory_total_bytes", "memory_used_bytes", "memory_available_bytes", "memory_pct",
        "swap_total_bytes", "swap_used_bytes", "swap_pct", "boot_uptime_s",
        "process": {"pid", "rss_bytes", "cpu_pct", "threads", "open_fds", "uptime_s"}}``
        """
        now = time.time()
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        try:
            load: list[float] | None = [float(x) for x in os.getloadavg()]
        except OSError:
            load = None
        return {
            "cpu_pct": float(psutil.cpu_percent(interval=None)),
            "cpu_per_core_pct": [float(x) for x in psutil.cpu_percent(interval=None, percpu=True)],
            "cpu_count": psutil.cpu_count(logical=True),
            "load_avg": load,
            "memory_total_bytes": int(vm.total),
            "memory_used_bytes": int(vm.used),
            "memory_available_bytes": int(vm.available),
            "memory_pct": float(vm.percent),
            "swap_total_bytes": int(sw.total),
            "swap_used_bytes": int(sw.used),
            "swap_pct": float(sw.percent),
            "boot_uptime_s": now - psutil.boot_time(),
            "process": self._process(now),
        }

    def _process(self, now: float) -> ProcessSample:
        p = self._proc
        out: ProcessSample = {
            "pid": self.pid,
            "rss_bytes": None,
            "cpu_pct": None,
            "threads": None,
            "open_fds": None,
            "uptime_s": now - self._proc_started,
        }
        try:
            with p.oneshot():
                out["rss_bytes"] = int(p.memory_info().rss)
                out["cpu_pct"] = float(p.cpu_percent(interval=None))
                out["threads"] = int(p.num_threads())
                out["open_fds"] = int(p.num_fds()) if hasattr(p, "num_fds") else None
        except (psutil.Error, OSError) as e:
            log.debug("process %d: %s", self.pid, e)
        return out

    def rss_bytes(self) -> int | None:
        """The daemon's resident set size now (the profiler reads it at request start/end)."""
        try:
            return int(self._proc.memory_info().rss)
        except (psutil.Error, OSError):
            return None

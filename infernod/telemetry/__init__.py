"""Hardware telemetry, request profiles and in-daemon latency statistics.

Nothing here touches a socket: the sampler runs in its own thread and hands samples to a
callback, the statistics are plain objects with time passed in. ``nvml.py`` is the only module
that calls ``pynvml``; importing this package does not import it.
"""

from __future__ import annotations

from infernod.telemetry.nvml import NvmlReader
from infernod.telemetry.profiler import Profiler, RequestProfile
from infernod.telemetry.sampler import TelemetrySampler
from infernod.telemetry.stats import LatencyStats
from infernod.telemetry.system import SystemReader

__all__ = [
    "LatencyStats",
    "NvmlReader",
    "Profiler",
    "RequestProfile",
    "SystemReader",
    "TelemetrySampler",
]

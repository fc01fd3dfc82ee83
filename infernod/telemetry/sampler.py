"""The telemetry sampler thread: psutil + NVML at a fixed rate, handed to a callback.

Why a thread of its own: NVML calls block (tens of ms on a busy driver) and must never stall
the event loop. The thread only reads and calls ``on_sample``; the server forwards each sample
to the loop with ``loop.call_soon_threadsafe`` and publishes it on the ``metrics`` topic.

Scheduling is drift-free: tick *k* is due at ``start + k / rate_hz`` on the monotonic clock, so
a slow read shortens the next wait instead of shifting every later sample; ticks missed by
more than one period are skipped rather than fired in a burst. Waits use ``Event.wait`` with a
timeout, so :meth:`TelemetrySampler.stop` returns within one wait.

The sampler also integrates GPU power over time (trapezoid rule) into per-GPU energy counters
(joules), so the profiler can compute a request's energy as the difference of two readings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from infernod.protocol.bodies import GpuSample, MetricsSample, SystemSample
from infernod.telemetry.nvml import NvmlReader
from infernod.telemetry.system import SystemReader

log = logging.getLogger(__name__)

MIN_RATE_HZ = 0.1
MAX_RATE_HZ = 20.0


class TelemetrySampler:
    """Samples system and GPU telemetry in a daemon thread and calls ``on_sample(sample)``.

    Sample: ``{"ts": wall-clock seconds, "system": SystemReader.sample(),
    "gpu": NvmlReader.sample(), "energy_j": {str(gpu_index): joules since start}}`` (string keys: msgpack
    decoders refuse integer map keys by default).
    Readers passed in belong to the caller; readers the sampler creates are closed by
    :meth:`stop`.
    """

    def __init__(
        self,
        rate_hz: float = 2.0,
        on_sample: Callable[[MetricsSample], None] | None = None,
        nvml: NvmlReader | None = None,
        system: SystemReader | None = None,
    ) -> None:
        if not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
            raise ValueError(
                f"rate_hz must be within [{MIN_RATE_HZ}, {MAX_RATE_HZ}], got {rate_hz}"
            )
        self.rate_hz = float(rate_hz)
        self.period_s = 1.0 / self.rate_hz
        self._on_sample = on_sample
        self._owns_nvml = nvml is None
        self._owns_system = system is None
        self.nvml = nvml if nvml is not None else NvmlReader()
        self.system = system if system is not None else SystemReader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._latest: MetricsSample | None = None
        self._energy_j: dict[int, float] = {}
        self._last_power: dict[int, tuple[float, float]] = {}  # gpu -> (clock s, watts)
        self._callback_failed = False
        self.samples_taken = 0
        self.ticks_skipped = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the thread (idempotent while running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread; True when it ended within ``timeout`` seconds. Closes own readers."""
        self._stop.set()
        thread = self._thread
        stopped = True
        if thread is not None:
            thread.join(timeout)
            stopped = not thread.is_alive()
            if not stopped:
                log.warning("telemetry sampler did not stop within %.1f s", timeout)
        if stopped:
            self._thread = None
            if self._owns_nvml:
                self.nvml.close()
        return stopped

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_rate(self, rate_hz: float) -> None:
        """Change the rate (config reload); the running thread uses it from its next tick."""
        if not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
            raise ValueError(
                f"rate_hz must be within [{MIN_RATE_HZ}, {MAX_RATE_HZ}], got {rate_hz}"
            )
        self.rate_hz = float(rate_hz)
        self.period_s = 1.0 / self.rate_hz

    def _run(self) -> None:
        next_due = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            period = self.period_s
            next_due += period
            now = time.monotonic()
            if now - next_due > period:  # fell behind by more than a tick: skip, don't burst
                missed = int((now - next_due) // period)
                self.ticks_skipped += missed
                next_due += missed * period
            self._stop.wait(max(0.0, next_due - now))

    # ----------------------------------------------------------------- sampling
    def sample_once(self, now: float | None = None) -> MetricsSample:
        """Take one sample, update energy counters, publish it and return it.

        ``now`` (tests, replays) is used both as the sample's ``ts`` and as the clock for the
        energy integral; by default ``ts`` is ``time.time()`` and the integral uses the
        monotonic clock. Do not mix the two within one sampler.
        """
        ts = time.time() if now is None else now
        clock = time.monotonic() if now is None else now
        try:
            system = self.system.sample()
        except Exception as e:  # psutil on an exotic platform: keep the GPU half alive
            log.warning("system telemetry failed: %s", e)
            system = cast(SystemSample, {})  # readers' parsers fill it in (bodies.py)
        gpu = self.nvml.sample()
        energy = self._integrate(gpu, clock)
        # nvml.py builds the GPU half field by field (see bodies.GpuSample; the NVML trace
        # test in tests/test_bodies.py checks it)
        sample: MetricsSample = {"ts": ts, "system": system, "gpu": cast(GpuSample, gpu),
                                 "energy_j": energy}
        with self._lock:
            self._latest = sample
            self.samples_taken += 1
        if self._on_sample is not None:
            try:
                self._on_sample(sample)
            except Exception:
                if not self._callback_failed:  # once: a broken callback must not flood the log
                    self._callback_failed = True
                    log.exception("telemetry on_sample callback failed (further failures at debug)")
                else:
                    log.debug("telemetry on_sample callback failed again", exc_info=True)
        return sample

    def _integrate(self, gpu: dict[str, Any], clock: float) -> dict[str, float]:
        """Trapezoid rule over consecutive power readings; a missing reading breaks the chain
        (no energy is invented across a gap in the data)."""
        with self._lock:
            for g in gpu.get("gpus", []):
                index = int(g["index"])
                watts = g.get("power_w")
                if watts is None:
                    self._last_power.pop(index, None)
                    continue
                self._energy_j.setdefault(index, 0.0)
                prev = self._last_power.get(index)
                if prev is not None and clock > prev[0]:
                    self._energy_j[index] += 0.5 * (prev[1] + watts) * (clock - prev[0])
                self._last_power[index] = (clock, float(watts))
            return {str(i): j for i, j in self._energy_j.items()}

    # ----------------------------------------------------------------- readers
    def latest(self) -> MetricsSample | None:
        """The last sample (None before the first), e.g. for a new ``metrics`` subscriber."""
        with self._lock:
            return self._latest

    def energy_j(self, gpu_index: int | None = None) -> float | None:
        """Cumulative energy in joules since the sampler started, for one GPU or (None) all.

        None when no power reading exists (no NVML, or the GPU does not report power).
        A request's energy is ``energy_j()`` at its end minus at its start.
        """
        with self._lock:
            if gpu_index is None:
                return sum(self._energy_j.values()) if self._energy_j else None
            return self._energy_j.get(gpu_index)

    def rss_bytes(self) -> int | None:
        """The daemon's RSS in the latest sample: read by this thread, not by the caller."""
        sample = self.latest()
        if sample is None:
            return None
        return (sample.get("system") or {}).get("process", {}).get("rss_bytes")

    def gpu_memory_used_bytes(self) -> int | None:
        """Sum of ``memory_used_bytes`` over GPUs in the latest sample (None without NVML)."""
        sample = self.latest()
        if sample is None:
            return None
        used = [g["memory_used_bytes"] for g in sample["gpu"]["gpus"]]
        known = [u for u in used if u is not None]
        return sum(known) if known else None

"""Telemetry wired into the daemon: sampler thread, request profiles, statistics, exporter.

The parts themselves live in ``infernod/telemetry/`` and do no socket I/O; this module owns
their lifecycle and connects them to the event loop:

* ``TelemetrySampler`` runs in its own thread; each sample hops onto the loop with
  ``call_soon_threadsafe`` and is published on ``metrics`` (a state topic: the publisher
  keeps the last value for welcomes).
* ``RequestService`` calls :meth:`TelemetryService.on_run_start` when an engine starts a
  request and :meth:`TelemetryService.on_profile` when it ends; the profile goes into the
  ``Profiler`` ring and ``LatencyStats`` and out on ``profiles``.
* A loop task publishes the statistics summary on ``stats`` every
  ``telemetry.stats_interval_s``.
* With ``telemetry.prometheus_port`` > 0 the Prometheus exporter serves the same figures on
  127.0.0.1 from its own thread.

Everything here runs on the event loop except the sampler and exporter threads, which only
read thread-safe objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from infernod.config import Config
from infernod.protocol.bodies import MetricsSample, to_wire
from infernod.telemetry.profiler import Profiler, RequestProfile
from infernod.telemetry.sampler import MAX_RATE_HZ, MIN_RATE_HZ, TelemetrySampler
from infernod.telemetry.stats import LatencyStats

if TYPE_CHECKING:
    from infernod.daemon.publisher import Publisher
    from infernod.daemon.requests import Request
    from infernod.telemetry.prometheus import PrometheusExporter

log = logging.getLogger("infernod.telemetry")

def _rate(hz: float) -> float:
    clamped = min(max(hz, MIN_RATE_HZ), MAX_RATE_HZ)
    if clamped != hz:
        log.warning("telemetry.sample_hz %.3g is outside the sampler's %.1f..%.0f Hz; using %.3g",
                    hz, MIN_RATE_HZ, MAX_RATE_HZ, clamped)
    return clamped


class TelemetryService:
    def __init__(self, cfg: Config, publisher: Publisher, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.loop = loop
        t = cfg.telemetry
        self.profiler = Profiler(ring_size=t.profile_ring,
                                 stats=LatencyStats(anomaly_factor=t.anomaly_factor))
        self.sampler: TelemetrySampler | None = None
        self.exporter: PrometheusExporter | None = None
        self._starts: dict[str, dict[str, Any]] = {}  # request id -> readings at run start
        self._closed = False
        # The statistics' costly work, off the event loop (whose every reply it would hold
        # up), in one thread: a summary sees every profile recorded before it was asked for.
        self._stats_worker = ThreadPoolExecutor(1, thread_name_prefix="infernod-stats")

    def runs_open(self) -> int:
        """Requests whose run-start readings wait for their end (one per running request)."""
        return len(self._starts)

    @property
    def stats(self) -> LatencyStats:
        return self.profiler.stats

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Open NVML and psutil (blocking: in the executor), start the sampler and exporter."""
        hz = _rate(self.cfg.telemetry.sample_hz)
        self.sampler = await self.loop.run_in_executor(
            None, lambda: TelemetrySampler(rate_hz=hz, on_sample=self._from_thread))
        gpu = self.sampler.nvml
        log.info("telemetry: sampling at %.3g Hz; GPU %s", hz,
                 f"{gpu.gpu_count} device(s)" if gpu.available else f"off ({gpu.reason})")
        self.sampler.start()
        port = self.cfg.telemetry.prometheus_port
        if port > 0:
            from infernod.telemetry.prometheus import start_exporter

            try:
                self.exporter = start_exporter(port, self._latest_wire,
                                               self._summary_after_records)
            except OSError as e:  # port taken: inference matters more than the exporter
                log.error("Prometheus exporter not started on 127.0.0.1:%d: %s", port, e)

    async def run_stats_loop(self) -> None:
        """Publish the statistics summary every ``telemetry.stats_interval_s``. It is built
        in the statistics' thread (LatencyStats is thread-safe): with a few models and
        priorities it takes ~20 ms of CPU, a stall of the loop (and of every reply) that
        long; from a thread, the loop takes the GIL back within the switch interval."""
        while True:
            await asyncio.sleep(self.cfg.telemetry.stats_interval_s)
            self.publisher.publish("stats", "stats", await self.stats_summary_async())

    async def close(self) -> None:
        self._closed = True
        if self.exporter is not None:
            exporter, self.exporter = self.exporter, None
            await self.loop.run_in_executor(None, exporter.close)
        if self.sampler is not None:
            await self.loop.run_in_executor(None, self.sampler.stop)
        self._stats_worker.shutdown(wait=False, cancel_futures=True)

    def apply_config(self, cfg: Config) -> None:
        """SIGHUP: stats interval and anomaly factor apply at once; the sample rate from the
        next tick. (profile_ring and prometheus_port need a restart.)"""
        self.cfg = cfg
        self.stats.anomaly_factor = cfg.telemetry.anomaly_factor
        if self.sampler is not None:
            self.sampler.set_rate(_rate(cfg.telemetry.sample_hz))

    # -- samples ----------------------------------------------------------------------------
    def _from_thread(self, sample: MetricsSample) -> None:
        """Sampler thread: hand the sample to the loop, never touch the socket here."""
        if not self._closed and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._publish_sample, sample)

    def _publish_sample(self, sample: MetricsSample) -> None:
        if not self._closed:
            self.publisher.publish("metrics", "metrics", to_wire(sample))

    def _latest_wire(self) -> dict[str, Any] | None:
        sample = self.latest()
        return None if sample is None else to_wire(sample)

    def latest(self) -> MetricsSample | None:
        return self.sampler.latest() if self.sampler is not None else None

    # -- profiles ---------------------------------------------------------------------------
    def _readings(self) -> dict[str, Any]:
        """From the latest sample (at most 1/sample_hz old): the event loop reads no /proc
        or NVML itself at every request start and end."""
        s = self.sampler
        if s is None:
            return {"rss": None, "gpu_mem": None, "energy": None}
        return {"rss": s.rss_bytes(), "gpu_mem": s.gpu_memory_used_bytes(),
                "energy": s.energy_j()}

    def on_run_start(self, gen: Request) -> None:
        """An engine started the request (called again when a preempted one resumes: the
        first start counts)."""
        if gen.request_id not in self._starts:
            self._starts[gen.request_id] = self._readings()

    def on_profile(self, gen: Request, reason: str, final: dict[str, Any]) -> None:
        """A generation finished, however it ended: profile it, keep it, publish it."""
        now = time.monotonic()
        start = self._starts.pop(gen.request_id, None)
        end = self._readings() if start is not None else None
        profile = build_profile(gen, reason, final, start, end, now)
        if not gen.itl_gaps_ms and isinstance(final.get("itl_ms"), dict) \
                and final["itl_ms"].get("mean") is not None:
            profile.itl_ms = dict(final["itl_ms"])  # an engine without raw gaps: its summary
        gaps = gen.itl_gaps_ms or None
        self.profiler.keep(profile, gaps)  # profiles.recent has it once the done event is out
        self._stats_worker.submit(self.profiler.record, profile, now, gaps)
        self.publisher.publish("profiles", "profile", to_wire(profile.to_dict()))

    # -- queries ----------------------------------------------------------------------------
    def stats_summary(self) -> dict[str, Any]:
        return self.stats.summary(time.monotonic())

    def _summary_after_records(self) -> dict[str, Any]:
        """``stats_summary`` for another thread (the Prometheus exporter's): built after the
        profiles recorded before it, as the ``stats`` request's is."""
        try:
            return self._stats_worker.submit(self.stats_summary).result(timeout=30)
        except RuntimeError:  # the worker was shut down: the daemon is stopping
            return self.stats_summary()

    async def stats_summary_async(self) -> dict[str, Any]:
        """``stats_summary`` built in the statistics' thread, off the event loop, after the
        profiles recorded before it."""
        return await self.loop.run_in_executor(self._stats_worker, self.stats_summary)

    def recent(self, n: int) -> dict[str, Any]:
        return {"profiles": [p.to_dict() for p in self.profiler.recent(n)],
                "ring_size": self.profiler.ring_size,
                "finished_total": self.profiler.finished_total}


def _ms(x: Any) -> float | None:
    return None if x is None else round(float(x), 3)


def build_profile(gen: Request, reason: str, final: dict[str, Any], start: dict[str, Any] | None,
                  end: dict[str, Any] | None, now: float) -> RequestProfile:
    """A :class:`RequestProfile` from the generation, its final stats and the resource
    readings at run start and end (None when it never ran). Pure: ``now`` is monotonic."""
    ttft = None if gen.first_token_at is None else (gen.first_token_at - gen.submitted) * 1000
    energy = None
    if start is not None and end is not None and None not in (start["energy"], end["energy"]):
        energy = round(end["energy"] - start["energy"], 3)
    wall_now = time.time()
    return RequestProfile(
        request_id=gen.request_id,
        client=gen.client or gen.session,
        model=gen.model,
        priority=gen.priority,
        queue_wait_ms=_ms(final.get("queue_wait_ms")),
        load_wait_ms=_ms(final.get("load_wait_ms")),
        tokenize_ms=_ms(final.get("tokenize_ms")),
        prefill_ms=_ms(final.get("prefill_ms")),
        decode_ms=_ms(final.get("decode_ms")),
        detokenize_ms=_ms(final.get("detokenize_ms")),
        ttft_ms=_ms(ttft),
        e2e_ms=_ms(final.get("total_ms")),
        prompt_tokens=int(final.get("prompt_tokens") or 0),
        prompt_cached_tokens=int(final.get("prompt_cached_tokens") or 0),
        completion_tokens=int(final.get("completion_tokens") or 0),
        tokens_per_s=final.get("tokens_per_s"),
        finish_reason=reason,
        rss_bytes_start=None if start is None else start["rss"],
        rss_bytes_end=None if end is None else end["rss"],
        gpu_memory_bytes_start=None if start is None else start["gpu_mem"],
        gpu_memory_bytes_end=None if end is None else end["gpu_mem"],
        energy_j=energy,
        started_at=wall_now - (now - gen.submitted),
        finished_at=wall_now,
    )

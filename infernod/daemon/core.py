"""InfernoDaemon: the server core wired to the registry, models, scheduler and streams.

It builds the daemon's parts, hands them to the request handlers (one family per module in
``infernod.daemon.handlers``, one table of request type -> role, schema, handler), and runs
the background work: startup scan and preloads, the 4 Hz tick, leases, draining.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from infernod import __version__
from infernod import config as config_mod
from infernod.backends.cpu_features import CpuSupport, probe_build
from infernod.daemon import pulls, uploads
from infernod.daemon.catalog import ModelCatalog
from infernod.daemon.handlers import table
from infernod.daemon.handlers.config import ConfigHandlers
from infernod.daemon.handlers.inference import InferenceHandlers
from infernod.daemon.handlers.jobs import JobHandlers
from infernod.daemon.handlers.models import ModelHandlers
from infernod.daemon.handlers.queue import QueueHandlers
from infernod.daemon.handlers.session import SessionHandlers
from infernod.daemon.handlers.streams import StreamHandlers
from infernod.daemon.handlers.telemetry import TelemetryHandlers
from infernod.daemon.jobs import JobService
from infernod.daemon.lifecycle import RequestService
from infernod.daemon.models import ModelManager
from infernod.daemon.queue import QueueService
from infernod.daemon.registry import Registry
from infernod.daemon.requests import RequestTable
from infernod.daemon.scheduler import Scheduler
from infernod.daemon.server import Call, Daemon, Route
from infernod.model_settings import SettingsStore
from infernod.paths import JOBS_DB, MODEL_SETTINGS, private_dir
from infernod.protocol.errors import InfernoError
from infernod.runner.supervisor import RunnerSupervisor
from infernod.telemetry.service import TelemetryService

log = logging.getLogger("infernod")


class InfernoDaemon(Daemon):
    async def start(self) -> None:
        await super().start()
        self.loop = loop = asyncio.get_running_loop()
        private_dir(self.state_dir)  # jobs' prompts and outputs, keys: the daemon's only
        s = self.cfg.scheduler
        self.scheduler = Scheduler(max_queue_per_model=s.max_queue_per_model,
                                   max_queue_total=s.max_queue_total,
                                   aging_interval_s=s.aging_interval_s,
                                   deadline_critical_s=s.deadline_critical_s,
                                   deadline_urgent_s=s.deadline_urgent_s,
                                   max_queued_per_owner=s.max_queued_per_principal)
        dirs = [self.state_dir / "models", *(p for p in map(_path, self.cfg.models.dirs))]
        (self.state_dir / "models").mkdir(parents=True, exist_ok=True)
        self.registry = Registry(dirs, self.state_dir,
                                 import_dirs=[_path(p) for p in self.cfg.models.import_dirs])
        self.catalog = ModelCatalog(self.registry)
        self.runners = RunnerSupervisor(self.runtime_dir, self.cfg.daemon.log_level,
                                        gpu_bytes=self._runner_gpu_bytes)
        self.runners.bind()
        self.telemetry = TelemetryService(self.cfg, self.publisher, loop)
        self.models = ModelManager(self.cfg, self.registry, publish=self.publisher.publish,
                                   notifier=self.notifier, runners=self.runners,
                                   scheduler=self.scheduler,
                                   settings=SettingsStore(self.state_dir / MODEL_SETTINGS),
                                   gpu_sample=self.telemetry.latest)
        # every live request of every kind, from admission to its last event
        self.requests = RequestTable(self.scheduler, self.publisher.publish)
        # one lifecycle for every kind; it attaches itself to the models (their runners'
        # events, unloads and crashes go to it)
        self.service = RequestService(self.cfg, self.models, self.scheduler, self.publisher,
                                      self.requests, on_profile=self.telemetry.on_profile,
                                      on_run_start=self.telemetry.on_run_start)
        self.queue = QueueService(self.service, self.scheduler, self.models, self.publisher,
                                  self.requests)
        self.jobs = JobService(self.state_dir / JOBS_DB, self.service, self.publisher,
                               self.cfg, self._render_user_prompt)
        # (principal, session) -> last request: a session id is public (queue.list) and
        # anyone may write it in a header, so it only means something with its principal.
        self.last_seen: dict[tuple[str, str], float] = {}
        self.backend_info: dict[str, Any] = {}
        self.cpu_support: CpuSupport | None = None
        self.uploads = uploads.Uploads(self.registry, self.cfg.daemon.max_message_bytes,
                                       self.publisher.publish,
                                       lambda name: self.models.models_event("imported", name))
        self.pulls = pulls.Pulls(self.registry, self.publisher.publish,
                                 self.models.models_event)
        self.serve_routes(self._routes())
        self.spawn(uploads.maintain(self.uploads), "uploads")
        self.spawn(pulls.maintain(self.pulls), "pulls")
        self.spawn(self.runners.serve(), "runners")
        self.spawn(self._tick_loop(), "tick")
        self.spawn(self._startup_models(), "startup-models")
        self.spawn(self._start_jobs(), "jobs-start")
        self.spawn(self.telemetry.run_stats_loop(), "stats")
        await self.telemetry.start()

    async def _start_jobs(self) -> None:
        await self.catalog.scanned.wait()  # recovered items name models: the registry must know them
        await self.jobs.start()

    def _runner_gpu_bytes(self, pid: int) -> int | None:
        """GPU memory NVML attributes to process ``pid`` in the telemetry's latest sample
        (None without NVML, or when no GPU lists the process)."""
        sample = self.telemetry.latest() if hasattr(self, "telemetry") else None
        if sample is None:
            return None
        used = [p["used_memory_bytes"] for g in sample["gpu"]["gpus"]
                for p in g["processes"] if p["pid"] == pid]
        known = [u for u in used if isinstance(u, int)]
        return sum(known) if known else None

    def _render_user_prompt(self, model: str, text: str) -> str:
        return self.models.render_chat(self.registry.get(model),
                                       [{"role": "user", "content": text}])[0]

    async def _startup_models(self) -> None:
        loop = asyncio.get_running_loop()
        # llama.cpp is probed in a child process first: a build this CPU cannot run kills
        # the child, and GGUF loads are refused with the reason instead of killing us.
        self.cpu_support = await loop.run_in_executor(None, probe_build)
        self.models.cpu_support = self.cpu_support
        self.backend_info = {"llama_cpp_python": self.cpu_support.llama_cpp_python,
                             "gpu_offload_supported": self.cpu_support.gpu_offload_supported}
        if not self.cpu_support.ok:
            log.error("GGUF models disabled: %s (%s)", self.cpu_support.reason(),
                      self.cpu_support.hint())
        else:
            log.info("llama.cpp built for %s; this CPU also has %s",
                     " ".join(sorted(self.cpu_support.build)) or "baseline",
                     " ".join(self.cpu_support.unused) or "nothing more")
        # Requests that name a model wait for `scanned`: on a first start that includes
        # assembling the default model (a few seconds), so `inferno run gemma3-270m` works
        # right after `make run` instead of failing with unknown_model.
        try:
            await self.catalog.rescan(time.monotonic())
            if self.cfg.models.install_default:
                try:
                    await loop.run_in_executor(None, self.registry.ensure_default_model,
                                               self._default_progress)
                except InfernoError as e:
                    log.warning("default model not installed: %s (%s)", e.message, e.hint)
        finally:
            self.catalog.scanned.set()
        for name in self.cfg.models.preload:
            try:
                await self.models.ensure_loaded(name)
            except InfernoError as e:
                log.error("preload of %s failed: %s", name, e)
        self.models.models_event("ready", "")

    def _default_progress(self, done: int, total: int, message: str) -> None:
        self.notifier.extend_timeout(60)
        self.loop_call(self.publisher.publish, "models", "progress",
                       {"event": "progress", "model": "gemma3-270m", "done_bytes": done,
                        "total_bytes": total, "message": message})

    def loop_call(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) on the event loop; safe from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            lease = self.cfg.scheduler.client_lease_s
            for item in self.scheduler.expire(now):  # queued past their deadline, any kind
                rec = self.requests.get(item.request_id)
                if rec is not None:
                    self.service.expired(rec)
            self.service.tick(now)
            self.queue.tick(now)
            self._expire_leases(now, lease)
            await self.models.expire_idle()
            self.publisher.expire_streams(now)
            for change in self.scheduler.poll_level_changes():
                self.publisher.publish("queue", "backpressure", {
                    "model": change.model, "level": change.new, "previous": change.old,
                    "depth": change.depth, "limit": change.limit})

    def _expire_leases(self, now: float, lease: float) -> None:
        """Abort the work of clients silent past the lease; forget sessions gone idle."""
        gap = now - getattr(self, "_last_tick", now)
        self._last_tick = now
        if gap > 1.0:  # the daemon itself stood still (SIGSTOP, suspend): not the clients'
            for key in self.last_seen:  # fault; their pings are only now arriving
                self.last_seen[key] += gap
        active = set()
        for gen in self.requests.values(generates=True):
            key = (gen.connection or gen.principal, gen.session)
            active.add(key)
            if gen.job is None and gen.abort is None and \
                    now - self.last_seen.get(key, now) > lease:
                self.service.cancel(gen.request_id, "aborted",
                                f"client silent for {lease:.0f}s (lease expired)")
        for key in [k for k, t in self.last_seen.items()
                    if k not in active and now - t > lease]:
            del self.last_seen[key]
        if now - getattr(self, "_last_prune", 0.0) > 10:
            self._last_prune = now
            self.limiter.prune(now)

    def apply_config(self, cfg: config_mod.Config) -> None:
        self.models.cfg = cfg
        self.service.cfg = cfg
        self.jobs.cfg = cfg
        self.telemetry.apply_config(cfg)
        s = cfg.scheduler
        self.scheduler.reconfigure(max_queue_per_model=s.max_queue_per_model,
                                   max_queue_total=s.max_queue_total,
                                   aging_interval_s=s.aging_interval_s,
                                   max_queued_per_owner=s.max_queued_per_principal)

    def on_request(self, req: Call) -> None:
        now = time.monotonic()
        # the connection's: a gateway's pings keep its HTTP users' requests alive
        self.last_seen[(req.connection or req.principal, req.session)] = now
        self.publisher.touch(req.session, req.connection or req.principal, now)

    async def drain(self) -> None:
        self.jobs.stopping = True  # queued job items stay queued in SQLite (the checkpoint)
        self.service.fail_queued()
        deadline = time.monotonic() + self.cfg.daemon.drain_timeout_s
        while self.scheduler.running_count() and time.monotonic() < deadline:
            self.notifier.status(f"draining {self.scheduler.running_count()} requests")
            await asyncio.sleep(0.1)
        self.service.abort_all("aborted", "daemon stopping: drain timeout reached")
        await asyncio.sleep(0.05)  # let the abort events leave the socket
        await self.uploads.close()  # an unfinished upload cannot resume in another process
        await self.pulls.close()  # a pull's partial file stays: the next pull resumes it
        await self.models.close()
        await self.runners.close()
        await self.jobs.close()
        await self.telemetry.close()

    # -- requests ---------------------------------------------------------------------------
    def _routes(self) -> dict[str, Route]:
        """Each handler family built once with the parts it uses, bound into the table."""
        cfg = self._current_cfg
        return table.bind([
            SessionHandlers(self),
            ConfigHandlers(cfg),
            ModelHandlers(self.catalog, self.registry, self.models, self.publisher),
            self.uploads,
            self.pulls,
            InferenceHandlers(cfg, self.catalog, self.service, self.queue, self.requests),
            StreamHandlers(cfg, self.publisher),
            QueueHandlers(self.queue, self.scheduler),
            JobHandlers(self.catalog, self.jobs, self.models),
            TelemetryHandlers(self.telemetry),
        ])

    def _current_cfg(self) -> config_mod.Config:
        return self.cfg  # SIGHUP replaces it: handlers read it per request

    def status_report(self) -> dict[str, Any]:
        """The ``status`` reply: everything an operator asks first."""
        now = time.monotonic()
        return {
            "version": __version__, "boot_id": self.boot_id, "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3), "started_at": self.started_wall,
            "endpoints": {"control": self.endpoints.control, "events": self.endpoints.events},
            "config_source": self.cfg.source, "state_dir": str(self.state_dir),
            "models_loaded": [self.models.wire(lm, now) for lm in self.models.loaded.values()],
            "models_failed": self.models.failed_wire(),
            "queue": {"queued": self.scheduler.depth(),
                      "running": self.scheduler.running_count(),
                      "level": self.scheduler.level()},
            "loop_lag_ms": round(self.loop_lag_ms, 3),
            "tokens_per_s": round(self.service.throughput.rate(now), 2),
            "runner_crashes_1h": self.models.crashes_since(now - 3600),
            "requests_served": self.requests_served,
            "model_scans": self.catalog.scans,
            "versions": {"python": platform.python_version(),
                         "llama_cpp_python": self.backend_info.get("llama_cpp_python")},
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),  # models.cpu_wait
            "gpu_offload_supported": self.backend_info.get("gpu_offload_supported"),
            "cpu": self.cpu_support.to_wire() if self.cpu_support else None,
            "held": self.held(),
        }

    def held(self) -> dict[str, int]:
        """What the daemon keeps per client and per request: each must fall back once its
        clients are gone (sessions after the lease, streams after their retention, rate
        buckets once refilled), or it is a leak. Operators see it in ``inferno status``."""
        return {"sessions": len(self.last_seen), "requests": len(self.requests),
                "streams": len(self.publisher.streams),
                "subscriptions": len(self.publisher.subscriptions),
                "claims": len(self.publisher.claims),
                "welcomes_waiting": self.publisher.welcomes_waiting(),
                "rate_buckets": len(self.limiter.peers) + len(self.limiter.sessions),
                "telemetry_runs": self.telemetry.runs_open(),
                "unwritten_job_writes": self.jobs.unwritten(),
                "request_bytes": self.ledger.total}


def _path(p: str) -> Path:
    return Path(p).expanduser()

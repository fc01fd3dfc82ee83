"""InfernoDaemon: the server core wired to the registry, models, scheduler and streams.

Each request type is one small handler below, registered with its minimum role.
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
from infernod.backends.gguf_meta import ModelInfo
from infernod.daemon import jobs as jobs_service
from infernod.daemon import queue as queueing
from infernod.daemon import uploads
from infernod.daemon.generation import Gen, GenerationService
from infernod.daemon.jobs import JobService
from infernod.daemon.models import ModelManager
from infernod.daemon.onnx import OnnxJob, OnnxService
from infernod.daemon.queue import QueueService
from infernod.daemon.scheduler import Scheduler
from infernod.daemon.server import Call, Daemon
from infernod.paths import JOBS_DB, private_dir
from infernod.protocol.codec import PROTOCOL_VERSION
from infernod.protocol.errors import InfernoError
from infernod.runner.supervisor import RunnerSupervisor
from infernod.telemetry.service import TelemetryService

log = logging.getLogger("infernod")

MONITOR_SCAN_AGE_S = 30.0  # a non-operator's models.list/show reuses a scan this recent


class InfernoDaemon(Daemon):
    async def start(self) -> None:
        from infernod.daemon.registry import Registry

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
        self.runners = RunnerSupervisor(self.runtime_dir, self.cfg.daemon.log_level,
                                        gpu_bytes=self._runner_gpu_bytes)
        self.runners.bind()
        self.models = ModelManager(self.cfg, self.registry,
                                   sink_factory=lambda name: self.gen,
                                   publish=self.publisher.publish, notifier=self.notifier,
                                   runners=self.runners)
        self.gen = GenerationService(self.cfg, self.models, self.scheduler, self.publisher)
        self.queue = QueueService(self.gen, self.scheduler, self.models, self.publisher)
        self.jobs = JobService(self.state_dir / JOBS_DB, self.gen, self.publisher,
                               self.cfg, self._render_user_prompt)
        self.telemetry = TelemetryService(self.cfg, self.publisher, loop)
        self.gen.on_profile = self.telemetry.on_profile
        self.gen.on_run_start = self.telemetry.on_run_start
        self.onnx = OnnxService(self.cfg, self.models, self.scheduler,
                                on_profile=self.telemetry.on_profile,
                                on_run_start=self.telemetry.on_run_start)
        self.gen.peer = self.onnx  # one scheduler: one expiry pass, one queue topic
        self.onnx.on_queue_change = self.gen.publish_queue
        self.queue.onnx = self.onnx  # queue.list shows embed/infer too
        # (principal, session) -> last request: a session id is public (queue.list) and
        # anyone may write it in a header, so it only means something with its principal.
        self.last_seen: dict[tuple[str, str], float] = {}
        self.scanned = asyncio.Event()
        self.model_scans = 0  # registry scans done (status: model_scans)
        self._scan_started_at = float("-inf")  # start of the newest finished scan
        self._scan_task: asyncio.Task | None = None
        self.backend_info: dict[str, Any] = {}
        self.cpu_support: CpuSupport | None = None
        self._register()
        self.spawn(self.runners.serve(), "runners")
        self.spawn(self._tick_loop(), "tick")
        self.spawn(self._startup_models(), "startup-models")
        self.spawn(self._start_jobs(), "jobs-start")
        self.spawn(self.telemetry.run_stats_loop(), "stats")
        await self.telemetry.start()

    async def _start_jobs(self) -> None:
        await self.scanned.wait()  # recovered items name models: the registry must know them
        await self.jobs.start()

    def _runner_gpu_bytes(self, pid: int) -> int | None:
        """GPU memory NVML attributes to process ``pid`` in the telemetry's latest sample
        (None without NVML, or when no GPU lists the process)."""
        sample = self.telemetry.latest() if hasattr(self, "telemetry") else None
        gpu = (sample or {}).get("gpu") or {}
        used = [p.get("used_memory_bytes") for g in gpu.get("gpus") or []
                for p in g.get("processes") or [] if p.get("pid") == pid]
        known = [u for u in used if isinstance(u, int)]
        return sum(known) if known else None

    def _render_user_prompt(self, model: str, text: str) -> str:
        from infernod.backends import templates

        return templates.render_chat(self.registry.get(model),
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
            await self.rescan(time.monotonic())
            if self.cfg.models.install_default:
                try:
                    await loop.run_in_executor(None, self.registry.ensure_default_model,
                                               self._default_progress)
                except InfernoError as e:
                    log.warning("default model not installed: %s (%s)", e.message, e.hint)
        finally:
            self.scanned.set()
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

    async def lookup(self, name: str, req: Call | None = None) -> ModelInfo:
        """The model's info. For an operator a file dropped into a model dir before the
        request arrived is found (a rescan); others see the newest scan (see ``scan_for``)."""
        await asyncio.wait_for(self.scanned.wait(), 60)
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
        self.model_scans += 1
        self._scan_started_at = max(self._scan_started_at, started)

    def loop_call(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) on the event loop; safe from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            lease = self.cfg.scheduler.client_lease_s
            self.gen.tick(now)
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
        for gen in list(self.gen.gens.values()):
            key = (gen.principal, gen.session)
            active.add(key)
            if gen.job is None and gen.abort is None and \
                    now - self.last_seen.get(key, now) > lease:
                self.gen.cancel(gen.request_id, "aborted",
                                f"client silent for {lease:.0f}s (lease expired)")
        for key in [k for k, t in self.last_seen.items()
                    if k not in active and now - t > lease]:
            del self.last_seen[key]
        if now - getattr(self, "_last_prune", 0.0) > 10:
            self._last_prune = now
            self.limiter.prune(now)

    def apply_config(self, cfg: config_mod.Config) -> None:
        self.models.cfg = cfg
        self.gen.cfg = cfg
        self.onnx.cfg = cfg
        self.jobs.cfg = cfg
        self.telemetry.apply_config(cfg)
        s = cfg.scheduler
        self.scheduler.reconfigure(max_queue_per_model=s.max_queue_per_model,
                                   max_queue_total=s.max_queue_total,
                                   aging_interval_s=s.aging_interval_s,
                                   max_queued_per_owner=s.max_queued_per_principal)

    def on_request(self, req: Call) -> None:
        now = time.monotonic()
        self.last_seen[(req.principal, req.session)] = now
        self.publisher.touch(req.session, req.principal, now)

    async def drain(self) -> None:
        self.gen.accepting = False
        self.onnx.abort_queued("daemon stopping: this request was still queued and is not kept")
        self.jobs.stopping = True  # queued job items stay queued in SQLite (the checkpoint)
        for gen in list(self.gen.gens.values()):
            if gen.state == "queued":
                self.scheduler.cancel(gen.request_id)
                if gen.job is not None:
                    msg = "daemon stopping: job item checkpointed, it runs after the restart"
                else:
                    msg = "daemon stopping: this request was still queued and is not kept"
                self.gen._fail(gen, "aborted", msg,
                               "resubmit when the daemon is back (jobs are kept)")
        deadline = time.monotonic() + self.cfg.daemon.drain_timeout_s
        while self.gen.running_count() and time.monotonic() < deadline:
            self.notifier.status(f"draining {self.gen.running_count()} requests")
            await asyncio.sleep(0.1)
        self.gen.abort_all("aborted", "daemon stopping: drain timeout reached")
        await asyncio.sleep(0.05)  # let the abort events leave the socket
        await self.uploads.close()  # an unfinished upload cannot resume in another process
        await self.models.close()
        await self.runners.close()
        await self.jobs.close()
        await self.telemetry.close()

    # -- handlers ---------------------------------------------------------------------------
    def _register(self) -> None:
        jobs_service.register(self)
        queueing.register(self)
        self.telemetry.register(self.route)
        r = self.route
        r("hello", "monitor")(self.h_hello)
        r("ping", "monitor")(self.h_ping)
        r("status", "monitor")(self.h_status)
        r("config.get", "monitor")(self.h_config_get)
        r("models.list", "monitor")(self.h_models_list)
        r("models.show", "monitor")(self.h_models_show)
        r("models.load", "operator")(self.h_models_load)
        r("models.unload", "operator")(self.h_models_unload)
        r("models.import", "operator")(self.h_models_import)
        r("models.remove", "operator")(self.h_models_remove)
        self.uploads = uploads.register(self)  # models.upload.*
        r("generate", "user")(self.h_generate)
        r("embed", "user")(self.h_embed)
        r("infer", "user")(self.h_infer)
        r("cancel", "monitor")(self.h_cancel)
        r("stream.fetch", "monitor")(self.h_stream_fetch)

    async def h_hello(self, req: Call) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "server": "infernod", "version": __version__,
                "boot_id": self.boot_id, "role": req.role, "session": req.session,
                "capabilities": sorted(self.handlers),
                "heartbeat_interval_s": self.cfg.daemon.heartbeat_interval_s,
                "max_message_bytes": self.cfg.daemon.max_message_bytes}

    async def h_ping(self, req: Call) -> dict[str, Any]:
        return {"pong": True, "ts": time.time()}

    async def h_status(self, req: Call) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "version": __version__, "boot_id": self.boot_id, "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3), "started_at": self.started_wall,
            "endpoints": {"control": self.endpoints.control, "events": self.endpoints.events},
            "config_source": self.cfg.source, "state_dir": str(self.state_dir),
            "models_loaded": [lm.to_wire(now) for lm in self.models.loaded.values()],
            "models_failed": self.models.failed_wire(),
            "queue": {"queued": self.gen.queued_count() + self.onnx.queued_count(),
                      "running": self.gen.running_count() + self.onnx.running_count(),
                      "level": self.scheduler.level()},
            "loop_lag_ms": round(self.loop_lag_ms, 3),
            "requests_served": self.requests_served,
            "model_scans": self.model_scans,
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
        return {"sessions": len(self.last_seen), "requests": len(self.gen.gens),
                "streams": len(self.publisher.streams),
                "subscriptions": len(self.publisher.subscriptions),
                "claims": len(self.publisher.claims),
                "welcomes_waiting": self.publisher.welcomes_waiting(),
                "rate_buckets": len(self.limiter.peers) + len(self.limiter.sessions),
                "telemetry_runs": self.telemetry.runs_open(),
                "unwritten_job_writes": self.jobs.unwritten(),
                "request_bytes": self.ledger.total}

    async def h_config_get(self, req: Call) -> dict[str, Any]:
        key = req.body.get("key")
        if key:
            try:
                return {"key": key, "value": config_mod.get_key(self.cfg, key)}
            except config_mod.ConfigError as e:
                raise InfernoError("bad_request", str(e)) from e
        return {"config": self.cfg.to_dict(), "source": self.cfg.source}

    async def h_models_list(self, req: Call) -> dict[str, Any]:
        await asyncio.wait_for(self.scanned.wait(), 60)
        await self.scan_for(req)
        return {"models": self.models.list_models(rescan=False),
                "skipped": self.registry.skipped()}

    async def h_models_show(self, req: Call) -> dict[str, Any]:
        from infernod.backends import templates

        info = await self.lookup(req.body["model"], req)
        out = info.to_dict(include_template=True)
        out["chat_template_name"] = templates.template_name_for(info)
        out["memory_estimate_bytes"] = self.models.estimate_bytes(info)
        lm = self.models.loaded.get(info.name)
        out.update(lm.to_wire(time.monotonic()) if lm else {"state": "available"})
        return out

    async def h_models_load(self, req: Call) -> dict[str, Any]:
        t0 = time.monotonic()
        await self.lookup(req.body["model"], req)
        lm = await self.models.ensure_loaded(req.body["model"], req.body.get("keep_alive"),
                                             operator=True)
        return {"model": lm.name, "state": lm.state, "load_s": round(time.monotonic() - t0, 3),
                "memory_bytes": lm.memory_bytes, **lm.engine_info()}

    async def h_embed(self, req: Call) -> dict[str, Any]:
        return await self.onnx.handle("embed", req, await self.lookup(req.body["model"], req))

    async def h_infer(self, req: Call) -> dict[str, Any]:
        return await self.onnx.handle("infer", req, await self.lookup(req.body["model"], req))

    async def h_models_unload(self, req: Call) -> dict[str, Any]:
        await self.models.unload(req.body["model"])
        return {"model": req.body["model"], "state": "unloaded"}

    async def h_models_import(self, req: Call) -> dict[str, Any]:
        from pathlib import Path

        b = req.body
        loop = asyncio.get_running_loop()
        label = b.get("name") or Path(b["path"]).stem[:64]  # for progress events only

        def progress(done: int, total: int, message: str) -> None:
            self.loop_call(self.publisher.publish, "models", "progress",
                           {"event": "progress", "model": label, "done_bytes": done,
                            "total_bytes": total, "message": message})

        info = await loop.run_in_executor(None, lambda: self.registry.import_model(
            b["path"], b.get("name"), bool(b.get("link")), progress))
        self.models.models_event("imported", info.name)
        return {"model": info.name, "path": str(info.path)}

    async def h_models_remove(self, req: Call) -> dict[str, Any]:
        name = req.body["model"]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.registry.remove, name, set(self.models.loaded))
        self.models.models_event("removed", name)
        return {"model": name, "state": "removed"}

    async def h_generate(self, req: Call) -> dict[str, Any]:
        from infernod.backends import templates

        b = req.body
        info = await self.lookup(b["model"], req)
        template = None
        if b.get("messages") is not None:
            prompt, template = templates.render_chat(info, b["messages"])
        else:
            prompt = b["prompt"]
        s = self.cfg.scheduler
        timeout_s = min(b.get("timeout_s") or s.timeout_s, s.max_timeout_s)
        stall_s = min(b.get("stall_timeout_s") or s.stall_timeout_s, s.max_stall_timeout_s)
        now = time.monotonic()
        deadline = req.header.get("deadline")
        deadline_mono = None if deadline is None else now + (deadline - time.time())
        if deadline_mono is not None and deadline_mono <= now:
            raise InfernoError("deadline_exceeded", "the deadline had already passed on arrival")
        request_id = f"{req.session}.{req.header['id']}"
        gen = Gen(request_id=request_id, session=req.session, principal=req.principal,
                  model=info.name, prompt=prompt,
                  body=b, priority=b.get("priority") or "normal", submitted=now,
                  deadline=deadline_mono, timeout_s=timeout_s, stall_timeout_s=stall_s,
                  topic=f"tokens.{request_id}")
        self.gen.submit(gen)
        gen.hold, req.hold = req.hold, None  # the prompt stays in memory until gen finishes
        self.queue.admitted(gen.model)
        return {"request_id": request_id, "topic": gen.topic, "model": info.name,
                "chat_template": template}

    async def h_cancel(self, req: Call) -> dict[str, Any]:
        """A generation, or a waiting or running embed/infer (same ids, same rule)."""
        rid = req.body["request_id"]
        target: Gen | OnnxJob | None = self.gen.gens.get(rid) or self.onnx.jobs.get(rid)
        if target is None or target.state == "done":
            raise InfernoError("unknown_request", f"no active request {rid}")
        # the owner is the session that sent it, from the same principal: a session id is
        # visible to everyone (queue.list), the principal is the kernel's or the key's word
        owner = target.session == req.session and target.principal == req.principal
        if not owner and req.role != "operator":
            raise InfernoError("forbidden", "only the request's owner or an operator may "
                                            "cancel it", "ask an operator")
        if rid in self.gen.gens:
            return {"request_id": rid, "state": self.gen.cancel(rid)}
        return {"request_id": rid, "state": self.onnx.cancel(rid)}

    async def h_stream_fetch(self, req: Call) -> dict[str, Any]:
        """A stream's buffered events: its owner's (the principal that started it) or an
        operator's to read. Someone else's stream answers like a missing one, so request
        ids cannot be probed; the check comes before any work."""
        rid = req.body["request_id"]
        stream = self.publisher.fetch(rid)
        if stream is None or (stream.owner != req.principal and req.role != "operator"):
            raise InfernoError("unknown_request", f"no stream {rid} of yours (finished more "
                               f"than {self.cfg.daemon.stream_retention_s:.0f}s ago, never "
                               "existed, or another user's)")
        from_seq = req.body.get("from_seq") or 0
        events = [{"seq": seq, "type": h["type"], "body": body}
                  for seq, h, body in stream.since(from_seq, 4096)]
        return {"request_id": rid, "events": events, "first_seq": stream.dropped_before,
                "finished": stream.finished_at is not None,
                "more": bool(events) and events[-1]["seq"] < stream.next_seq - 1}


def _path(p: str) -> Path:
    return Path(p).expanduser()

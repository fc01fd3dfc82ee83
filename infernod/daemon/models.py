"""Loaded models: load, unload, keep-alive, memory budget and LRU eviction.

Lives on the event loop. Every model runs in a runner process of its own (infernod/runner),
started by the loader of its kind (``_loaders``: GGUF or ONNX): a llama.cpp or onnxruntime
crash ends that runner, the model shows "failed" with the reason, and the next request loads
it again, after a backoff, until it crashed CRASH_LIMIT times within CRASH_WINDOW_S (then
loads are refused until the window passes or an operator loads it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import psutil

from infernod.backends.base import EngineSink
from infernod.backends.cpu_features import CpuSupport
from infernod.backends.gguf_meta import ModelInfo
from infernod.backends.onnx_engine import OnnxRunEngine
from infernod.backends.parking import park_count
from infernod.config import Config
from infernod.daemon import memory
from infernod.daemon.crashes import CRASH_WINDOW_S, CrashRecord
from infernod.model_settings import LOAD_KEYS, SettingsStore
from infernod.protocol import bodies
from infernod.protocol.errors import InfernoError
from infernod.runner.supervisor import CRASH_HINT, OnnxRunnerEngine, RunnerEngine, RunnerSupervisor

if TYPE_CHECKING:
    from infernod.backends.base import GenerationEngine
    from infernod.daemon.registry import Registry
    from infernod.daemon.scheduler import Scheduler
    from infernod.daemon.systemd import Notifier
    from infernod.protocol.bodies import MetricsSample

log = logging.getLogger("infernod.daemon.models")

MEMORY_WAIT_POLL_S = 0.25  # a request whose model waits for busy models to go idle


# Why a model was unloaded, which decides what happens to the requests still queued for it:
# an operator's unload fails them (model_unloaded); an eviction (the memory planner made room
# for another model) or an idle unload loads it again for them; a stopping daemon has
# already ended them.
UnloadCause = Literal["operator", "evicted", "idle", "stopping"]


class ModelUser(EngineSink, Protocol):
    """Who runs requests on the models (daemon/lifecycle.py's RequestService): the GGUF
    engines' sink, told when a model goes away."""

    def model_unloaded(self, model: str, cause: UnloadCause) -> None:
        """``model`` is being unloaded: its running requests must end."""

    def model_failed(self, model: str, message: str, hint: str) -> None:
        """``model``'s runner died (``message`` says how): its running requests must end."""


@dataclass
class LoadedModel:
    name: str
    info: ModelInfo
    engine: GenerationEngine | OnnxRunEngine | None = None
    state: str = "loading"  # loading | loaded | unloading
    loaded_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float = 300.0
    memory_bytes: int = 0
    ready: asyncio.Future[LoadedModel] | None = None
    gone: asyncio.Future[None] | None = None  # set while unloading, done once it is gone
    keep_alive_source: str = "config"  # request | model | config (models.show)
    params: dict[str, Any] = field(default_factory=dict)  # the load settings it runs with
    gpu_layers: int = 0  # n_gpu_layers as loaded ('auto' resolved)
    gpu_bytes: dict[str, int] = field(default_factory=dict)  # gpuN -> bytes it is charged

    @property
    def pinned(self) -> bool:
        return self.keep_alive_s < 0

    def keep_alive_left_s(self, now: float, running: int) -> float | None:
        """Seconds until idle unloading; None while pinned or while ``running`` (the
        scheduler's count of its requests holding a slot) is not 0."""
        if self.pinned or running:
            return None
        return max(0.0, self.keep_alive_s - (now - self.last_used))

    def to_wire(self, now: float, running: int) -> bodies.LoadedModel:
        base: bodies.LoadedModel = {
            "name": self.name,
            "state": self.state,
            "memory_bytes": self.memory_bytes,
            "gpu_memory_bytes": dict(self.gpu_bytes),
            "keep_alive_s": self.keep_alive_s,
            "keep_alive_left_s": self.keep_alive_left_s(now, running),
            "pinned": self.pinned,
            "running": running,
            "idle_s": round(now - self.last_used, 1),
            "slots": None if self.engine is None else self.engine.n_slots,
            "runner_pid": None,
        }
        if "n_ctx" in self.params:  # GGUF: the context it was loaded with
            base["n_ctx"] = self.params["n_ctx"]
            base["n_gpu_layers"] = self.gpu_layers
        # the engine's own fields (runner_*, host_cache, ONNX provider) are NotRequired
        # in bodies.LoadedModel; tests/test_bodies.py checks the real daemon's against it
        return cast(bodies.LoadedModel, {**base, **self.engine_info()})

    def engine_info(self) -> dict[str, Any]:
        """Backend details of a loaded engine (ONNX: provider actually used, fallback reason)."""
        return {} if self.engine is None else self.engine.wire_info()

    @property
    def text_engine(self) -> GenerationEngine | None:
        """The engine, if it generates text (GGUF); None for ONNX or when not loaded."""
        return None if isinstance(self.engine, OnnxRunEngine) else self.engine


class ModelManager:
    """Owns every loaded engine. Only the event-loop thread calls into it."""

    def __init__(self, cfg: Config, registry: Registry, *,
                 publish: Callable[[str, str, dict[str, Any]], object],
                 notifier: Notifier, runners: RunnerSupervisor,
                 scheduler: Scheduler, settings: SettingsStore | None = None,
                 gpu_sample: Callable[[], MetricsSample | None] | None = None) -> None:
        self.cfg = cfg
        self.gpu_sample = gpu_sample or (lambda: None)  # telemetry's latest (NVML) sample
        self.settings = settings if settings is not None else SettingsStore()
        self.scheduler = scheduler  # who runs on each model (idle unloading, eviction)
        self.registry = registry
        self.publish = publish
        self.notifier = notifier
        self.runners = runners
        self.loaded: dict[str, LoadedModel] = {}
        self.failures: dict[str, CrashRecord] = {}  # models whose runner died
        self.crash_times: deque[float] = deque(maxlen=1000)  # every runner crash, monotonic
        self.user: ModelUser | None = None  # see attach
        # Set by the daemon once llama.cpp was probed (backends.cpu_features): None until then.
        self.cpu_support: CpuSupport | None = None
        # how a model of each kind is started: a runner process either way
        self._loaders: dict[str, Callable[[LoadedModel, ModelInfo],
                                          Awaitable[RunnerEngine]]] = {
            "gguf": self._start_runner, "onnx": self._start_onnx_runner}

    def attach(self, user: ModelUser) -> None:
        """The request service, which attaches itself as it is built (it needs this manager
        to exist first): GGUF runners send it their events, unloads and crashes tell it."""
        self.user = user

    def wire(self, lm: LoadedModel, now: float) -> bodies.LoadedModel:
        """``lm`` as status, models.show and ``models`` events show it."""
        return lm.to_wire(now, self.scheduler.running_count(lm.name))

    # -- budget -----------------------------------------------------------------------------
    def budget_bytes(self) -> int:
        configured = self.cfg.models.memory_budget_bytes
        return configured or int(psutil.virtual_memory().total * 0.75)

    def gpus(self) -> dict[str, dict[str, int]]:
        """Each GPU's budget from the newest NVML sample (memory.gpu_budgets): what this
        daemon may use there, others' memory excepted, capped by models.vram_budget_bytes."""
        sample = self.gpu_sample()
        ours: dict[str, int] = {}
        for lm in self.loaded.values():
            for key, n in lm.gpu_bytes.items():
                ours[key] = ours.get(key, 0) + n
        pids = {e.pid for lm in self.loaded.values() if isinstance(e := lm.engine, RunnerEngine)
                and e.pid is not None}
        return memory.gpu_budgets(sample["gpu"] if sample else None,  # type: ignore[arg-type]
                                  self.cfg.models.vram_budget_bytes, ours, pids)

    def _offload(self) -> dict[str, dict[str, int]]:
        """The GPUs a load may offload to: none while this llama.cpp cannot offload."""
        ok = self.cpu_support is not None and self.cpu_support.gpu_offload_supported
        return self.gpus() if ok else {}

    def demand(self, info: ModelInfo, params: dict[str, Any] | None = None,
               ) -> tuple[dict[str, int], int]:
        """(bytes per device, n_gpu_layers) a load of ``info`` with ``params`` (default: its
        settings) is expected to take: the estimate split by the layers offloaded, 'auto'
        fitted to the GPUs' room; the host cache's budget counts on the host."""
        p = params or self.load_params(info.name)
        m = self.cfg.models
        est = self.registry.estimate_memory(info, n_ctx=p["n_ctx"], n_slots=p["slots"],
                                            swa_full=m.swa_full,
                                            park_slots=park_count(p["slots"], m.park_slots))
        gpus = self._offload()
        free = {k: g["free_bytes"] for k, g in gpus.items()}
        layers = p["n_gpu_layers"]
        layers = memory.fit_gpu_layers(est, info, free) if layers == "auto" and gpus \
            else 0 if layers == "auto" else int(layers)
        out = memory.split_memory(est, info, layers, {k: float(max(1, v)) for k, v in free.items()})
        out[memory.HOST] += self._host_cache_bytes(info)
        return out, layers

    def load_params(self, name: str) -> dict[str, Any]:
        """The load settings ``name`` gets on its next load: its own, else the config's."""
        return {k: self.settings.value(name, k, self.cfg) for k in LOAD_KEYS}

    def estimate_bytes(self, info: ModelInfo) -> int:
        """Host RAM loading ``info`` with its settings is expected to take (see _load)."""
        return self.demand(info)[0][memory.HOST]

    def keep_alive_for(self, name: str, requested: float | None) -> tuple[float, str]:
        return self.settings.keep_alive_for(name, requested, self.cfg)

    def effective_settings(self, name: str) -> dict[str, dict[str, Any]]:
        """Every setting of ``name``: {value, source}, and for a loaded model the value it
        runs with where the next load would differ (``loaded``: what runs now)."""
        out = self.settings.effective(name, self.cfg)
        lm = self.loaded.get(name)
        if lm is None:
            return out
        out["keep_alive_s"] = {"value": lm.keep_alive_s, "source": lm.keep_alive_source}
        for key, was in lm.params.items():
            if out[key]["value"] != was:
                out[key]["loaded"] = was
        if lm.params and lm.params.get("n_gpu_layers") == "auto":
            out["n_gpu_layers"]["resolved"] = lm.gpu_layers
        return out

    def settings_changed(self, name: str) -> list[str]:
        """A model's settings changed: what acts in the daemon applies to it at once (its
        keep-alive, pin); returns the load keys whose new value waits for the next load."""
        lm = self.loaded.get(name)
        if lm is None:
            return []
        lm.keep_alive_s, lm.keep_alive_source = self.keep_alive_for(name, None)
        if not lm.params:
            return []
        want = self.load_params(name)
        return [k for k in LOAD_KEYS if k in lm.params and lm.params[k] != want[k]]

    def _host_cache_bytes(self, info: ModelInfo) -> int:
        """RAM a GGUF engine may fill with idle conversations (counted at its full budget)."""
        return 0 if info.kind == "onnx" else self.cfg.models.host_cache_mib << 20

    def _plan(self, name: str, need: dict[str, int]) -> list[tuple[str, str]]:
        """Per device (host RAM, each GPU): the idle models to unload so ``name`` fits."""
        now = time.monotonic()
        refs = [memory.LoadedModel(name=lm.name, bytes=lm.memory_bytes, pinned=lm.pinned,
                                   busy=bool(self.scheduler.running_count(lm.name))
                                   or lm.state != "loaded", last_used_s=lm.last_used,
                                   device_bytes={memory.HOST: lm.memory_bytes, **lm.gpu_bytes})
                for lm in self.loaded.values()]
        budgets = {memory.HOST: self.budget_bytes(),
                   **{k: g["budget_bytes"] for k, g in self.gpus().items()}}
        plan = memory.plan_devices(name, need, budgets, refs, now)
        return list(zip(plan.evict, plan.messages, strict=True))

    # -- lifecycle --------------------------------------------------------------------------
    def models_event(self, event: str, name: str, **extra: Any) -> None:
        now = time.monotonic()
        body = {"event": event, "model": name,
                "loaded": [self.wire(lm, now) for lm in self.loaded.values()],
                "failed": self.failed_wire(), **extra}
        self.publish("models", "models", body)

    async def load_for_request(self, name: str, keep_alive_s: float | None,
                               wanted: Callable[[], bool] | None = None) -> float:
        """Make sure ``name`` is loaded for a request; return the seconds it waited.
        Any failure is an InfernoError (the load path logged the cause).

        A model that does not fit only because other models are busy (running or loading:
        ``insufficient_memory`` whose ``busy_bytes`` would make room) waits until they are
        idle and the planner can evict them, while ``wanted()`` says someone still waits
        for it; a model that can never fit (bigger than the budget, pinned models hold the
        rest) fails at once."""
        t0 = time.monotonic()
        while True:
            try:
                await self.ensure_loaded(name, keep_alive_s)
                return time.monotonic() - t0
            except InfernoError as e:
                if not _fits_once_idle(e) or wanted is None or not wanted():
                    raise
            except Exception as e:
                raise InfernoError("internal", f"loading {name} failed: {e}") from e
            await asyncio.sleep(MEMORY_WAIT_POLL_S)

    async def ensure_loaded(self, name: str, keep_alive_s: float | None = None, *,
                            operator: bool = False) -> LoadedModel:
        """Load ``name`` unless it is loaded. ``operator``: an explicit ``models.load``,
        which clears the crash-loop guard (the operator fixed the cause, or wants to see)."""
        if operator:
            self.failures.pop(name, None)
        lm = self.loaded.get(name)
        while lm is not None and lm.state == "unloading" and lm.gone is not None:
            await asyncio.shield(lm.gone)  # evicted or unloaded just now: load it again
            lm = self.loaded.get(name)
        if lm is not None:
            if keep_alive_s is not None:
                lm.keep_alive_s, lm.keep_alive_source = self.keep_alive_for(name, keep_alive_s)
            if lm.state == "loading" and lm.ready is not None:
                await asyncio.shield(lm.ready)
            if lm.state != "loaded":
                raise InfernoError("model_busy", f"model {name} is {lm.state}")
            lm.last_used = time.monotonic()
            return lm
        return await self._load(name, keep_alive_s)

    def _check_crash_guard(self, name: str) -> float:
        """Seconds to wait before loading ``name`` again after a crash; raises runner_crashed
        while the crash-loop guard refuses it."""
        rec = self.failures.get(name)
        if rec is None:
            return 0.0
        now = time.monotonic()
        refused = rec.refused_for_s(now)
        if refused > 0:
            raise InfernoError(
                "runner_crashed",
                f"{name} crashed {len(rec.times)} times in {CRASH_WINDOW_S:.0f}s (last: "
                f"{rec.reason}); loads are refused for {refused:.0f}s more",
                f"see the daemon log for the cause; once fixed, 'inferno load {name}' "
                "(an operator) tries again at once")
        if not rec.times:
            self.failures.pop(name, None)
            return 0.0
        return rec.backoff_s(now)

    async def _load(self, name: str, keep_alive_s: float | None) -> LoadedModel:
        info = self.registry.get(name)
        wait_s = self._check_crash_guard(name)
        params = self.load_params(name)
        demand, layers = self.demand(info, params)
        need = demand[memory.HOST]
        for victim, reason in self._plan(name, demand):
            log.info(reason)
            await self.unload(victim, reason=reason, cause="evicted")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[LoadedModel] = loop.create_future()
        keep, source = self.keep_alive_for(name, keep_alive_s)
        lm = LoadedModel(name=name, info=info, keep_alive_s=keep, keep_alive_source=source,
                         memory_bytes=need, ready=ready, params=params, gpu_layers=layers,
                         gpu_bytes={k: v for k, v in demand.items() if k != memory.HOST})
        self.loaded[name] = lm
        self.models_event("loading", name, estimate_bytes=need, estimate_gpu_bytes=lm.gpu_bytes)
        t0 = time.monotonic()
        engine: RunnerEngine
        try:
            if wait_s > 0:  # the crash-loop backoff; requests for it wait on lm.ready
                log.info("%s crashed recently: loading it again in %.1fs", name, wait_s)
                await asyncio.sleep(wait_s)
            self.notifier.extend_timeout(120)
            self.notifier.status(f"loading {name}")
            t0 = time.monotonic()
            loader = self._loaders.get(info.kind)
            if loader is None:
                raise InfernoError("not_supported", f"{name} is a {info.kind} model, which "
                                   "this daemon cannot load")
            engine = await loader(lm, info)
        except BaseException as e:
            del self.loaded[name]
            ready.set_exception(e)
            ready.exception()  # mark retrieved
            self.models_event("load_failed", name, error=str(e))
            if isinstance(e, InfernoError) and e.code == "runner_crashed":
                self._record_crash(name, e.message, str(e.extra.get("signal") or ""))
            if isinstance(e, InfernoError | asyncio.CancelledError):
                raise
            raise InfernoError("internal", f"loading {name} failed: {e}") from e
        lm.engine = engine
        lm.state = "loaded"
        lm.loaded_at = time.monotonic()
        lm.last_used = lm.loaded_at
        rec = self.failures.get(name)
        if rec is not None:
            rec.current = False  # loaded again; the crash times still count for the guard
        self._measure(lm, engine)
        ready.set_result(lm)
        load_s = time.monotonic() - t0
        self.models_event("loaded", name, load_s=round(load_s, 3), **lm.engine_info())
        self.notifier.status(self.status_line())
        log.info("loaded %s in %.2fs (%d MiB)", name, load_s, lm.memory_bytes // 2**20)
        return lm

    def _measure(self, lm: LoadedModel, engine: RunnerEngine) -> None:
        """The budget counts what a model really takes: a runner's resident set (weights,
        context, its interpreter) plus its host cache's budget; the registry learns it."""
        total = engine.rss_bytes() or int(engine.memory_bytes().get("total_bytes", 0))
        if total <= 0:
            return
        try:
            if not lm.gpu_bytes:  # what a GPU holds is not in the resident set
                self.registry.record_measured(lm.name, total)
        except Exception as e:  # measuring is best effort; the estimate stands
            log.warning("could not record the memory of %s: %s", lm.name, e)
        lm.memory_bytes = total + self._host_cache_bytes(lm.info)

    def check_role(self, name: str, role: str) -> None:
        self.settings.check_role(name, role, self.cfg)

    def render_chat(self, info: ModelInfo, messages: list[dict[str, Any]]) -> tuple[str, str]:
        return self.settings.render_chat(info, messages)

    def check_generate(self, name: str) -> None:
        """Refuse generation on a model that cannot generate (ONNX); unknown names pass here
        and fail where the load looks them up."""
        try:
            info = self.registry.get(name)
        except InfernoError:
            return
        if info.kind != "gguf":
            raise InfernoError("not_supported", f"{name} is a {info.kind} model: it cannot "
                               "generate text", "use 'embed' or 'infer' for ONNX models")

    async def _start_onnx_runner(self, lm: LoadedModel, info: ModelInfo) -> RunnerEngine:
        """Start a runner process for an ONNX model (an OnnxEngine: its session and the
        worker thread that runs embed/infer) and wait until it has loaded it."""
        name = lm.name
        o = self.cfg.onnx
        kwargs = {"backend": "onnx", "path": str(info.path), "providers": list(o.providers),
                  "intra_op_threads": o.intra_op_threads,
                  "inter_op_threads": o.inter_op_threads,
                  "graph_optimization": o.graph_optimization, "max_batch": o.max_batch}
        m = self.cfg.models
        return await self.runners.start(name, kwargs, wrapper=list(m.runner_wrapper),
                                        sink=None, on_exit=self._runner_exited,
                                        proxy=OnnxRunnerEngine, nice=m.runner_nice,
                                        sched=m.runner_sched)

    async def _start_runner(self, lm: LoadedModel, info: ModelInfo) -> RunnerEngine:
        """Start a runner process for a GGUF model, with the model's own load settings
        (else the config's), and wait until it has loaded it."""
        name = lm.name
        if self.cpu_support is not None and not self.cpu_support.ok:
            raise InfernoError(self.cpu_support.code, f"cannot load {name}: "
                               f"{self.cpu_support.reason()}", self.cpu_support.hint())
        m = self.cfg.models
        if not lm.params:  # not planned by _load (tests start a runner directly)
            lm.params = self.load_params(name)
            ngl = lm.params["n_gpu_layers"]
            lm.gpu_layers = self.demand(info, lm.params)[1] if ngl == "auto" else int(ngl)
        p = lm.params
        cores = os.cpu_count() or 1
        kwargs = {"path": str(info.path), "n_ctx": p["n_ctx"], "n_slots": p["slots"],
                  "n_threads": p["threads"] or cores,
                  "n_threads_batch": p["threads_batch"] or cores,
                  "n_gpu_layers": lm.gpu_layers, "swa_full": m.swa_full,
                  "flash_attn": p["flash_attn"], "prefill_chunk": m.prefill_chunk,
                  "park_slots": park_count(p["slots"], m.park_slots),
                  "host_cache_bytes": m.host_cache_mib << 20}
        return await self.runners.start(name, kwargs, wrapper=list(m.runner_wrapper),
                                        sink=self.user, on_exit=self._runner_exited,
                                        nice=m.runner_nice, sched=m.runner_sched)

    def _record_crash(self, name: str, reason: str, sig: str) -> CrashRecord:
        now = time.monotonic()
        rec = self.failures.get(name)
        if rec is None:
            rec = self.failures[name] = CrashRecord(reason, sig, now, time.time())
        rec.reason, rec.signal, rec.at, rec.at_wall, rec.current = (
            reason, sig, now, time.time(), True)
        rec.prune(now)
        rec.times.append(now)
        self.crash_times.append(now)
        return rec

    def crashes_since(self, since: float) -> int:
        """Runner crashes at or after ``since`` (monotonic), every model counted."""
        return sum(1 for t in self.crash_times if t >= since)

    def _runner_exited(self, engine: RunnerEngine, reason: str, sig: str) -> None:
        """A loaded model's runner died (not asked to): the model is gone, its requests end
        with runner_crashed, the next request loads it again (see _check_crash_guard)."""
        lm = self.loaded.get(engine.model)
        if lm is None or lm.engine is not engine:
            return
        self.loaded.pop(engine.model, None)
        lm.state = "failed"
        lm.engine = None
        rec = self._record_crash(engine.model, reason, sig)
        self.models_event("failed", engine.model, reason=reason, signal=sig or None,
                          crashes=len(rec.times))
        self.notifier.status(self.status_line())
        if self.user is not None:
            self.user.model_failed(engine.model, reason, CRASH_HINT)

    async def unload(self, name: str, reason: str = "unloaded by request", *,
                     cause: UnloadCause = "operator") -> None:
        """Stop ``name``'s runner. Its running requests end (``aborted``); what becomes of
        its queued ones is the ``cause``'s (see UnloadCause)."""
        lm = self.loaded.get(name)
        if lm is None:
            raise InfernoError("model_not_loaded", f"model {name} is not loaded")
        if lm.state == "loading" and lm.ready is not None:
            try:
                await asyncio.shield(lm.ready)
            except Exception:
                return
        if lm.state == "unloading":
            if lm.gone is not None:
                await asyncio.shield(lm.gone)
            return
        lm.state = "unloading"
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lm.gone = gone
        if self.user is not None:
            self.user.model_unloaded(name, cause)
        engine, lm.engine = lm.engine, None
        try:
            if isinstance(engine, RunnerEngine):
                await engine.aclose()
            elif engine is not None:  # an engine in this process (tests)
                await asyncio.get_running_loop().run_in_executor(None, engine.close)
        finally:
            if self.loaded.get(name) is lm:
                self.loaded.pop(name, None)
            gone.set_result(None)
        self.models_event("unloaded", name, reason=reason)
        self.notifier.status(self.status_line())
        log.info("unloaded %s: %s", name, reason)

    async def expire_idle(self) -> None:
        now = time.monotonic()
        for lm in list(self.loaded.values()):
            left = lm.keep_alive_left_s(now, self.scheduler.running_count(lm.name))
            if lm.state == "loaded" and left is not None and left <= 0:
                await self.unload(lm.name, reason=f"idle for {lm.keep_alive_s:.0f}s",
                                  cause="idle")

    async def close(self) -> None:
        for name in list(self.loaded):
            try:
                await self.unload(name, reason="daemon stopping", cause="stopping")
            except InfernoError:
                pass

    def failed_wire(self) -> list[bodies.ModelFailure]:
        """Models whose runner died and that are not loaded again (status: models_failed)."""
        now = time.monotonic()
        return [rec.to_wire(n, now) for n, rec in self.failures.items()
                if rec.current and n not in self.loaded]

    def status_line(self) -> str:
        names = [n for n, lm in self.loaded.items() if lm.state == "loaded"]
        return f"serving; models loaded: {', '.join(names) or 'none'}"

    def list_models(self, rescan: bool = True) -> list[bodies.ModelState]:
        """Every model with its state; ``rescan=False`` lists the newest scan's result
        (cheap: no file is touched, safe on the event loop)."""
        now = time.monotonic()
        out: list[bodies.ModelState] = []
        for info in (self.registry.scan() if rescan else self.registry.models()):
            d = info.to_dict()
            lm = self.loaded.get(info.name)
            rec = self.failures.get(info.name)
            if lm is not None:
                d.update(self.wire(lm, now))
            else:
                d["state"] = "available"
            if rec is not None and lm is None:
                d.update(rec.to_wire(info.name, now))
            d["name"] = info.name
            out.append(cast(bodies.ModelState, d))  # the registry's fields, then the above
        return out

    def model_dirs(self, state_dir: Path) -> list[Path]:
        return [state_dir / "models", *(Path(p) for p in self.cfg.models.dirs)]


def _fits_once_idle(e: InfernoError) -> bool:
    """An ``insufficient_memory`` that waiting cures: the models in the way are only busy."""
    if e.code != "insufficient_memory":
        return False
    x = e.extra
    try:
        room = int(x["budget_bytes"]) - int(x["used_bytes"]) + int(x["freeable_bytes"]) \
            + int(x["busy_bytes"])
        return int(x["need_bytes"]) <= min(room, int(x["budget_bytes"]))
    except (KeyError, TypeError, ValueError):
        return False

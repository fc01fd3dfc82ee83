"""Loaded models: load, unload, keep-alive, memory budget and LRU eviction.

Lives on the event loop. The slow parts (reading weights, creating the llama.cpp context,
closing it) run in the default executor; the loop only awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from infernod.backends.cpu_features import CpuSupport
from infernod.backends.parking import park_count
from infernod.config import Config
from infernod.gguf_meta import ModelInfo
from infernod.onnx_service import OnnxEngine
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.base import EngineSink, GenerationEngine
    from infernod.registry import Registry
    from infernod.systemd import Notifier

log = logging.getLogger("infernod.models")


@dataclass
class LoadedModel:
    name: str
    info: ModelInfo
    engine: GenerationEngine | OnnxEngine | None = None
    state: str = "loading"  # loading | loaded | unloading
    loaded_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float = 300.0
    memory_bytes: int = 0
    running: set[str] = field(default_factory=set)
    ready: asyncio.Future[LoadedModel] | None = None

    @property
    def pinned(self) -> bool:
        return self.keep_alive_s < 0

    def keep_alive_left_s(self, now: float) -> float | None:
        if self.pinned or self.running:
            return None
        return max(0.0, self.keep_alive_s - (now - self.last_used))

    def to_wire(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "memory_bytes": self.memory_bytes,
            "keep_alive_s": self.keep_alive_s,
            "keep_alive_left_s": self.keep_alive_left_s(now),
            "pinned": self.pinned,
            "running": len(self.running),
            "idle_s": round(now - self.last_used, 1),
            "slots": None if self.engine is None else self.engine.n_slots,
            **self.engine_info(),
        }

    def engine_info(self) -> dict[str, Any]:
        """Backend details of a loaded engine (ONNX: provider actually used, fallback reason)."""
        return {} if self.engine is None else self.engine.wire_info()

    @property
    def text_engine(self) -> GenerationEngine | None:
        """The engine, if it generates text (GGUF); None for ONNX or when not loaded."""
        return None if isinstance(self.engine, OnnxEngine) else self.engine


class ModelManager:
    """Owns every loaded engine. Only the event-loop thread calls into it."""

    def __init__(self, cfg: Config, registry: Registry, *,
                 sink_factory: Callable[[str], EngineSink],
                 publish: Callable[[str, str, dict[str, Any]], object],
                 notifier: Notifier) -> None:
        self.cfg = cfg
        self.registry = registry
        self.sink_factory = sink_factory
        self.publish = publish
        self.notifier = notifier
        self.loaded: dict[str, LoadedModel] = {}
        self.on_unloaded: list[Callable[[str], None]] = []
        # Set by the daemon once llama.cpp was probed (backends.cpu_features): None until then.
        self.cpu_support: CpuSupport | None = None

    # -- budget -----------------------------------------------------------------------------
    def budget_bytes(self) -> int:
        configured = self.cfg.models.memory_budget_bytes
        return configured or int(psutil.virtual_memory().total * 0.75)

    def estimate_bytes(self, info: ModelInfo) -> int:
        """What loading ``info`` with the current config is expected to take (see _load)."""
        m = self.cfg.models
        est = self.registry.estimate_memory(info, n_ctx=m.n_ctx, n_slots=m.slots,
                                            swa_full=m.swa_full,
                                            park_slots=park_count(m.slots, m.park_slots))
        return int(est.total_bytes) + self._host_cache_bytes(info)

    def _host_cache_bytes(self, info: ModelInfo) -> int:
        """RAM a GGUF engine may fill with idle conversations (counted at its full budget)."""
        return 0 if info.kind == "onnx" else self.cfg.models.host_cache_mib << 20

    def _plan(self, name: str, need: int) -> list[tuple[str, str]]:
        from infernod.memory import LoadedModel as LoadedModelRef
        from infernod.memory import plan_load

        now = time.monotonic()
        refs = [LoadedModelRef(name=lm.name, bytes=lm.memory_bytes, pinned=lm.pinned,
                               busy=bool(lm.running) or lm.state != "loaded",
                               last_used_s=lm.last_used)
                for lm in self.loaded.values()]
        plan = plan_load(name, need, self.budget_bytes(), refs, now)
        return list(zip(plan.evict, plan.messages, strict=True))

    # -- lifecycle --------------------------------------------------------------------------
    def models_event(self, event: str, name: str, **extra: Any) -> None:
        now = time.monotonic()
        body = {"event": event, "model": name,
                "loaded": [lm.to_wire(now) for lm in self.loaded.values()], **extra}
        self.publish("models", "models", body)

    async def load_for_request(self, name: str, keep_alive_s: float | None) -> float:
        """Make sure ``name`` is loaded for a request; return the seconds it waited.
        Any failure is an InfernoError (the load path logged the cause)."""
        t0 = time.monotonic()
        try:
            await self.ensure_loaded(name, keep_alive_s)
        except InfernoError:
            raise
        except Exception as e:
            raise InfernoError("internal", f"loading {name} failed: {e}") from e
        return time.monotonic() - t0

    async def ensure_loaded(self, name: str, keep_alive_s: float | None = None) -> LoadedModel:
        lm = self.loaded.get(name)
        if lm is not None:
            if keep_alive_s is not None:
                lm.keep_alive_s = keep_alive_s
            if lm.state == "loading" and lm.ready is not None:
                await asyncio.shield(lm.ready)
            if lm.state != "loaded":
                raise InfernoError("model_busy", f"model {name} is {lm.state}")
            lm.last_used = time.monotonic()
            return lm
        return await self._load(name, keep_alive_s)

    async def _load(self, name: str, keep_alive_s: float | None) -> LoadedModel:
        info = self.registry.get(name)
        need = self.estimate_bytes(info)
        for victim, reason in self._plan(name, need):
            log.info(reason)
            await self.unload(victim, reason=reason)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[LoadedModel] = loop.create_future()
        lm = LoadedModel(name=name, info=info,
                         keep_alive_s=(keep_alive_s if keep_alive_s is not None
                                       else self.cfg.models.keep_alive_s),
                         memory_bytes=need, ready=ready)
        self.loaded[name] = lm
        self.models_event("loading", name, estimate_bytes=need)
        self.notifier.extend_timeout(120)
        self.notifier.status(f"loading {name}")
        t0 = time.monotonic()
        try:
            engine = await loop.run_in_executor(None, self._create_engine, name, info)
        except BaseException as e:
            del self.loaded[name]
            ready.set_exception(e)
            ready.exception()  # mark retrieved
            self.models_event("load_failed", name, error=str(e))
            if isinstance(e, InfernoError):
                raise
            raise InfernoError("internal", f"loading {name} failed: {e}") from e
        lm.engine = engine
        lm.state = "loaded"
        lm.loaded_at = time.monotonic()
        lm.last_used = lm.loaded_at
        try:
            measured = engine.memory_bytes()
            if measured is not None:
                total = int(measured["total_bytes"])
                self.registry.record_measured(name, total)
                lm.memory_bytes = total + self._host_cache_bytes(info)
        except Exception as e:  # measuring is best effort; the estimate stands
            log.warning("could not measure memory of %s: %s", name, e)
        ready.set_result(lm)
        load_s = time.monotonic() - t0
        self.models_event("loaded", name, load_s=round(load_s, 3), **lm.engine_info())
        self.notifier.status(self.status_line())
        log.info("loaded %s in %.2fs (%d MiB)", name, load_s, lm.memory_bytes // 2**20)
        return lm

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

    def _create_engine(self, name: str, info: ModelInfo) -> GenerationEngine | OnnxEngine:
        if info.kind == "onnx":
            from infernod.onnx_service import create_engine

            return create_engine(self.cfg, info)  # memory: the registry's file-size estimate
        if self.cpu_support is not None and not self.cpu_support.ok:
            raise InfernoError(self.cpu_support.code, f"cannot load {name}: "
                               f"{self.cpu_support.reason()}", self.cpu_support.hint())
        from infernod.backends.gguf import GgufEngine

        m = self.cfg.models
        cores = os.cpu_count() or 1
        engine = GgufEngine(
            str(info.path), n_ctx=m.n_ctx, n_slots=m.slots,
            n_threads=m.threads or cores, n_threads_batch=m.threads_batch or cores,
            n_gpu_layers=m.n_gpu_layers, swa_full=m.swa_full, prefill_chunk=m.prefill_chunk,
            park_slots=park_count(m.slots, m.park_slots), sink=self.sink_factory(name),
            host_cache_bytes=m.host_cache_mib << 20,
        )
        engine.start()
        return engine

    async def unload(self, name: str, reason: str = "unloaded by request") -> None:
        lm = self.loaded.get(name)
        if lm is None:
            raise InfernoError("model_not_loaded", f"model {name} is not loaded")
        if lm.state == "loading" and lm.ready is not None:
            try:
                await asyncio.shield(lm.ready)
            except Exception:
                return
        lm.state = "unloading"
        for cb in self.on_unloaded:
            cb(name)
        engine, lm.engine = lm.engine, None
        if engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
        self.loaded.pop(name, None)
        self.models_event("unloaded", name, reason=reason)
        self.notifier.status(self.status_line())
        log.info("unloaded %s: %s", name, reason)

    async def expire_idle(self) -> None:
        now = time.monotonic()
        for lm in list(self.loaded.values()):
            left = lm.keep_alive_left_s(now)
            if lm.state == "loaded" and left is not None and left <= 0:
                await self.unload(lm.name, reason=f"idle for {lm.keep_alive_s:.0f}s")

    async def close(self) -> None:
        for name in list(self.loaded):
            try:
                await self.unload(name, reason="daemon stopping")
            except InfernoError:
                pass

    def status_line(self) -> str:
        names = [n for n, lm in self.loaded.items() if lm.state == "loaded"]
        return f"serving; models loaded: {', '.join(names) or 'none'}"

    def list_models(self, rescan: bool = True) -> list[dict[str, Any]]:
        """Every model with its state; ``rescan=False`` lists the newest scan's result
        (cheap: no file is touched, safe on the event loop)."""
        now = time.monotonic()
        out = []
        for info in (self.registry.scan() if rescan else self.registry.models()):
            d = info.to_dict()
            lm = self.loaded.get(info.name)
            d.update(lm.to_wire(now) if lm else {"state": "available"})
            d["name"] = info.name
            out.append(d)
        return out

    def model_dirs(self, state_dir: Path) -> list[Path]:
        return [state_dir / "models", *(Path(p) for p in self.cfg.models.dirs)]

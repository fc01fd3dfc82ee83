"""``models.list`` / ``show`` / ``load`` / ``unload`` / ``import`` / ``remove`` / ``set`` /
``unset``.

(``models.upload.*`` are the methods of ``infernod.daemon.uploads.Uploads``: an upload is a
small state machine of its own.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from infernod import model_settings
from infernod.backends import templates
from infernod.backends.gguf_meta import ModelInfo
from infernod.daemon.catalog import ModelCatalog
from infernod.daemon.memory import HOST
from infernod.daemon.models import ModelManager
from infernod.daemon.publisher import Publisher
from infernod.daemon.registry import Registry
from infernod.daemon.server import Call


class ModelHandlers:
    def __init__(self, catalog: ModelCatalog, registry: Registry, models: ModelManager,
                 publisher: Publisher) -> None:
        self.catalog = catalog
        self.registry = registry
        self.models = models
        self.publisher = publisher

    async def list(self, req: Call) -> dict[str, Any]:
        await self.catalog.wait_scanned()
        await self.catalog.scan_for(req)
        return {"models": self.models.list_models(rescan=False),
                "skipped": self.registry.skipped()}

    async def show(self, req: Call) -> dict[str, Any]:
        info = await self.catalog.lookup(req.body["model"], req)
        out = info.to_dict(include_template=True)
        own_template = self.models.settings.get(info.name).get("chat_template")
        out["chat_template_name"] = (templates.template_name_for(info) if not own_template
                                     else own_template if own_template
                                     in model_settings.TEMPLATE_NAMES else "custom")
        out["memory_estimate_bytes"] = self.models.estimate_bytes(info)
        out["memory"] = self._memory(info)
        lm = self.models.loaded.get(info.name)
        out.update(self.models.wire(lm, time.monotonic()) if lm else {"state": "available"})
        out["settings"] = self.models.effective_settings(info.name)
        return out

    def _memory(self, info: ModelInfo) -> dict[str, Any]:
        """What a load of ``info`` would take on each device (host RAM, each GPU) beside that
        device's budget and what the loaded models (this one excepted) hold there."""
        demand, layers = self.models.demand(info)
        others = [lm for lm in self.models.loaded.values() if lm.name != info.name]
        devices: dict[str, dict[str, Any]] = {HOST: {
            "estimate_bytes": demand[HOST], "budget_bytes": self.models.budget_bytes(),
            "used_bytes": sum(lm.memory_bytes for lm in others)}}
        for key, gpu in self.models.gpus().items():
            devices[key] = {"estimate_bytes": demand.get(key, 0), **gpu,
                            "used_bytes": sum(lm.gpu_bytes.get(key, 0) for lm in others)}
        support = self.models.cpu_support
        return {"n_gpu_layers": layers, "devices": devices,
                "gpu_offload_supported": support.gpu_offload_supported if support else None}

    async def set(self, req: Call) -> dict[str, Any]:
        """The model's own settings: validated by the config's (or the wire's) rules, kept
        in the state directory; what acts in the daemon applies at once, the rest on the
        next load."""
        info = await self.catalog.lookup(req.body["model"], req)
        values = {k: model_settings.check(k, model_settings.parse_text(k, v)
                                          if isinstance(v, str) else v)
                  for k, v in req.body["settings"].items()}
        return await self._change(info.name, values, ())

    async def unset(self, req: Call) -> dict[str, Any]:
        info = await self.catalog.lookup(req.body["model"], req)
        return await self._change(info.name, {}, tuple(req.body["keys"]))

    async def _change(self, name: str, values: dict[str, Any],
                      unset: tuple[str, ...]) -> dict[str, Any]:
        store = self.models.settings
        own = store.update(name, values, unset)
        await asyncio.get_running_loop().run_in_executor(None, store.save, store.snapshot())
        pending = self.models.settings_changed(name)
        changed = [*values, *unset]
        self.models.models_event("settings", name, changed=changed)
        return {"model": name, "settings": own, "changed": changed,
                "loaded": name in self.models.loaded, "next_load": pending}

    async def load(self, req: Call) -> dict[str, Any]:
        t0 = time.monotonic()
        await self.catalog.lookup(req.body["model"], req)
        lm = await self.models.ensure_loaded(req.body["model"], req.body.get("keep_alive"),
                                             operator=True)
        return {"model": lm.name, "state": lm.state, "load_s": round(time.monotonic() - t0, 3),
                "memory_bytes": lm.memory_bytes, **lm.engine_info()}

    async def unload(self, req: Call) -> dict[str, Any]:
        await self.models.unload(req.body["model"], f"unloaded by {req.principal}",
                                 cause="operator")
        return {"model": req.body["model"], "state": "unloaded"}

    async def import_(self, req: Call) -> dict[str, Any]:
        b = req.body
        loop = asyncio.get_running_loop()
        label = b.get("name") or Path(b["path"]).stem[:64]  # for progress events only
        publish = self.publisher.publish

        def progress(done: int, total: int, message: str) -> None:  # a worker thread's
            loop.call_soon_threadsafe(publish, "models", "progress", {
                "event": "progress", "model": label, "done_bytes": done,
                "total_bytes": total, "message": message})

        info = await loop.run_in_executor(None, lambda: self.registry.import_model(
            b["path"], b.get("name"), bool(b.get("link")), progress))
        self.models.models_event("imported", info.name)
        return {"model": info.name, "path": str(info.path)}

    async def remove(self, req: Call) -> dict[str, Any]:
        name = req.body["model"]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.registry.remove, name, set(self.models.loaded))
        store = self.models.settings
        if store.forget(name):
            await loop.run_in_executor(None, store.save, store.snapshot())
        self.models.models_event("removed", name)
        return {"model": name, "state": "removed"}

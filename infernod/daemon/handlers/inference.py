"""``generate``, ``embed``, ``infer`` and ``cancel``: work that runs on a model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from infernod.config import Config
from infernod.daemon.catalog import ModelCatalog
from infernod.daemon.lifecycle import RequestService
from infernod.daemon.onnx import onnx_request
from infernod.daemon.queue import QueueService
from infernod.daemon.requests import Kind, Request, RequestTable, State
from infernod.daemon.server import Call
from infernod.protocol.errors import InfernoError


class InferenceHandlers:
    def __init__(self, cfg: Callable[[], Config], catalog: ModelCatalog,
                 service: RequestService, queue: QueueService, requests: RequestTable) -> None:
        self.cfg = cfg  # read per request: SIGHUP replaces the daemon's config
        self.catalog = catalog
        self.requests = requests
        self.service = service  # every kind's lifecycle
        self.queue = queue

    async def generate(self, req: Call) -> dict[str, Any]:
        b = req.body
        info = await self.catalog.lookup(b["model"], req)
        self.service.models.check_role(info.name, req.role)
        template = None
        if b.get("messages") is not None:
            prompt, template = self.service.models.render_chat(info, b["messages"])
        else:
            prompt = b["prompt"]
        s = self.cfg().scheduler
        timeout_s = min(b.get("timeout_s") or s.timeout_s, s.max_timeout_s)
        stall_s = min(b.get("stall_timeout_s") or s.stall_timeout_s, s.max_stall_timeout_s)
        now = time.monotonic()
        deadline = req.header.get("deadline")
        deadline_mono = None if deadline is None else now + (deadline - time.time())
        if deadline_mono is not None and deadline_mono <= now:
            raise InfernoError("deadline_exceeded", "the deadline had already passed on arrival")
        request_id = f"{req.session}.{req.header['id']}"
        gen = Request(kind=Kind.GENERATE, request_id=request_id, session=req.session,
                      principal=req.principal, connection=req.connection, model=info.name,
                      prompt=prompt, body=b,
                      priority=b.get("priority") or "normal", submitted=now,
                      deadline=deadline_mono, timeout_s=timeout_s, stall_timeout_s=stall_s,
                      topic=f"tokens.{request_id}", client=b.get("client") or "")
        self.service.submit(gen)
        gen.hold, req.hold = req.hold, None  # the prompt stays in memory until gen finishes
        self.queue.admitted(gen.model)
        return {"request_id": request_id, "topic": gen.topic, "model": info.name,
                "chat_template": template}

    async def embed(self, req: Call) -> dict[str, Any]:
        info = await self.catalog.lookup(req.body["model"], req)
        self.service.models.check_role(info.name, req.role)
        return await self.service.call(onnx_request("embed", req, info, self.cfg()))

    async def infer(self, req: Call) -> dict[str, Any]:
        info = await self.catalog.lookup(req.body["model"], req)
        self.service.models.check_role(info.name, req.role)
        return await self.service.call(onnx_request("infer", req, info, self.cfg()))

    async def cancel(self, req: Call) -> dict[str, Any]:
        """A generation, or a waiting or running embed/infer (same ids, same rule)."""
        rid = req.body["request_id"]
        target = self.requests.get(rid)
        if target is None or target.state is State.DONE:
            raise InfernoError("unknown_request", f"no active request {rid}")
        # the owner is the session that sent it, from the same principal: a session id is
        # visible to everyone (queue.list), the principal is the kernel's or the key's word
        owner = target.session == req.session and req.acts_for(target.principal,
                                                               target.connection)
        if not owner and req.role != "operator":
            raise InfernoError("forbidden", "only the request's owner or an operator may "
                                            "cancel it", "ask an operator")
        return {"request_id": rid, "state": self.service.cancel(rid)}

"""``jobs.submit`` / ``get`` / ``list`` / ``cancel``: stored batches of prompts.

A job is its owner's (the principal that submitted it); reading or cancelling another's
needs the operator role. The principal is the security layer's (uid:N from SO_PEERCRED,
key:NAME from CURVE), never a body field, so it cannot be named by someone else."""

from __future__ import annotations

from typing import Any

from infernod.backends.grammar import request_grammar
from infernod.daemon.catalog import ModelCatalog
from infernod.daemon.jobs import JobService
from infernod.daemon.jobstore import Job
from infernod.daemon.models import ModelManager
from infernod.daemon.server import Call
from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import GENERATION_PARAMS

JOB_PAGE_ITEMS = 1000  # jobs.get items per reply unless the request says otherwise
JOB_LIST_LIMIT = 100  # jobs.list rows unless the request says otherwise
# the body fields a job keeps for its items (the rest describe the job itself)
PARAM_KEYS = (*GENERATION_PARAMS, "timeout_s", "stall_timeout_s", "chat", "json_schema",
              "grammar")


def _check_owner(req: Call, job: Job, what: str) -> None:
    if job.owner != req.principal and req.role != "operator":
        raise InfernoError("forbidden", f"job {job.id} belongs to {job.owner}; only its owner "
                           f"or an operator may {what} it", "ask an operator")


class JobHandlers:
    def __init__(self, catalog: ModelCatalog, jobs: JobService, models: ModelManager) -> None:
        self.catalog = catalog
        self.jobs = jobs
        self.models = models  # the model's allowed_roles

    async def submit(self, req: Call) -> dict[str, Any]:
        b = req.body
        info = await self.catalog.lookup(b["model"], req)
        self.models.check_role(info.name, req.role)
        params = {k: b[k] for k in PARAM_KEYS if b.get(k) is not None}
        request_grammar(params)  # bad_schema now, not once per item
        job, created = await self.jobs.submit(req.principal, info.name, b["prompts"], params,
                                              b.get("priority") or "low",
                                              req.header.get("idem"), client=b.get("client"))
        return {"job_id": job.id, "created": created, "state": job.state,
                "items": len(job.items), "model": job.model, "priority": job.priority,
                "owner": job.owner}

    async def get(self, req: Call) -> dict[str, Any]:
        # A page of items per reply: a 10,000-item job's results would be tens of MB, built
        # and packed on the event loop in one piece.
        # The owner check first, on the job's summary: a stranger's request must not make
        # the store thread load (and hold) a page of up to 10,000 prompts and results.
        _check_owner(req, await self.jobs.summary(req.body["job_id"]), "read")
        offset = req.body.get("offset", 0)
        job = await self.jobs.get(req.body["job_id"], offset,
                                  req.body.get("limit", JOB_PAGE_ITEMS))
        out = job.to_wire()
        total = sum(job.counts.values())
        end = offset + len(job.items)
        out.update(items_offset=offset, items_total=total,
                   next_offset=end if end < total else None)
        return out

    async def list(self, req: Call) -> dict[str, Any]:
        b = req.body
        owner = b.get("owner")
        if req.role != "operator":  # a monitor lists its own jobs only
            if owner not in (None, req.principal):
                raise InfernoError("forbidden", "only an operator may list another "
                                   "principal's jobs", "ask an operator")
            owner = req.principal
        found = await self.jobs.list(state=b.get("state"), model=b.get("model"), owner=owner,
                                     client=b.get("client"), since=b.get("since"),
                                     limit=b.get("limit") or JOB_LIST_LIMIT)
        return {"jobs": [j.to_wire() for j in found]}

    async def cancel(self, req: Call) -> dict[str, Any]:
        _check_owner(req, await self.jobs.summary(req.body["job_id"]), "cancel")
        job, n = await self.jobs.cancel(req.body["job_id"])
        return {"job_id": job.id, "state": job.state, "cancelled_items": n,
                "counts": job.counts}

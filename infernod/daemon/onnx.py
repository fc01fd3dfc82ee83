"""What is particular to the ONNX kinds (``embed``, ``infer``): the record built from a
request, which waiting requests share a run, a run's arguments and its reply.

    handler -> onnx_request -> RequestService.call (daemon/lifecycle.py: the scheduler, the
            model's load, a slot) -> pick_batch + run_args -> the model's runner process
            (OnnxEngine's worker thread owns the session) -> reply -> the handler's future

Embed and infer are request/reply, not streams. They queue in the same scheduler as
generation (priorities, aging, deadlines, backpressure) and take its slots: an ONNX model
has one, so it runs one run at a time. When several ``embed`` requests for a model wait, the
next run takes them together (in the scheduler's pick order, up to ``onnx.max_batch``
texts), so a burst of small requests costs one forward pass per batch. A GGUF model embeds
too (llama.cpp's embeddings, in its runner's embedding context): its embeds queue with its
generations, take its slots, and go to its runner as one ``run`` per dispatch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from infernod.backends.onnx_engine import RunDone
from infernod.daemon.requests import Kind, Request
from infernod.daemon.scheduler import QueueItem, Scheduler
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo
    from infernod.config import Config
    from infernod.daemon.server import Call

EMBED_HINT = ("embed needs an ONNX embedding model (a directory with model.onnx and "
              "tokenizer.json); 'inferno models convert-onnx' exports all-MiniLM-L6-v2")


@runtime_checkable
class RunEngine(Protocol):
    """What a run needs of an engine: an ONNX model's (``OnnxRunEngine``), or a GGUF
    model's runner proxy, whose runs are embeds in the model's embedding context."""

    def run(self, op: str, args: dict[str, Any], on_done: RunDone) -> int: ...


def onnx_request(op: str, req: Call, info: ModelInfo, cfg: Config) -> Request:
    """The record of an ``embed`` / ``infer`` for a model the registry knows, or the error
    that refuses it (a model of the wrong kind, a deadline already passed)."""
    onnx = info.onnx
    if op == "embed" and info.kind == "gguf":
        pass  # llama.cpp's embeddings, in the model's runner
    elif info.kind != "onnx" or onnx is None:
        hint = EMBED_HINT if op == "embed" else "use 'generate' for GGUF language models"
        raise InfernoError("not_supported", f"{info.name} is a {info.kind} model; {op} "
                           "runs ONNX models", hint)
    elif op == "embed" and onnx.get("kind") != "embedding":
        raise InfernoError("not_supported", f"{info.name} is a generic ONNX model (inputs "
                           f"{', '.join(i['name'] for i in onnx['inputs'])}), not a text "
                           "encoder with a tokenizer", "use 'infer' with named arrays")
    b = req.body
    s = cfg.scheduler
    now = time.monotonic()
    deadline = req.header.get("deadline")
    deadline_mono = None if deadline is None else now + (deadline - time.time())
    if deadline_mono is not None and deadline_mono <= now:
        raise InfernoError("deadline_exceeded", "the deadline had already passed on arrival")
    # the same request id as generate's, so `cancel` can name a pending embed/infer
    return Request(kind=Kind(op), request_id=f"{req.session}.{req.header['id']}",
                   session=req.session, principal=req.principal,
                   connection=req.connection, model=info.name, body=b,
                   priority=b.get("priority") or "normal", submitted=now,
                   deadline=deadline_mono,
                   timeout_s=min(b.get("timeout_s") or s.timeout_s, s.max_timeout_s),
                   client=b.get("client") or "",
                   future=asyncio.get_running_loop().create_future())


def pick_batch(scheduler: Scheduler, model: str, now: float, max_texts: int,
               live: Callable[[QueueItem], Request | None]) -> list[Request]:
    """The next run of ``model``: one infer, or embeds in pick order up to ``max_texts``
    texts. Items are taken one at a time so the scheduler's order decides; the first that
    cannot join (an infer, or too many texts) is put back with ``requeue``, which keeps its
    age and so its place at the head. ``live`` drops a stale pick (already ended)."""
    batch: list[Request] = []
    texts = 0
    while True:
        items = scheduler.pop_ready(model, 1, now)
        if not items:
            return batch
        req = live(items[0])
        if req is None:
            continue
        if not batch:
            batch.append(req)
            texts = req.n_texts
            if req.kind is not Kind.EMBED:
                return batch
            continue
        if req.kind is not Kind.EMBED or texts + req.n_texts > max_texts:
            scheduler.requeue(items[0], now)
            return batch
        batch.append(req)
        texts += req.n_texts


def run_args(batch: list[Request]) -> dict[str, Any]:
    """The runner's arguments for ``batch``'s run (wire arrays, as the client sent them)."""
    if batch[0].kind is Kind.EMBED:
        return {"requests": [[list(r.body.get("texts") or []),
                              r.body.get("normalize", True) is not False] for r in batch]}
    return {"inputs": batch[0].body["inputs"]}


def reply(req: Request, i: int, batch: list[Request], result: dict[str, Any],
          provider: str | None) -> dict[str, Any]:
    """``req``'s reply from its run's ``result`` (``i``: its place in the batch), with the
    run's stats under ``stats`` (the lifecycle adds the final ones)."""
    stats: dict[str, Any] = {"run_ms": round(result["run_ms"], 3)}
    out: dict[str, Any]
    if req.kind is Kind.EMBED:
        r = result["results"][i]
        stats.update(tokenize_ms=round(result["tokenize_ms"], 3),
                     prefill_ms=round(result["run_ms"], 3),
                     prompt_tokens=sum(r["tokens"]), batch_requests=len(batch),
                     batch_texts=result["texts"])
        out = {"model": req.model, "dim": r["dim"], "vectors": r["vectors"],
               "truncated": r["truncated"], "tokens": r["tokens"],
               "max_length": result["max_length"],
               "normalized": req.body.get("normalize", True) is not False}
    else:
        out = {"model": req.model, "outputs": result["outputs"]}
    stats["provider"] = provider
    out["stats"] = stats
    return out

"""The runner protocol: one msgpack array per ZeroMQ message, ``[op, *args]``.

Daemon -> runner (the daemon's ROUTER adds the runner's routing id in front):

    ["load", engine_kwargs]          first message, answers the runner's "hello";
                                     {"backend": "onnx", ...}: an OnnxEngine, else GGUF
    ["submit", request]              a GenerationRequest as a map (see request_to_wire)
    ["cancel", request_id] / ["preempt", request_id]
    ["close"]                        finish: abort what runs, free the model, exit 0
    ["run", run_id, op, args]        ONNX runners: run op "embed" ({"requests": [[texts,
                                     normalize], ...]}) or "infer" ({"inputs": {name: wire
                                     array}}); run ids are the daemon's, increasing
    ["terminate", run_id]            ONNX: stop that run (it then fails with "cancelled")

Runner -> daemon:

    ["hello", {"pid": int}]          once connected
    ["ready", {"memory": {...}, "n_slots": int, "info": {...}}]   the model is loaded
    ["load_failed", {"code", "message", "hint"}]                   a clean load failure
    ["events", [[kind, request_id, ...], ...]]  sink events of one decode step, in order:
        ["s", rid, info] started, ["t", rid, text, n] tokens (["t", rid, text, n, logprobs]
        when the request asked for logprobs: one entry per token),
        ["f", rid, reason, stats] finished, ["e", rid, code, message, hint] error
        ONNX runners: ["r", run_id, result] a run's result (embed_batch / infer_one's map),
        ["x", run_id, {"code", "message", "hint"}] a run's error
    ["info", wire_info]              host-cache counters when changed: before an events batch
                                     that starts or ends a request, else at most once a second

A crash is not a message: the daemon sees the process end (pidfd) and reports the signal.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import msgpack

from infernod.backends.base import GenerationRequest, SamplingParams

# runner -> daemon event kinds (single letters: a batch of 8 streams' tokens stays small)
STARTED, TOKENS, FINISHED, ERROR = "s", "t", "f", "e"
RESULT, FAILED = "r", "x"  # an ONNX run's result or error


def pack(*parts: Any) -> bytes:
    packed: bytes = msgpack.packb(list(parts), use_bin_type=True)
    return packed


def unpack(data: bytes) -> list[Any]:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise ValueError("runner message is not [op, ...]")
    return msg


def request_to_wire(req: GenerationRequest) -> dict[str, Any]:
    return asdict(req)


def request_from_wire(body: dict[str, Any]) -> GenerationRequest:
    body = dict(body)
    body["sampling"] = SamplingParams(**body.get("sampling", {}))
    return GenerationRequest(**body)

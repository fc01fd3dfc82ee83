"""What is particular to the generating kinds (generate, job item): the parameters a
request runs with and the engine request a text engine's runner is handed. Their lifecycle
is every kind's (daemon/lifecycle.py)."""

from __future__ import annotations

from typing import Any

from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.backends.grammar import request_grammar
from infernod.daemon.requests import Request
from infernod.protocol.vocabulary import SAMPLING_KEYS


def params(gen: Request, model_defaults: dict[str, Any]) -> dict[str, Any]:
    """The body's generation parameters over the model's own defaults (a request's value
    wins; the engine's defaults fill the rest)."""
    return {**model_defaults, **{k: v for k, v in gen.body.items() if v is not None}}


def engine_request(gen: Request, b: dict[str, Any]) -> GenerationRequest:
    """``gen`` as its model's text engine takes it, with its parameters ``b`` (again after
    a preemption: with the tokens it had generated, which the engine re-evaluates and does
    not emit twice)."""
    sampling = SamplingParams(**{k: b[k] for k in SAMPLING_KEYS if b.get(k) is not None})
    return GenerationRequest(
        request_id=gen.request_id, prompt=gen.prompt,
        max_tokens=b.get("max_tokens") or 256, stop=list(b.get("stop") or []),
        sampling=sampling, add_bos=True, resume_tokens=list(gen.resume_tokens),
        ignore_eos=bool(b.get("ignore_eos")), priority=gen.priority,
        logprobs=(b.get("top_logprobs") or 0) if b.get("logprobs") else None,
        grammar=request_grammar(b),
    )

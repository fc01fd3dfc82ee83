"""Per-request and per-slot state of the GGUF engine, and the stats derived from it.

Pure Python: the decode thread owns these objects; nothing here touches llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infernod.backends.base import GenerationRequest
from infernod.backends.textstream import TextStream

if TYPE_CHECKING:
    from infernod.backends.checkpoints import Checkpoint

_NS_PER_MS = 1e6


@dataclass
class Run:
    """One request occupying a slot, from admission to finish."""

    req: GenerationRequest
    submit_ns: int
    tokens: list[int]  # prompt + resume tokens: the context to evaluate before sampling
    n_resume: int
    sampler: Any
    text: TextStream
    greedy: bool = False  # plain greedy: the step takes the argmax, not the sampler chain
    grammar: Any = None  # llama.cpp grammar sampler (grammar_sampling.py), or None
    n_done: int = 0  # how many of ``tokens`` are in the KV cache
    checkpoint_at: list[int] = field(default_factory=list)  # ascending, see checkpoints.plan
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, delivered, not yet in the KV cache
    unsent_tokens: int = 0
    unsent_logprobs: list[dict[str, Any]] = field(default_factory=list)  # one per unsent token
    tokenize_ns: int = 0
    admit_ns: int = 0
    first_ns: int = 0
    last_ns: int = 0
    detok_ns: int = 0
    itl_ns: list[int] = field(default_factory=list)

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        """The logprobs of the tokens about to be sent (None: the request did not ask)."""
        if self.req.logprobs is None:
            return None
        out, self.unsent_logprobs = self.unsent_logprobs, []
        return out

    def stats(self, reason: str) -> dict[str, Any]:
        """The on_finished stats; durations in ms, ``generated_tokens`` includes resume tokens."""
        end = self.last_ns or time.perf_counter_ns()
        n = len(self.generated)
        itl = sorted(self.itl_ns)
        decode_ns = (self.last_ns - self.first_ns) if self.first_ns else 0
        stats: dict[str, Any] = {
            "finish_reason": reason,
            "prompt_tokens": len(self.tokens),
            "prompt_cached_tokens": self.cached,
            "completion_tokens": n,
            "tokenize_ms": self.tokenize_ns / _NS_PER_MS,
            "prefill_ms": ((self.first_ns or end) - self.admit_ns) / _NS_PER_MS,
            "decode_ms": decode_ns / _NS_PER_MS,
            "detokenize_ms": self.detok_ns / _NS_PER_MS,
            "ttft_ms": (self.first_ns - self.submit_ns) / _NS_PER_MS if self.first_ns else None,
            "itl_ms": {
                "mean": sum(itl) / len(itl) / _NS_PER_MS if itl else None,
                "p50": itl[len(itl) // 2] / _NS_PER_MS if itl else None,
                "max": itl[-1] / _NS_PER_MS if itl else None,
            },
            "tokens_per_s": (len(itl) / (decode_ns / 1e9)) if decode_ns > 0 else None,
            # Every gap in order, for the daemon's profiler (token-weighted ITL percentiles).
            "itl_gaps_ms": [g / _NS_PER_MS for g in self.itl_ns],
        }
        # Resume tokens included: a preempted request is resubmitted with exactly this list.
        stats["generated_tokens"] = list(self.req.resume_tokens) + self.generated
        return stats


def unstarted_stats(req: GenerationRequest, reason: str) -> dict[str, Any]:
    """The on_finished stats of a request that never ran (stopped while queued, or nothing
    left to generate after a preemption)."""
    return {"finish_reason": reason, "prompt_tokens": 0, "prompt_cached_tokens": 0,
            "completion_tokens": 0, "generated_tokens": list(req.resume_tokens)}


@dataclass
class Slot:
    """A llama.cpp sequence id; ``kv`` mirrors exactly the tokens whose cells it holds, and
    ``checkpoints`` are window checkpoints of a prefix of them (checkpoints.py)."""

    seq_id: int
    kv: list[int] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    run: Run | None = None
    released_ns: int = 0


def window_holds(pos_min: int, n: int, n_swa: int) -> bool:
    """Can cells whose smallest position is ``pos_min`` serve a prefix of ``n`` tokens? With a
    trimmed sliding-window cache (``n_swa`` > 0) the token at position n sees positions
    n - n_swa + 1 .. n - 1, so those must still be there; llama.cpp only overwrites cells
    outside the window of their sequence's last position. ``pos_min`` < 0: nothing held."""
    return n_swa <= 0 or 0 <= pos_min <= max(0, n - n_swa + 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""Types shared by the daemon and its backends. Pure data: no native imports."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one request. temperature == 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One generation handed to an engine.

    Either ``prompt`` (text, tokenized by the engine) or ``prompt_tokens`` is set.
    ``resume_tokens`` are tokens already generated and delivered before a preemption: the
    engine evaluates them as part of the context and does not emit them again.
    """

    request_id: str
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    add_bos: bool = True
    resume_tokens: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # "vip" prompts are prefilled in a step of their own, ahead of everyone's next token:
    # the one place where a class changes how the engine batches (see GgufEngine._fill_batch).
    priority: str = "normal"
    # None: no log-probabilities; N (0..20): each token's, with its N most likely
    # alternatives (backends/logprobs.py), in the token event that delivers its text.
    logprobs: int | None = None
    # A GBNF grammar (root rule "root") the output must match: a json_schema converted by the
    # daemon (backends/grammar.py), or the client's own. Enforced in the sampler chain.
    grammar: str | None = None


class EngineSink(Protocol):
    """Receives an engine's events. Called from the engine's decode thread."""

    def on_started(self, request_id: str, info: dict[str, Any]) -> None: ...

    def on_tokens(self, request_id: str, text: str, n_tokens: int,
                  logprobs: list[dict[str, Any]] | None = None) -> None:
        """``text`` holds ``n_tokens`` tokens; ``logprobs`` (when the request asked) has one
        entry per token, in order."""
        ...

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None: ...

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None: ...


class GuardedSink:
    """An engine's sink as the engine calls it: each call goes to ``sink`` (if any), and an
    exception it raises is logged, never let into the decode thread."""

    def __init__(self, sink: EngineSink | None) -> None:
        self.sink = sink

    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        if self.sink is not None:
            try:
                self.sink.on_started(request_id, info)
            except Exception:
                log.exception("sink.on_started failed for request %s", request_id)

    def on_tokens(self, request_id: str, text: str, n_tokens: int,
                  logprobs: list[dict[str, Any]] | None = None) -> None:
        if self.sink is not None:
            try:
                if logprobs is None:  # sinks that never ask for logprobs take three arguments
                    self.sink.on_tokens(request_id, text, n_tokens)
                else:
                    self.sink.on_tokens(request_id, text, n_tokens, logprobs)
            except Exception:
                log.exception("sink.on_tokens failed for request %s", request_id)

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        if self.sink is not None:
            try:
                self.sink.on_finished(request_id, reason, stats)
            except Exception:
                log.exception("sink.on_finished failed for request %s", request_id)

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        if self.sink is not None:
            try:
                self.sink.on_error(request_id, code, message, hint)
            except Exception:
                log.exception("sink.on_error failed for request %s", request_id)


class Engine(Protocol):
    """What the daemon asks of any loaded engine, GGUF or ONNX (``ModelManager``,
    ``QueueService``). Called from the event loop; ``close`` blocks (run it in an executor)."""

    @property
    def n_slots(self) -> int:
        """Requests it runs at once."""
        ...

    def free_slots(self) -> int: ...

    def preempt(self, request_id: str) -> None:
        """Pause a running request (it finishes with reason "preempted"); may do nothing."""
        ...

    def memory_bytes(self) -> dict[str, int] | None:
        """Measured memory after load (``total_bytes`` at least); None: not measured, the
        registry's estimate stands."""
        ...

    def wire_info(self) -> dict[str, Any]:
        """Fields ``models.list``/``models.show``/``models`` events add for it."""
        ...

    def close(self) -> None: ...


class GenerationEngine(Engine, Protocol):
    """An engine that generates text (``GgufEngine``, or its proxy in the daemon): what
    ``RequestService`` drives. Thread-safe; events come back through an ``EngineSink``."""

    def submit(self, request: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> None: ...

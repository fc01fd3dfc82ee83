"""Types shared by the daemon and its backends. Pure data: no native imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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


class EngineSink(Protocol):
    """Receives an engine's events. Called from the engine's decode thread."""

    def on_started(self, request_id: str, info: dict[str, Any]) -> None: ...

    def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None: ...

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None: ...

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None: ...

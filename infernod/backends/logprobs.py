"""Log-probabilities of sampled tokens (OpenAI's ``logprobs`` / ``top_logprobs``).

Computed only for requests that ask, on the decode thread, from the raw logits llama.cpp
holds for the sequence's batch position: a log-softmax over the whole vocabulary (as
llama-server and OpenAI report them: before temperature, penalties or a grammar), read in
place through the logits pointer and vectorised with numpy. Gemma 3's 262,144-entry
vocabulary costs about a millisecond per token; a request without logprobs costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_TOP = 20  # OpenAI's limit on top_logprobs

Piece = Callable[[int], bytes]


def entry(token: int, logprob: float, piece: Piece) -> dict[str, Any]:
    """One token as the wire carries it: id, text (invalid UTF-8 replaced), logprob and the
    token's raw bytes (a character split over tokens is whole only in the bytes)."""
    data = piece(token)
    return {"id": token, "token": data.decode("utf-8", "replace"), "logprob": logprob,
            "bytes": list(data)}


def token_logprobs(logits: Any, token: int, top_n: int, piece: Piece) -> dict[str, Any]:
    """``{id, token, logprob, bytes, top: [...]}`` for ``token`` given the logits row (a
    float32 numpy view); ``top`` holds the ``top_n`` most likely tokens, most likely first
    (ties: lower id first, as llama.cpp's greedy pick)."""
    import numpy as np

    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    out = entry(token, float(logits[token]) - lse, piece)
    top: list[dict[str, Any]] = []
    if top_n > 0:
        n = min(top_n, MAX_TOP, logits.shape[0])
        ids = np.argpartition(logits, -n)[-n:]
        order = np.lexsort((ids, -logits[ids]))
        top = [entry(int(t), float(logits[t]) - lse, piece) for t in ids[order]]
    out["top"] = top
    return out


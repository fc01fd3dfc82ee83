"""Sampling under a grammar the way llama-server does: the grammar checks the chosen token.

Applying a llama.cpp grammar to every candidate costs a walk of the grammar's stacks for each
of the vocabulary's tokens (262,144 for Gemma 3), several times what the decode itself costs
on a small model. llama.cpp's ``common_sampler_sample`` (``grammar_first = false``, what
llama-server does) samples from the unconstrained logits first and asks the grammar only
about the chosen token; only when the grammar rejects it are the candidates rebuilt, the
grammar applied to all of them and the token sampled again. :class:`GrammarSampling` does the
same with the grammar sampler of the low-level API: it applies the grammar to a one-entry
candidate array to test a token, and accepts the final token into the grammar (and into the
chain: penalties count only what was kept).

Greedy picks the same token either way: if the unconstrained argmax passes the grammar it is
also the argmax of what the grammar allows (ties go to the lower id in both). When it does
not, greedy asks about the next most likely tokens one at a time (the first allowed is the
allowed argmax) and masks the whole vocabulary only if none of the top few passes. Sampling draws
from the same distribution without truncation (rejection sampling); with top-k/top-p the
truncation is computed before the grammar instead of after, as llama-server does.

Decode thread only: the candidate buffer is shared by every request of an engine.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

from infernod.backends import llama_native as native

TOP_TRIES = 32  # greedy: how many likely tokens are asked alone before masking them all
_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama_token_data, 12 bytes


class GrammarSampling:
    """Token choice for requests with a grammar; counts how often the grammar refused the
    first choice (``resampled``) out of ``checked`` tokens."""

    def __init__(self, n_vocab: int, grammar_first: bool = False) -> None:
        self.n_vocab = n_vocab
        self.grammar_first = grammar_first  # True: the grammar sees every candidate, always
        self.checked = 0
        self.resampled = 0
        self._buf: Any = None  # numpy structured array of llama_token_data, made on first use
        self._ids: Any = None
        self._all: Any = None  # llama_token_data_array over _buf
        self._one: Any = None  # one llama_token_data and its array, for the check
        self._one_arr: Any = None

    def sample(self, ctx: Any, idx: int, grammar: Any, chain: Any | None) -> int:
        """The token for batch position ``idx``, accepted into ``grammar`` (and ``chain``).
        ``chain`` None means plain greedy: the argmax, without a sampler chain."""
        llama = native.bindings()
        if self.grammar_first:
            token = self._sample_all(ctx, idx, grammar, chain)
        else:
            self.checked += 1
            if chain is None:
                token = native.argmax_token(ctx, idx, self.n_vocab)
            else:
                token = self._apply_chain(self._fill(ctx, idx), chain)
            if not self.allows(grammar, token):
                self.resampled += 1
                first = self._first_allowed(ctx, idx, grammar) if chain is None else None
                token = first if first is not None else self._sample_all(ctx, idx, grammar,
                                                                         chain)
        llama.llama_sampler_accept(grammar, token)
        if chain is not None:
            llama.llama_sampler_accept(chain, token)
        return token

    def allows(self, grammar: Any, token: int) -> bool:
        """Whether the grammar, in its current state, lets ``token`` come next."""
        llama = native.bindings()
        if self._one is None:
            self._one = llama.llama_token_data()
            self._one_arr = llama.llama_token_data_array(
                ctypes.pointer(self._one), 1, -1, False)
        one, arr = self._one, self._one_arr
        one.id, one.logit, one.p = token, 1.0, 0.0
        arr.size, arr.selected, arr.sorted = 1, -1, False
        llama.llama_sampler_apply(grammar, ctypes.byref(arr))
        return bool(one.logit != -math.inf)

    def _first_allowed(self, ctx: Any, idx: int, grammar: Any) -> int | None:
        """Greedy after a refusal: the most likely tokens in order (ties: lower id first),
        each asked alone, and the first the grammar allows: the argmax of what it allows,
        for a few single-token checks instead of the whole vocabulary. None when none of
        the :data:`TOP_TRIES` most likely (strictly above the next one's logit) is allowed."""
        import numpy as np

        row = native.logits_row(ctx, idx, self.n_vocab)
        top = np.argpartition(row, -TOP_TRIES)[-TOP_TRIES:]
        cand = top[row[top] > row[top].min()]  # a tie across the cut could hide a lower id
        for tok in cand[np.lexsort((cand, -row[cand]))]:
            if self.allows(grammar, int(tok)):
                return int(tok)
        return None

    def _sample_all(self, ctx: Any, idx: int, grammar: Any, chain: Any | None) -> int:
        """The grammar over every candidate, then the chain (or the argmax)."""
        arr = self._fill(ctx, idx)
        native.bindings().llama_sampler_apply(grammar, ctypes.byref(arr))
        if chain is None:  # the grammar only masks (-inf): data is still in id order
            return int(self._buf["logit"].argmax())
        return self._apply_chain(arr, chain)

    def _fill(self, ctx: Any, idx: int) -> Any:
        """The candidate array holding position ``idx``'s logits, in id order (samplers
        sort and shrink it in place, so every use starts from a fresh copy)."""
        import numpy as np

        llama = native.bindings()
        if self._buf is None:
            self._buf = np.empty(self.n_vocab, dtype=np.dtype(_TOKEN_DATA))
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._all = llama.llama_token_data_array()
        buf = self._buf
        buf["id"] = self._ids
        buf["logit"] = native.logits_row(ctx, idx, self.n_vocab)
        buf["p"] = 0.0
        arr = self._all
        arr.data = buf.ctypes.data_as(ctypes.POINTER(llama.llama_token_data))
        arr.size, arr.selected, arr.sorted = self.n_vocab, -1, False
        return arr

    def _apply_chain(self, arr: Any, chain: Any) -> int:
        native.bindings().llama_sampler_apply(chain, ctypes.byref(arr))
        if arr.selected < 0:
            raise RuntimeError("the sampler chain selected no token")
        return int(arr.data[arr.selected].id)

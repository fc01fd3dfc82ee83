"""Thin helpers over llama-cpp-python's low-level bindings (``llama_cpp.llama_cpp``).

Everything that builds native objects for the GGUF engine and is not about scheduling lives
here, so gguf.py reads as the batching loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

from infernod.backends.base import SamplingParams
from infernod.protocol.errors import InfernoError


def bindings() -> Any:
    """Import the native bindings lazily: importing this module must stay cheap."""
    import llama_cpp.llama_cpp as llama

    return llama


def rss_bytes() -> int:
    """Resident set size of this process (Linux), used to measure what a load really costs."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5. Its INFO
# is a line per tensor and metadata key at every load: debug for us.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING,
           4: logging.ERROR}
_CONT = 5
llama_log = logging.getLogger("llama.cpp")
_partial = threading.local()  # llama.cpp logs a line in pieces, from whichever thread works
_callback: Any = None  # the ctypes callback must outlive every call into llama.cpp


def _on_log(level: int, text: bytes | None, _user: Any) -> None:
    piece = (text or b"").decode("utf-8", "replace")
    if level != _CONT:
        _partial.level = _LEVELS.get(level, logging.DEBUG)
    buf = getattr(_partial, "buf", "") + piece
    *lines, rest = buf.split("\n")
    _partial.buf = rest
    for line in lines:
        if line.strip():
            llama_log.log(getattr(_partial, "level", logging.DEBUG), "%s", line.rstrip())


def route_logs() -> None:
    """Send llama.cpp's log to the ``llama.cpp`` logger (warnings and errors show in the
    daemon's log, its per-tensor chatter only at debug level) instead of the stderr printer
    llama-cpp-python installs, whose level table predates llama.cpp's DEBUG level and so
    hides real errors while printing warnings."""
    global _callback
    if _callback is not None:
        return
    llama = bindings()
    _callback = llama.llama_log_callback(_on_log)
    llama.llama_log_set(_callback, ctypes.c_void_p(0))


def load_model(path: Path, n_gpu_layers: int) -> Any:
    """Load a GGUF model's weights (``n_gpu_layers`` of them offloaded)."""
    llama = bindings()
    params = llama.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        # A file llama.cpp refuses (unknown architecture, missing tensors) is not a bug here.
        raise InfernoError("not_supported", f"llama.cpp could not load {path.name}",
                           "check that the file is a complete GGUF model of an architecture "
                           "this llama.cpp supports; the daemon log has llama.cpp's reason")
    return model


def create_context(
    model: Any,
    *,
    n_cells: int,
    n_seq_max: int,
    n_batch: int,
    n_threads: tuple[int, int],
    swa_full: bool,
    flash_attn: str,
) -> Any:
    """A context with a unified KV cache of ``n_cells`` cells shared by ``n_seq_max`` sequence
    ids; one ubatch per batch; outputs capped at one per sequence id (llama.cpp reserves that
    many; the logits buffer for a full prompt batch of a 262k vocab would be ~250 MiB).
    ``insufficient_memory`` when llama.cpp cannot allocate it."""
    llama = bindings()
    p = llama.llama_context_default_params()
    p.n_ctx = n_cells
    p.n_seq_max = n_seq_max
    p.n_batch = p.n_ubatch = n_batch
    p.n_outputs_max = n_seq_max
    p.n_threads, p.n_threads_batch = n_threads
    p.kv_unified = True
    p.swa_full = swa_full
    p.no_perf = True
    p.flash_attn_type = {"auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,  # on where the backend can
                         "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                         "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
    ctx = llama.llama_init_from_model(model, p)
    if not ctx:
        raise InfernoError("insufficient_memory",
                           f"llama.cpp could not create a context of {n_cells} cells",
                           "lower n_ctx or n_slots for this model")
    return ctx


def free_samplers(*samplers: Any) -> None:
    """A run's sampler chain and its grammar (None where it has none)."""
    llama = bindings()
    for sampler in samplers:
        if sampler is not None:
            llama.llama_sampler_free(sampler)


def seq_state(mem: Any, seq_id: int, kv: list[int], request_id: str | None) -> dict[str, Any]:
    """Diagnostics of one sequence id: what it holds by our bookkeeping and by llama.cpp's."""
    llama = bindings()
    return {
        "seq_id": seq_id,
        "request_id": request_id,
        "kv_tokens": len(kv),
        "pos_min": int(llama.llama_memory_seq_pos_min(mem, seq_id)),
        "pos_max": int(llama.llama_memory_seq_pos_max(mem, seq_id)),
    }


def warm_up(ctx: Any, mem: Any, batch: Any, vocab: Any, n: int) -> None:
    """Decode one full batch of ``n`` BOS tokens (sequence 0), then clear the cache."""
    llama = bindings()
    bos = int(llama.llama_vocab_bos(vocab))
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = bos, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == n - 1
    batch.n_tokens = n
    rc = llama.llama_decode(ctx, batch)
    llama.llama_memory_clear(mem, True)
    if rc != 0:
        raise InfernoError("internal", f"warm-up decode failed (llama_decode returned {rc})")


class Pieces:
    """Token -> its bytes (special tokens render as nothing), reusing one buffer: one
    thread at a time."""

    def __init__(self, vocab: Any = None) -> None:
        self.vocab = vocab
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        llama = bindings()
        buf = self._buf
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            self._buf = buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]


def tokenize(vocab: Any, text: str, add_bos: bool, special: bool) -> list[int]:
    """Tokenize text; the vocabulary is read-only, so any thread may call this."""
    llama = bindings()
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (llama.llama_token * cap)()
    n = llama.llama_tokenize(vocab, data, len(data), buf, cap, add_bos, special)
    if n < 0:
        cap = -n
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(vocab, data, len(data), buf, cap, add_bos, special)
    return list(buf[:n])


def _penalised(sp: SamplingParams) -> bool:
    return sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0


def plain_greedy(sp: SamplingParams) -> bool:
    """Greedy with no penalties: the token is the logits' argmax, which :func:`argmax_token`
    finds without a sampler chain."""
    return sp.temperature <= 0.0 and not _penalised(sp)


def logits_row(ctx: Any, idx: int, n_vocab: int) -> Any:
    """The logits of batch position ``idx`` as a float32 numpy view, read in place (valid
    until the next decode)."""
    import numpy as np

    row = bindings().llama_get_logits_ith(ctx, idx)
    if not row:
        raise InfernoError("internal", f"no logits for batch position {idx}")
    return np.ctypeslib.as_array(row, shape=(n_vocab,))


def argmax_token(ctx: Any, idx: int, n_vocab: int) -> int:
    """The highest-logit token of batch position ``idx``, read in place: the first of equal
    maxima, as llama.cpp's greedy sampler picks. ``llama_sampler_sample`` first copies the
    whole vocabulary (262,144 entries for Gemma 3, 3 MiB) into candidates per sequence and
    step; numpy's argmax over the logits row costs a small fraction of that."""
    return int(logits_row(ctx, idx, n_vocab).argmax())


def make_grammar(vocab: Any, grammar: str, resume: list[int]) -> Any:
    """llama.cpp's grammar sampler for one request, past ``resume`` (tokens generated before
    a preemption, already matched against it). The engine asks it about each chosen token
    (grammar_sampling.py) rather than putting it in the chain. Raises ``bad_schema`` when
    llama.cpp refuses the grammar."""
    llama = bindings()
    g = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not g:
        raise InfernoError("bad_schema", "llama.cpp could not parse the grammar (the "
                           "daemon log has its reason)", "check the GBNF grammar: "
                           "https://github.com/ggml-org/llama.cpp/blob/master/grammars/"
                           "README.md")
    for tok in resume:
        llama.llama_sampler_accept(g, tok)
    return g


def make_sampler(n_vocab: int, sp: SamplingParams, context: list[int]) -> Any:
    """A C sampler chain for one request: penalties -> greedy when temperature is 0, else
    top_k -> top_p -> min_p -> temperature -> seeded dist. Penalties see the prompt tail."""
    llama = bindings()
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    add = llama.llama_sampler_chain_add
    if _penalised(sp):
        pen = llama.llama_sampler_init_penalties(
            n_vocab, sp.repeat_last_n, sp.repeat_penalty, sp.frequency_penalty,
            sp.presence_penalty)
        for tok in context[-max(sp.repeat_last_n, 0) :] if sp.repeat_last_n else []:
            llama.llama_sampler_accept(pen, tok)
        add(chain, pen)
    if sp.temperature <= 0.0:
        add(chain, llama.llama_sampler_init_greedy())
    else:
        if sp.top_k > 0:
            add(chain, llama.llama_sampler_init_top_k(sp.top_k))
        if sp.top_p < 1.0:
            add(chain, llama.llama_sampler_init_top_p(sp.top_p, 1))
        if sp.min_p > 0.0:
            add(chain, llama.llama_sampler_init_min_p(sp.min_p, 1))
        add(chain, llama.llama_sampler_init_temp(sp.temperature))
        seed = llama.LLAMA_DEFAULT_SEED if sp.seed is None else sp.seed & 0xFFFFFFFF
        add(chain, llama.llama_sampler_init_dist(seed))
    return chain

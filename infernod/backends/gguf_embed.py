"""Embeddings from a GGUF model: a second llama.cpp context with embeddings on.

The generation context keeps one output row per sequence and no pooled embeddings, so
embedding needs a context of its own: :class:`GgufEmbedder` creates it on the engine's
model (weights shared, nothing loaded twice) at the first ``embed``, on the decode thread,
which then runs each embed batch between two generation steps (one thread drives both
contexts: llama.cpp's CPU backend keeps a thread pool per calling thread, see
GgufEngine.start). Its cost is dominated by the vocabulary, not the KV cells: when
embedding, llama.cpp makes every token an output, so it holds logits for a whole batch
(``max_length`` x vocabulary floats, and as much again in compute buffers). For Gemma 3
(262,144 tokens) at the default 256 tokens that is about 530 MiB once a full batch ran; a
model with a 32k vocabulary needs an eighth of it. ``memory_bytes`` (``embedding`` in the
model's ``wire_info``) is the runner's growth since the context was made, largest seen
after a batch (pages are touched as batches fill); it is freed with the model.

Pooling is the model's (GGUF ``<arch>.pooling_type``: mean, cls or last, as embedding
models declare it). A model that declares none (a plain language model such as Gemma 3)
is mean-pooled over its last hidden states. Texts are packed into batches of at most
``max_length`` tokens and ``n_seq`` sequences, as ``llama_cpp.Llama.embed`` does, and
flash attention is off as there, so the vectors are the same.
"""

from __future__ import annotations

import time
from typing import Any

from infernod.backends import llama_native as native
from infernod.backends.onnx_engine import RunDone, embed_batch
from infernod.protocol.errors import InfernoError

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
MAX_LENGTH = 256  # tokens per text (and per batch): longer texts are truncated


class GgufEmbedder:
    """The embedding context of one GGUF model. One thread at a time (the decode thread);
    :meth:`embed` has ``OnnxModel.embed``'s shape, so ``onnx_engine.embed_batch`` splits
    and normalises its vectors per request for both."""

    def __init__(self, model: Any, vocab: Any, *, n_threads: int,
                 max_length: int = MAX_LENGTH, n_seq: int = 8) -> None:
        llama = native.bindings()
        self.max_length = max_length
        self.n_seq = n_seq
        self._vocab = vocab
        self.dim = int(llama.llama_model_n_embd(model))
        self._rss0 = native.rss_bytes()
        self.memory_bytes = 0  # measured after each batch (buffers are touched as used)
        self._ctx = self._context(model, n_threads, llama.LLAMA_POOLING_TYPE_UNSPECIFIED)
        pooling = int(llama.llama_pooling_type(self._ctx))
        if pooling in (llama.LLAMA_POOLING_TYPE_NONE, llama.LLAMA_POOLING_TYPE_RANK):
            llama.llama_free(self._ctx)  # per-token vectors or a reranker score: mean-pool
            self._ctx = self._context(model, n_threads, llama.LLAMA_POOLING_TYPE_MEAN)
            pooling = int(llama.llama_pooling_type(self._ctx))
        self.pooling = POOLING_NAMES.get(pooling, str(pooling))
        self._mem = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(max_length, 0, 1)

    def _context(self, model: Any, n_threads: int, pooling: int) -> Any:
        llama = native.bindings()
        p = llama.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = self.max_length
        p.n_seq_max = self.n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.embeddings = True
        p.pooling_type = pooling
        p.kv_unified = True
        p.no_perf = True
        p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama's default
        ctx = llama.llama_init_from_model(model, p)
        if not ctx:
            raise InfernoError("insufficient_memory", "llama.cpp could not create the "
                               f"embedding context ({self.max_length} tokens)")
        return ctx

    def embed(self, texts: list[str], normalize: bool = False) -> tuple[Any, dict[str, Any]]:
        """``(float32 [len(texts), dim], info)``; info: truncated, tokens (per text),
        tokenize_ms, run_ms, max_length, pooling. ``normalize``: L2, per vector."""
        import numpy as np

        t0 = time.perf_counter()
        seqs = [native.tokenize(self._vocab, t, True, False) for t in texts]
        truncated = [len(s) > self.max_length for s in seqs]
        seqs = [s[: self.max_length] for s in seqs]
        t1 = time.perf_counter()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        group: list[int] = []  # indices of the texts in the batch being filled
        n_tokens = 0
        for i, s in enumerate(seqs):
            if group and (n_tokens + len(s) > self.max_length or len(group) >= self.n_seq):
                out[group] = self._decode([seqs[j] for j in group])
                group, n_tokens = [], 0
            if s:  # a text with no token at all (no BOS, empty) stays a zero vector
                group.append(i)
                n_tokens += len(s)
        if group:
            out[group] = self._decode([seqs[j] for j in group])
        # pages are touched as batches grow: the largest growth seen since creation
        self.memory_bytes = max(self.memory_bytes, native.rss_bytes() - self._rss0)
        if normalize and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        t2 = time.perf_counter()
        return out, {"truncated": truncated, "tokens": [len(s) for s in seqs],
                     "tokenize_ms": (t1 - t0) * 1000, "run_ms": (t2 - t1) * 1000,
                     "max_length": self.max_length, "pooling": self.pooling}

    def _decode(self, seqs: list[list[int]]) -> Any:
        """One llama_decode of whole sequences (seq ids 0..): their pooled vectors."""
        import numpy as np

        llama = native.bindings()
        b = self._batch
        n = 0
        for seq_id, tokens in enumerate(seqs):
            for pos, tok in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos, 1
                b.seq_id[n][0] = seq_id
                b.logits[n] = True  # embedding: every token is an output
                n += 1
        b.n_tokens = n
        llama.llama_memory_clear(self._mem, True)
        rc = llama.llama_decode(self._ctx, b)
        if rc != 0:
            raise InfernoError("internal", f"embedding decode failed (llama_decode returned "
                               f"{rc})")
        vecs = np.empty((len(seqs), self.dim), dtype=np.float32)
        for seq_id in range(len(seqs)):
            ptr = llama.llama_get_embeddings_seq(self._ctx, seq_id)
            if not ptr:
                raise InfernoError("internal", f"no pooled embedding for sequence {seq_id}")
            vecs[seq_id] = np.ctypeslib.as_array(ptr, shape=(self.dim,))
        llama.llama_memory_clear(self._mem, True)
        return vecs

    def close(self) -> None:
        llama = native.bindings()
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None


class EmbedRuns:
    """GgufEngine's embed runs (its decode thread): the embedder, created at the first."""

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        self.max_length = max_length
        self.embedder: GgufEmbedder | None = None

    def run(self, model: Any, vocab: Any, n_threads: int, args: dict[str, Any],
            on_done: RunDone) -> None:
        try:
            if self.embedder is None:
                self.embedder = GgufEmbedder(model, vocab, n_threads=n_threads,
                                             max_length=self.max_length)
            result, error = embed_batch(self.embedder, args), None
        except Exception as e:  # noqa: BLE001 - handed to the caller, who translates
            result, error = None, e
        on_done(result, error)

    def wire_info(self) -> dict[str, Any]:
        """``embedding: {pooling, max_length, memory_bytes}`` once the context exists."""
        e = self.embedder
        if e is None:
            return {}
        return {"embedding": {"pooling": e.pooling, "max_length": e.max_length,
                              "memory_bytes": e.memory_bytes}}

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None

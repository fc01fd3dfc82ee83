"""Embeddings from a GGUF model, through a real daemon and the model's runner: the vectors
are llama-cpp-python's own (``Llama(embedding=True)``, mean pooling as the daemon picks for
a model that declares none), and generation on the same model keeps working, during and
after."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MODEL = "gemma3-270m"
TEXTS = ["The capital of France is Paris.", "hello world", "Ein Satz auf Deutsch, mit Ümlauten.",
         "A somewhat longer sentence about the lighthouse, the storms and the ships."]


def reference(model_path: Path, texts: list[str]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), embedding=True, n_threads=2, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    try:
        return np.array(llm.embed(texts), dtype=np.float32)
    finally:
        llm.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.model
def test_gguf_embeddings_match_llama_cpp_and_generation_goes_on(
        daemon, default_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from infernod.cli import app as cli

    ref = reference(default_model_path, TEXTS)
    with daemon.client() as c:
        c.load(MODEL)
        before = "".join(c.generate(MODEL, "The capital of France is", max_tokens=8,
                                    temperature=0))
        # a generation streams (read by this thread) while another client's embeds run in
        # the same runner
        got: dict[str, Any] = {}

        def embeds() -> None:
            with daemon.client() as c2:
                got["norm"] = c2.embed(MODEL, TEXTS)
                got["raw"] = c2.embed(MODEL, TEXTS[:2], normalize=False)

        stream = c.generate(MODEL, "Once upon a time", max_tokens=48, temperature=0)
        worker = threading.Thread(target=embeds)
        worker.start()
        during = "".join(stream)
        worker.join(timeout=240)
        assert not worker.is_alive() and stream.stats["finish_reason"] == "length" and during
        (vectors, info), (raw, raw_info) = got["norm"], got["raw"]

        assert vectors.shape == (len(TEXTS), ref.shape[1]) and info["dim"] == ref.shape[1]
        assert cosines(vectors, ref).min() >= 0.9999, cosines(vectors, ref)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        assert info["normalized"] is True and info["truncated"] == [False] * len(TEXTS)
        assert info["stats"]["provider"] == "llama.cpp"
        assert raw_info["normalized"] is False
        assert np.allclose(raw, ref[:2], rtol=1e-3, atol=1e-3)  # normalize=False: as llama.cpp
        assert abs(float(np.linalg.norm(raw[0])) - 1.0) > 0.01

        after = "".join(c.generate(MODEL, "The capital of France is", max_tokens=8,
                                   temperature=0))
        assert after == before  # the embedding context left generation alone
        shown = json.dumps(c.show(MODEL), default=str)
        assert '"pooling": "mean"' in shown  # the embedding context, in the model's info

    rc = cli.main(["--endpoint", daemon.endpoint, "embed", MODEL, TEXTS[0], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["dim"] == ref.shape[1]
    assert cosines(np.array(out["vectors"], dtype=np.float32), ref[:1]).min() >= 0.9999

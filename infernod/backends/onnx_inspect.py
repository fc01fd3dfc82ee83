"""ONNX models found on disk: where a model's files are and what its graph looks like,
without onnxruntime.

:func:`inspect_onnx` is the registry's: it reads a model's signature (inputs, outputs,
opset, metadata) straight from the protobuf header (:mod:`infernod.backends.onnx_header`)
over an ``mmap``: weights are skipped, never read or allocated, so scanning a directory of
multi-GB graphs stays cheap, and neither ``onnx`` nor ``onnxruntime`` is imported. Loading
and running a model is :mod:`infernod.backends.onnx` (``OnnxModel``), which uses the same
helpers to find its files and its embedding signature.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from infernod.backends.onnx_header import read_header
from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# metadata_props key written by infernod.backends.convert_onnx: the max sequence length the model was
# trained/evaluated with (sentence-transformers' max_seq_length), which beats any guess.
MAX_LENGTH_KEY = "inferno.max_length"
DEFAULT_MAX_LENGTH = 512  # BERT's position-embedding limit, when nothing better is known

_EMBEDDING_REQUIRED = ("input_ids", "attention_mask")
_EMBEDDING_OPTIONAL = ("token_type_ids",)


def resolve_model(path: str | Path) -> tuple[Path, Path | None]:
    """Return ``(graph file, tokenizer.json or None)`` for a model file or directory."""
    p = Path(path)
    if p.is_dir():
        graph = p / MODEL_FILE
        if not graph.is_file():
            raise InfernoError("unknown_model", f"{p}: directory has no {MODEL_FILE}")
        tok = p / TOKENIZER_FILE
        return graph, tok if tok.is_file() else None
    if p.is_file():
        return p, None
    raise InfernoError("unknown_model", f"{p}: no such ONNX model file or directory")


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Describe an ONNX model without loading its weights: what the registry lists.

    Returns ``{"path", "graph_path", "format": "onnx", "kind": "embedding"|"generic",
    "inputs", "outputs", "opset", "opsets", "ir_version", "producer", "metadata",
    "size_bytes", "tokenizer", "max_length", "dim"}``. Each input/output is
    ``{"name", "dtype", "shape"}`` with ``shape`` a list of ints (fixed sizes) and strings
    (symbolic dims, ``"?"`` when unnamed), or ``None`` when the rank is unknown.
    ``kind`` is ``"embedding"`` only when the graph looks like a BERT-style encoder *and* a
    tokenizer.json sits beside it, i.e. when ``OnnxModel.embed`` can serve it.
    ``size_bytes`` counts the graph, its external-data files and the tokenizer.
    Raises ``InfernoError`` ``unknown_model`` (nothing there) or ``not_supported`` (not a
    readable ONNX file).
    """
    graph_path, tok_path = resolve_model(path)
    try:
        header = read_header(graph_path)
    except (ValueError, IndexError, UnicodeDecodeError, OSError) as e:
        raise InfernoError("not_supported", f"{graph_path}: not a readable ONNX model ({e})") from e

    size = graph_path.stat().st_size
    for ext in external_data_files(graph_path, header["external"]):
        size += ext.stat().st_size
    tokenizer: dict[str, Any] | None = None
    if tok_path is not None:
        size += tok_path.stat().st_size
        tokenizer = read_tokenizer_json(tok_path)

    inputs, outputs = header["inputs"], header["outputs"]
    signature = embedding_signature(inputs, outputs)
    kind = "embedding" if signature is not None and tok_path is not None else "generic"
    max_length = dim = None
    if signature is not None and tokenizer is not None:
        max_length = max_length_of(header["metadata"], tokenizer)
        last = outputs[signature]["shape"]
        dim = last[-1] if isinstance(last[-1], int) else None
    return {
        "path": str(Path(path)),
        "graph_path": str(graph_path),
        "format": "onnx",
        "kind": kind,
        "inputs": inputs,
        "outputs": outputs,
        "opset": header["opsets"].get("", header["opsets"].get("ai.onnx")),
        "opsets": header["opsets"],
        "ir_version": header["ir_version"],
        "producer": header["producer"],
        "metadata": header["metadata"],
        "size_bytes": size,
        "tokenizer": str(tok_path) if tok_path is not None else None,
        "max_length": max_length,
        "dim": dim,
    }


def external_data_files(graph_path: Path, locations: Iterable[str]) -> list[Path]:
    """The external-data files of a graph, refused unless each stays inside its directory.

    onnxruntime opens ``<graph dir>/<location>`` for every initializer stored outside the
    graph and follows symlinks, so a location that is absolute, climbs with ``..`` or crosses
    a symlink would let whoever placed the graph read any file the daemon can read (its
    secret key, through ``infer``). Each location must name a regular file with a single
    link below the directory of the graph's path (the one onnxruntime joins it to), with no symlink on the way (recent
    onnxruntime versions refuse symlinks leaving the directory themselves; hard links and
    older versions they do not). Called at every scan and at
    every load, not only at import: what is checked is what onnxruntime is about to open.
    Raises ``InfernoError`` ``unsafe_path`` (escaping) or ``not_supported`` (missing).
    """
    base = Path(os.path.abspath(graph_path)).parent  # as onnxruntime joins it: not resolved
    files: list[Path] = []
    for loc in sorted(set(locations)):
        parts = PurePosixPath(loc).parts if loc else ()
        if (not parts or PurePosixPath(loc).is_absolute() or "\\" in loc or "\0" in loc
                or any(p in ("..", ".") for p in parts)):
            raise InfernoError(
                "unsafe_path",
                f"{graph_path.name}: external data location {loc!r} leaves the model's directory",
                "external data must be a plain relative file name beside the graph; "
                "re-export the model with its weights inside its own directory")
        path = base
        for i, part in enumerate(parts):
            path = path / part
            try:
                st = path.lstat()
            except FileNotFoundError:
                raise InfernoError(
                    "not_supported", f"{graph_path.name}: external data file {loc!r} is missing",
                    "copy the graph together with its external data files") from None
            if stat.S_ISLNK(st.st_mode):
                raise InfernoError(
                    "unsafe_path",
                    f"{graph_path.name}: external data {loc!r} goes through a symlink ({part})",
                    "replace the symlink with the real file inside the model's directory")
            last = i == len(parts) - 1
            if (last and not stat.S_ISREG(st.st_mode)) or (not last and not stat.S_ISDIR(st.st_mode)):
                raise InfernoError(
                    "unsafe_path", f"{graph_path.name}: external data {loc!r} is not a regular file",
                    "external data must be regular files inside the model's directory")
            if last and st.st_nlink != 1:  # another name for a file that may live anywhere
                raise InfernoError(
                    "unsafe_path",
                    f"{graph_path.name}: external data {loc!r} has {st.st_nlink} hard links",
                    "replace it with a copy that has a single link")
        files.append(path)
    return files


def embedding_signature(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> int | None:
    """Index of the output to pool if the graph is a BERT-style encoder, else None.

    Inputs must be input_ids + attention_mask (+ token_type_ids), integer-typed; the output
    is the first float one of rank 3 (token states, mean-pooled) or rank 2 (already pooled).
    """
    names = {i["name"] for i in inputs}
    allowed = set(_EMBEDDING_REQUIRED) | set(_EMBEDDING_OPTIONAL)
    if not set(_EMBEDDING_REQUIRED) <= names or not names <= allowed:
        return None
    if not all(str(i["dtype"]).startswith(("int", "uint")) for i in inputs):
        return None
    preferred = ("last_hidden_state", "token_embeddings", "sentence_embedding")
    candidates = [
        n
        for n, o in enumerate(outputs)
        if str(o["dtype"]).startswith("float")
        and o["shape"] is not None
        and len(o["shape"]) in (2, 3)
    ]
    for want in preferred:
        for n in candidates:
            if outputs[n]["name"] == want:
                return n
    return candidates[0] if candidates else None


def read_tokenizer_json(tok_path: Path) -> dict[str, Any]:
    """tokenizer.json as a dict; anything the tokenizers library could not read is refused
    here, at scan time, so the model is listed as skipped instead of failing at load."""
    try:
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InfernoError("not_supported", f"{tok_path}: unreadable tokenizer ({e})") from e
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise InfernoError("not_supported", f"{tok_path}: not a tokenizers tokenizer.json "
                           "(expected a JSON object with a 'model' object)")
    return tok


def max_length_of(metadata: Mapping[str, str], tokenizer: Mapping[str, Any] | None) -> int:
    """The sequence length to truncate to: converter metadata, else tokenizer.json, else 512."""
    if MAX_LENGTH_KEY in metadata:
        try:
            value = int(metadata[MAX_LENGTH_KEY])
            if value > 0:
                return value
        except ValueError:
            pass
        log.warning("ignoring %s=%r: not a positive integer", MAX_LENGTH_KEY,
                    metadata[MAX_LENGTH_KEY])
    trunc = tokenizer.get("truncation") if tokenizer is not None else None
    if isinstance(trunc, dict) and isinstance(trunc.get("max_length"), int) \
            and trunc["max_length"] > 0:
        return int(trunc["max_length"])
    return DEFAULT_MAX_LENGTH

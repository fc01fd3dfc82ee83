"""ONNX models on onnxruntime: embedding encoders and generic graphs.

:class:`OnnxModel` owns one ``InferenceSession`` (and, for text models, a ``tokenizers``
tokenizer). ``embed`` and ``infer`` block: call them from a worker thread. onnxruntime's
``run`` is thread-safe, so one model may serve several threads. Finding a model's files and
reading its signature without onnxruntime (what the registry's scan needs) is
:mod:`infernod.backends.onnx_inspect`.

A model is either a ``.onnx`` file (generic) or a directory holding ``model.onnx`` and, for
text models, ``tokenizer.json``. Tensors cross the wire as ``{"dtype", "shape", "data"}``
dicts (:func:`encode_array` / :func:`decode_array`) so they travel in msgpack unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infernod.backends.onnx_header import UNKNOWN_DIM
from infernod.backends.onnx_inspect import (
    embedding_signature,
    inspect_onnx,
)
from infernod.protocol.arrays import decode_array, encode_array
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:  # imported lazily at run time: the registry must not pay for them
    import onnxruntime
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# onnxruntime NodeArg.type -> the same names
_ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "string", "tensor(complex64)": "complex64",
    "tensor(complex128)": "complex128",
}  # fmt: skip

_OPT_LEVELS = ("disable", "basic", "extended", "all")
_PROVIDER_ALIASES = {
    "CUDA": "CUDAExecutionProvider",
    "CPU": "CPUExecutionProvider",
    "TENSORRT": "TensorrtExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
}


# --------------------------------------------------------------------------------------------
# the model


class OnnxModel:
    """One loaded ONNX model: an InferenceSession, plus a tokenizer for embedding models.

    Construction blocks (it loads the weights): run it in the default executor. Afterwards
    ``provider`` is the execution provider that actually runs, ``providers`` the session's
    full list, and ``fallback_reason`` says why a preferred provider is not in use (also
    logged), or is None.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers_pref: Sequence[str] = ("CUDA", "CPU"),
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        graph_optimization_level: str = "all",
        session_config: Mapping[str, str] | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
    ) -> None:
        """Load the model. Thread counts of 0 let onnxruntime choose; ``session_config``
        entries go to ``SessionOptions.add_session_config_entry``; ``max_length`` overrides
        the truncation length found in the model; ``batch_size`` caps texts per run."""
        import onnxruntime as ort

        if graph_optimization_level not in _OPT_LEVELS:
            raise InfernoError(
                "config_error",
                f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, got {graph_optimization_level!r}",
            )
        if batch_size < 1:
            raise InfernoError("config_error", f"batch_size must be >= 1, got {batch_size}")
        self.info = inspect_onnx(path)
        self.name = Path(path).name
        self.kind: str = self.info["kind"]
        self.batch_size = batch_size
        graph_path = Path(self.info["graph_path"])

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization_level]
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(str(key), str(value))

        requested, reasons = _pick_providers(providers_pref, ort.get_available_providers())
        self._session = self._open_session(ort, graph_path, opts, requested, reasons)
        self.providers: list[str] = list(self._session.get_providers())
        self.provider: str = self.providers[0]
        for p in requested:
            if p not in self.providers and not any(p in r for r in reasons):
                reasons.append(
                    f"{p} was requested but onnxruntime did not enable it (no usable GPU or driver/CUDA libraries?)"
                )
                log.warning("onnx model %s: %s", self.name, reasons[-1])
        self.fallback_reason: str | None = "; ".join(reasons) or None

        self._ort = ort
        self._local = threading.local()  # per thread: the RunOptions of run_scope
        self.inputs = [_node_arg(a) for a in self._session.get_inputs()]
        self.outputs = [_node_arg(a) for a in self._session.get_outputs()]
        self._inputs_by_name = {i["name"]: i for i in self.inputs}

        self._tokenizer: Tokenizer | None = None
        self.max_length: int | None = None
        self._pool_output: str | None = None
        self.dim: int | str | None = None  # embedding width, once known
        if self.kind == "embedding":
            self._setup_embedding(max_length)
        log.info(
            "onnx model %s loaded: kind=%s provider=%s inputs=%s",
            self.name, self.kind, self.provider, [i["name"] for i in self.inputs],
        )  # fmt: skip

    @staticmethod
    def _open_session(
        ort: Any, graph_path: Path, opts: Any, requested: list[str], reasons: list[str]
    ) -> onnxruntime.InferenceSession:
        """Create the session; if a non-CPU provider makes creation fail, retry on CPU."""
        try:
            return ort.InferenceSession(str(graph_path), sess_options=opts, providers=requested)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises bare RuntimeError subclasses
            if requested == ["CPUExecutionProvider"]:
                raise InfernoError(
                    "not_supported", f"{graph_path}: onnxruntime cannot load it: {e}"
                ) from e
            reasons.append(
                f"session with {requested} failed ({e}); retried on CPUExecutionProvider"
            )
            log.warning("onnx model %s: %s", graph_path, reasons[-1])
        try:
            return ort.InferenceSession(
                str(graph_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001
            raise InfernoError(
                "not_supported", f"{graph_path}: onnxruntime cannot load it: {e}"
            ) from e

    def _setup_embedding(self, max_length: int | None) -> None:
        from tokenizers import Tokenizer

        tok_path = self.info["tokenizer"]
        try:
            tok = Tokenizer.from_file(tok_path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise InfernoError("not_supported", f"{tok_path}: cannot read tokenizer ({e})") from e
        self.max_length = max_length or int(self.info["max_length"])
        tok.no_padding()  # we pad per batch to its longest text, not to a fixed length
        tok.enable_truncation(self.max_length)
        pad = tok.token_to_id("[PAD]")
        self._pad_id = pad if pad is not None else 0
        self._tokenizer = tok
        index = embedding_signature(self.inputs, self.outputs)
        if index is None:  # session disagrees with the header scan: refuse rather than guess
            raise InfernoError("not_supported", f"{self.name}: no float output to pool")
        self._pool_output = self.outputs[index]["name"]
        self.dim = self.outputs[index]["shape"][-1]

    def describe(self) -> dict[str, Any]:
        """What the server reports about a loaded model (models event, load reply)."""
        return {
            "kind": self.kind,
            "provider": self.provider,
            "providers": self.providers,
            "fallback_reason": self.fallback_reason,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "max_length": self.max_length,
            "opset": self.info["opset"],
            "size_bytes": self.info["size_bytes"],
        }

    # ---------------------------------------------------------------------------- embed

    def embed(
        self, texts: Sequence[str], normalize: bool = True
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Embed texts: float32 ``[n, dim]`` plus ``{"truncated", "tokens", "max_length",
        "tokenize_ms", "run_ms"}``. ``tokens[i]`` counts the tokens text ``i`` was run with
        (after truncation, special tokens included); ``truncated[i]`` says text ``i`` was cut.

        Texts run in batches of ``batch_size``, sorted by length so padding stays small;
        padded positions are masked out of the mean, so the result does not depend on
        which texts share a batch.
        """
        if self._tokenizer is None or self._pool_output is None:
            raise InfernoError(
                "not_supported",
                f"{self.name} is a {self.kind} model; embed needs an encoder with input_ids/attention_mask and a tokenizer.json",
            )
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InfernoError("bad_request", "texts must be a list of strings")
        t0 = time.perf_counter()
        encodings = self._tokenizer.encode_batch(list(texts))
        t1 = time.perf_counter()
        tokens = [len(e.ids) for e in encodings]
        truncated = [bool(e.overflowing) for e in encodings]
        n = len(encodings)
        out = np.zeros((n, self.dim if isinstance(self.dim, int) else 0), dtype=np.float32)
        order = sorted(range(n), key=tokens.__getitem__)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            vectors = self._embed_batch([encodings[i] for i in idx])
            if out.shape[1] != vectors.shape[1]:  # dim not declared in the graph
                out = np.zeros((n, vectors.shape[1]), dtype=np.float32)  # only on first batch
            out[idx] = vectors
        if normalize and n:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        t2 = time.perf_counter()
        info = {
            "truncated": truncated,
            "tokens": tokens,
            "max_length": self.max_length,
            "tokenize_ms": (t1 - t0) * 1e3,
            "run_ms": (t2 - t1) * 1e3,
        }
        return out, info

    def _embed_batch(self, encodings: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = 1
            types[row, :k] = e.type_ids
        columns = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {
            name: columns[name].astype(spec["dtype"], copy=False)
            for name, spec in self._inputs_by_name.items()
        }
        assert self._pool_output is not None  # embed() refuses a model without one
        (hidden,) = self._run([self._pool_output], feeds)
        hidden = np.asarray(hidden, dtype=np.float32)
        if hidden.ndim == 2:  # the graph pools itself
            return hidden
        weights = mask.astype(np.float32)[:, :, None]
        summed = (hidden * weights).sum(axis=1)
        return summed / np.maximum(weights.sum(axis=1), 1e-9)

    # ---------------------------------------------------------------------------- infer

    def validate_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Decode wire inputs and check them against the graph's declared inputs.

        Checks names (unknown, missing), dtypes and shapes (fixed dims must match; a
        symbolic dim takes any size, but the same name must have the same size in every
        input), so the caller gets a ``bad_request`` naming the input instead of an
        onnxruntime error.
        """
        if not isinstance(inputs, Mapping):
            raise InfernoError("bad_request", "inputs must be a map of input name to array")
        declared = list(self._inputs_by_name)
        unknown = [n for n in inputs if n not in self._inputs_by_name]
        if unknown:
            raise InfernoError(
                "bad_request",
                f"unknown input(s) {', '.join(map(repr, unknown))}; {self.name} takes {', '.join(map(repr, declared))}",
            )
        missing = [n for n in declared if n not in inputs]
        if missing:
            raise InfernoError(
                "bad_request",
                f"missing input(s) {', '.join(map(repr, missing))}; {self.name} takes {', '.join(map(repr, declared))}",
            )
        arrays: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for name in declared:
            spec = self._inputs_by_name[name]
            arr = decode_array(inputs[name], name=f"input {name!r}")
            if arr.dtype.name != spec["dtype"]:
                raise InfernoError(
                    "bad_request",
                    f"input {name!r}: expected dtype {spec['dtype']}, got {arr.dtype.name}",
                )
            _check_shape(name, spec["shape"], list(arr.shape), symbols)
            arrays[name] = arr
        return arrays

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Run the graph on wire arrays (see :func:`decode_array`); return wire arrays."""
        arrays = self.validate_inputs(inputs)
        names = [o["name"] for o in self.outputs]
        results = self._run(names, arrays)
        return {
            name: encode_array(np.asarray(value))
            for name, value in zip(names, results, strict=True)
        }

    def new_run_options(self) -> Any:
        """A fresh ``onnxruntime.RunOptions`` for :meth:`run_scope`."""
        return self._ort.RunOptions()

    @contextmanager
    def run_scope(self, run_options: Any) -> Iterator[None]:
        """Every session run of this thread inside the block uses ``run_options``: setting
        ``run_options.terminate = True`` from another thread stops the run in progress
        (onnxruntime checks it between nodes) and every later one in the block, which
        then raise ``cancelled``."""
        previous = getattr(self._local, "run_options", None)
        self._local.run_options = run_options
        try:
            yield
        finally:
            self._local.run_options = previous

    def _run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[Any]:
        """The one place onnxruntime errors become InfernoErrors."""
        run_options = getattr(self._local, "run_options", None)
        try:
            return self._session.run(names, feeds, run_options)
        except Exception as e:  # noqa: BLE001 - onnxruntime's pybind exceptions share no base
            if run_options is not None and run_options.terminate:
                raise InfernoError("cancelled", f"run on {self.name} terminated") from e
            code = "bad_request" if type(e).__name__ == "InvalidArgument" else "internal"
            raise InfernoError(code, f"onnxruntime failed on {self.name}: {e}") from e


def _check_shape(
    name: str, declared: list[int | str] | None, got: list[int], symbols: dict[str, tuple[int, str]]
) -> None:
    if declared is None:  # rank unknown: anything goes
        return
    shown = "[" + ", ".join(str(d) for d in declared) + "]"
    if len(declared) != len(got):
        raise InfernoError(
            "bad_request",
            f"input {name!r}: expected shape {shown} (rank {len(declared)}), got {got} (rank {len(got)})",
        )
    for axis, (want, size) in enumerate(zip(declared, got, strict=True)):
        if isinstance(want, int) and want >= 0:
            if want != size:
                raise InfernoError(
                    "bad_request",
                    f"input {name!r}: dimension {axis} must be {want} (shape {shown}), got {size} (shape {got})",
                )
        elif isinstance(want, str) and want != UNKNOWN_DIM:
            seen = symbols.setdefault(want, (size, name))
            if seen[0] != size:
                raise InfernoError(
                    "bad_request",
                    f"input {name!r}: dimension {axis} ({want!r}) is {size} but input {seen[1]!r} gave {want!r} = {seen[0]}",
                )


def _pick_providers(pref: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Map preference names ("CUDA", "CPU" or full names) to available providers.

    Returns the providers to request (CPU always last as the safety net) and the reasons
    for each preferred one left out, each logged: a fallback is never silent.
    """
    requested: list[str] = []
    reasons: list[str] = []
    for raw in pref:
        full = _PROVIDER_ALIASES.get(raw.upper(), raw)
        if full in requested:
            continue
        if full in available:
            requested.append(full)
            continue
        hint = " (install onnxruntime-gpu)" if full == "CUDAExecutionProvider" else ""
        reasons.append(
            f"{full} is not available in this onnxruntime build{hint}; available: {', '.join(available)}"
        )
        # a CPU-only build is a normal install, so info; anything else is a misconfiguration
        level = logging.INFO if full == "CUDAExecutionProvider" else logging.WARNING
        log.log(level, "onnx: %s", reasons[-1])
    if "CPUExecutionProvider" not in requested:
        requested.append("CPUExecutionProvider")
    return requested, reasons


def _node_arg(arg: Any) -> dict[str, Any]:
    shape = arg.shape
    if shape is not None:
        shape = [d if isinstance(d, int) else (d or UNKNOWN_DIM) for d in shape]
    return {"name": arg.name, "dtype": _ORT_DTYPES.get(arg.type, arg.type), "shape": shape}

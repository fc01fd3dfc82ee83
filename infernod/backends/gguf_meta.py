"""GGUF metadata: ``ModelInfo`` and a header reader that never loads weights.

GGUF metadata is read by a small header parser built on the ``gguf`` package's type tables
instead of ``gguf.GGUFReader``: the reader materialises every element of the 262k-entry
tokenizer arrays and takes ~18 s on the default model on this 2-core machine, where parsing
the header and skipping the arrays takes well under a second and touches only the first MiBs.

``ModelInfo`` lives here because ``read_gguf_info`` builds it; the registry (which also builds
it for ONNX entries) and the memory estimate (which reads it) import it from here.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf

from infernod.protocol.errors import InfernoError

_SMALL_ARRAY = 32  # arrays longer than this are skipped, shown as "<array: N x type>"
_LONG_STRING = 300
_MAX_LAYERS = 1 << 16  # a block_count beyond this is a broken header, not a model
# Sliding-window layer pattern per architecture when the GGUF does not say
# ({arch}.attention.sliding_window_pattern): every n-th layer is global, the rest are SWA
# (llama.cpp hparams.set_swa_pattern). Unknown architectures count as all-global, which
# over-estimates memory rather than under-estimating it.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


_TENSOR_TYPES = frozenset(int(t) for t in gguf.GGMLQuantizationType)


class _BigArray(NamedTuple):
    """A metadata array too long to keep in memory; ``offset`` points at its first element."""

    etype: int
    n_items: int  # not ``count``: that would hide tuple.count
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
    # "producer", "max_length", "dim", "tokenizer"} from backends.onnx_inspect.inspect_onnx
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

    def __init__(self, buf: bytes | mmap.mmap) -> None:
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
        data_end = 0  # bytes the tensor data needs after the (aligned) end of the header
        for _ in range(n_tensors):
            name, n_dims = self.string(), self.u("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dims")
            n = 1
            for _ in range(n_dims):
                n *= self.u("Q")
            ttype, offset = self.u("I"), self.u("Q")
            if ttype not in _TENSOR_TYPES:
                raise ValueError(f"tensor {name!r} has unknown type {ttype}")
            block, type_size = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(ttype),
                                                         (0, 0))
            if block:
                data_end = max(data_end, offset + n // block * type_size)
            self.tensors.append((name, n, ttype))
        align = self.kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"bad general.alignment {align!r}")
        self.data_start = -(-self.pos // align) * align
        if self.data_start + data_end > len(buf):
            raise ValueError(f"truncated: the tensor data needs {self.data_start + data_end} "
                             f"bytes, the file has {len(buf)}")

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
        for i in range(min(arr.n_items, max(wanted, default=-1) + 1)):
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
        return f"<array: {value.n_items} x {etype}>"
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
    """Reads a GGUF file's metadata without loading its weights. Raises InfernoError.

    Any file can sit in a model directory: whatever a malformed header makes fail (a string
    where a count belongs, an unknown tensor type, a file cut short) is a ``bad_request``
    naming the file, never another exception that would stop a scan.
    """
    try:
        return _read_gguf_info(name, path)
    except InfernoError:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        raise InfernoError("bad_request", f"{path.name} is not a valid GGUF file: "
                           f"{type(e).__name__}: {e}") from e


def _read_gguf_info(name: str, path: Path) -> ModelInfo:
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
    except (ValueError, struct.error, OSError, IndexError, OverflowError, RecursionError,
            MemoryError) as e:
        raise InfernoError("bad_request", f"{path.name} is not a valid GGUF file: {e}") from e
    arch = str(kv.get("general.architecture", "")) or None

    def a(key: str) -> Any:
        return kv.get(f"{arch}.{key}")

    n_layer, n_embd, n_head = a("block_count"), a("embedding_length"), a("attention.head_count")
    if n_layer is not None and not (isinstance(n_layer, int) and 0 <= n_layer <= _MAX_LAYERS):
        raise ValueError(f"{arch}.block_count is {n_layer!r}")
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
        vocab_size=tokens.n_items if isinstance(tokens, _BigArray) else (len(tokens) if tokens else None),
        bos_token=texts.get(kv.get("tokenizer.ggml.bos_token_id")),  # type: ignore[arg-type]
        eos_token=texts.get(kv.get("tokenizer.ggml.eos_token_id")),  # type: ignore[arg-type]
        add_bos_token=bool(kv.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=template if isinstance(template, str) and template else None,
        weights_bytes=weights, metadata=metadata,
    )  # fmt: skip


def check_gguf_header(buf: bytes | mmap.mmap) -> None:
    """Parses a whole GGUF header and checks that the tensor data it announces fits.

    For imports, before anything is copied: magic, version, every key/value, every tensor
    info with a known type, and the bytes those tensors need after the aligned header.
    Raises ``ValueError`` (or ``struct.error`` / ``IndexError`` on a truncated header).
    """
    h = _Header(buf)
    align = h.kv.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a power of two")
    start = -(-h.pos // align) * align
    need = 0
    for name, n, ttype in h.tensors:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type {ttype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if n % block:
            raise ValueError(f"tensor {name!r}: {n} elements is not a multiple of {block}")
        need += n // block * type_size
    have = max(0, len(buf) - start)
    if need > have:
        raise ValueError(f"tensor data needs {need} bytes but the file holds {have} "
                         "after the header (truncated?)")

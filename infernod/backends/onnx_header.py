"""Cheap ONNX header reader: a model's signature straight from the protobuf, over an ``mmap``.

``read_header`` lists inputs, outputs, opsets, IR version, producer, metadata and the
external-data files of a ``ModelProto`` with a few dozen lines of wire-format parsing: weights
are skipped, never read or allocated, and neither ``onnx`` nor ``onnxruntime`` is imported.
``infernod.backends.onnx.inspect_onnx`` builds on it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UNKNOWN_DIM = "?"  # a dimension with neither a size nor a name: accepts any size

# ONNX TensorProto.DataType -> numpy dtype name (names the wire format uses too)
_ONNX_DTYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
    14: "complex64", 15: "complex128", 16: "bfloat16",
}  # fmt: skip

# Minimal protobuf wire-format reader for the ModelProto fields we list. Field numbers are
# from onnx.proto (stable since IR v3): ModelProto 1 ir_version, 2 producer_name,
# 3 producer_version, 7 graph, 8 opset_import, 14 metadata_props; GraphProto 5 initializer,
# 11 input, 12 output; ValueInfoProto 1 name, 2 type; TypeProto 1 tensor_type; Tensor
# 1 elem_type, 2 shape; TensorShapeProto 1 dim; Dimension 1 dim_value, 2 dim_param;
# TensorProto 8 name, 13 external_data; StringStringEntryProto 1 key, 2 value.


def read_header(graph_path: Path) -> dict[str, Any]:
    with graph_path.open("rb") as f:
        if graph_path.stat().st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _parse_model(buf)
            finally:
                buf.release()


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value): an int for varints, (start, end) for bytes."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: int | tuple[int, int] | None
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = (pos, pos + length)
            pos += length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf")
        yield field, wire, value


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8")


def _entry(buf: memoryview, span: tuple[int, int]) -> tuple[str, str]:
    key = value = ""
    for field, wire, v in _fields(buf, *span):
        if wire == 2 and field == 1:
            key = _text(buf, v)
        elif wire == 2 and field == 2:
            value = _text(buf, v)
    return key, value


def _parse_model(buf: memoryview) -> dict[str, Any]:
    ir_version = None
    producer = ""
    producer_version = ""
    graph_span = None
    opsets: dict[str, int] = {}
    metadata: dict[str, str] = {}
    for field, wire, v in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 0:
            ir_version = v
        elif field == 2 and wire == 2:
            producer = _text(buf, v)
        elif field == 3 and wire == 2:
            producer_version = _text(buf, v)
        elif field == 7 and wire == 2:
            graph_span = v
        elif field == 8 and wire == 2:
            domain, version = "", 0
            for f2, w2, v2 in _fields(buf, *v):
                if f2 == 1 and w2 == 2:
                    domain = _text(buf, v2)
                elif f2 == 2 and w2 == 0:
                    version = v2
            opsets[domain] = version
        elif field == 14 and wire == 2:
            k, val = _entry(buf, v)
            metadata[k] = val
    if ir_version is None or graph_span is None:
        raise ValueError("no ir_version or graph: not an ONNX ModelProto")

    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    initializers: set[str] = set()
    external: set[str] = set()
    for field, wire, v in _fields(buf, *graph_span):
        if wire != 2:
            continue
        if field == 11:
            inputs.append(_value_info(buf, v))
        elif field == 12:
            outputs.append(_value_info(buf, v))
        elif field == 5:  # initializer: only its name and external-data location, never data
            for f2, w2, v2 in _fields(buf, *v):
                if f2 == 8 and w2 == 2:
                    initializers.add(_text(buf, v2))
                elif f2 == 13 and w2 == 2:
                    k, val = _entry(buf, v2)
                    if k == "location":
                        external.add(val)
    # IR < 4 lists initializers among the inputs; they are weights, not things a caller feeds
    inputs = [i for i in inputs if i["name"] not in initializers]
    producer_full = f"{producer} {producer_version}".strip()
    return {
        "ir_version": ir_version,
        "producer": producer_full,
        "opsets": opsets,
        "metadata": metadata,
        "inputs": inputs,
        "outputs": outputs,
        "external": external,
    }


def _value_info(buf: memoryview, span: tuple[int, int]) -> dict[str, Any]:
    name = ""
    dtype = "unknown"
    shape: list[int | str] | None = None
    for field, wire, v in _fields(buf, *span):
        if field == 1 and wire == 2:
            name = _text(buf, v)
        elif field == 2 and wire == 2:
            for tf, tw, tv in _fields(buf, *v):  # TypeProto
                if tw != 2:
                    continue
                if tf != 1:
                    dtype = {4: "sequence", 5: "map", 8: "sparse_tensor", 9: "optional"}.get(
                        tf, "unknown"
                    )
                    continue
                for f3, w3, v3 in _fields(buf, *tv):  # TypeProto.Tensor
                    if f3 == 1 and w3 == 0:
                        dtype = _ONNX_DTYPES.get(v3, f"onnx_type_{v3}")
                    elif f3 == 2 and w3 == 2:
                        shape = []
                        for f4, w4, v4 in _fields(buf, *v3):  # TensorShapeProto
                            if f4 == 1 and w4 == 2:
                                shape.append(_dimension(buf, v4))
    return {"name": name, "dtype": dtype, "shape": shape}


def _dimension(buf: memoryview, span: tuple[int, int]) -> int | str:
    dim: int | str = UNKNOWN_DIM
    for field, wire, v in _fields(buf, *span):
        if field == 1 and wire == 0:
            dim = v - (1 << 64) if v >= 1 << 63 else v
        elif field == 2 and wire == 2:
            dim = _text(buf, v) or UNKNOWN_DIM
    return dim


def parse_header(buf: memoryview) -> dict[str, Any]:
    """``read_header`` on a buffer already mapped (an import validates an open descriptor)."""
    return _parse_model(buf)

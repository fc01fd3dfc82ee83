"""Numpy arrays on the wire: ``{dtype, shape, data}`` with C-order, native (little-endian)
bytes. One definition for the daemon (ONNX inputs and outputs) and the client.

numpy is imported lazily, so importing the protocol package stays free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    import numpy as np

# numpy kinds a wire array may have: bool, signed/unsigned int, float, complex
_WIRE_KINDS = frozenset("biufc")




def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Turn an array into the msgpack-friendly ``{"dtype", "shape", "data"}`` dict.

    ``data`` is the C-order raw bytes in the array's (native, little-endian) byte order.
    Object, string and structured dtypes are refused: they have no fixed-size byte layout.
    """
    import numpy as np

    arr = np.asarray(array)
    _check_wire_dtype(arr.dtype, "array")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return {"dtype": arr.dtype.name, "shape": [int(d) for d in arr.shape], "data": arr.tobytes()}


def decode_array(obj: Mapping[str, Any], name: str = "array") -> np.ndarray:
    """Rebuild an array from a wire dict, checking every field; ``name`` goes into errors.

    The result is a read-only view on ``data`` (no copy): onnxruntime only reads its inputs.
    """
    import numpy as np

    if not isinstance(obj, Mapping):
        raise InfernoError(
            "bad_request",
            f"{name}: expected a map with dtype, shape and data, got {type(obj).__name__}",
        )
    missing = [k for k in ("dtype", "shape", "data") if k not in obj]
    if missing:
        raise InfernoError("bad_request", f"{name}: missing field(s) {', '.join(missing)}")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str):
        raise InfernoError(
            "bad_request", f"{name}: dtype must be a string such as 'float32', got {dtype_name!r}"
        )
    try:
        dtype = np.dtype(dtype_name)
    except TypeError as e:
        raise InfernoError("bad_request", f"{name}: unknown dtype {dtype_name!r}") from e
    _check_wire_dtype(dtype, name)
    if not dtype.isnative:
        raise InfernoError(
            "bad_request",
            f"{name}: dtype {dtype_name!r} is not in native byte order; send little-endian data",
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InfernoError(
            "bad_request", f"{name}: shape must be a list of non-negative integers, got {shape!r}"
        )
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InfernoError("bad_request", f"{name}: data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    got = memoryview(data).nbytes
    if got != expected:
        raise InfernoError(
            "bad_request",
            f"{name}: data has {got} bytes but shape {list(shape)} of {dtype.name} needs {expected}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_wire_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind not in _WIRE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InfernoError(
            "bad_request",
            f"{name}: dtype {dtype.name!r} cannot travel as raw bytes; use a numeric or bool dtype",
        )

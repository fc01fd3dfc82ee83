"""The wire format: frames, msgpack with hard limits, and nothing else.

A request travels over a DEALER -> ROUTER connection as three frames::

    [MAGIC, header, body]

``header`` and ``body`` are msgpack maps. Events travel over XPUB -> SUB as four frames::

    [topic, MAGIC, header, body]

Decoding applies limits *before* any other work: a frame larger than its limit is refused
without being parsed, msgpack is unpacked with explicit per-container limits, ext types and
non-string map keys are refused, and nesting is bounded. See docs/protocol.md.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from infernod.protocol.errors import InfernoError

MAGIC = b"INF1"
PROTOCOL_VERSION = 1

MAX_HEADER_BYTES = 4096
MAX_DEPTH = 32
MAX_STR_LEN = 4 * 1024 * 1024
MAX_BIN_LEN = 16 * 1024 * 1024
MAX_ARRAY_LEN = 100_000
MAX_MAP_LEN = 10_000


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def packb(obj: Any) -> bytes:
    """Serialize one header or body. Tuples become arrays; bytes stay binary."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _check_tree(obj: Any, depth: int = 0) -> None:
    """Bound nesting depth and require string map keys (iteratively bounded by MAX_DEPTH)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"map key {key!r} is not a string")
            if isinstance(value, (dict, list)):
                _check_tree(value, depth + 1)
    elif isinstance(obj, list):
        for value in obj:
            if isinstance(value, (dict, list)):
                _check_tree(value, depth + 1)


def unpackb(data: bytes | memoryview, *, max_bytes: int, what: str = "body") -> dict[str, Any]:
    """Decode one msgpack map with limits; raise InfernoError('bad_request') on anything odd.

    msgpack's C unpacker recurses per nesting level; a 2,000-deep document is well within
    its own stack guard, and ``_check_tree`` then rejects anything deeper than MAX_DEPTH.
    """
    if len(data) > max_bytes:
        raise InfernoError(
            "bad_request",
            f"{what} is {len(data)} bytes, limit {max_bytes}",
            "send smaller messages",
        )
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=min(MAX_STR_LEN, max_bytes),
            max_bin_len=min(MAX_BIN_LEN, max_bytes),
            max_array_len=min(MAX_ARRAY_LEN, max_bytes),
            max_map_len=min(MAX_MAP_LEN, max_bytes),
            max_ext_len=0,
            use_list=True,
        )
        if not isinstance(obj, dict):
            raise ValueError(f"{what} must be a map, got {type(obj).__name__}")
        _check_tree(obj)
    except InfernoError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, RecursionError) as e:
        raise InfernoError("bad_request", f"malformed {what}: {e}") from e
    except Exception as e:  # msgpack raises a few undocumented types on garbage
        raise InfernoError("bad_request", f"malformed {what}: {type(e).__name__}: {e}") from e
    return obj


def encode_request(header: dict[str, Any], body: dict[str, Any]) -> list[bytes]:
    return [MAGIC, packb(header), packb(body)]


def decode_request(
    frames: list[bytes], *, max_body_bytes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode ``[MAGIC, header, body]`` (the ROUTER identity already stripped)."""
    check_frames(frames)
    header = unpackb(frames[1], max_bytes=MAX_HEADER_BYTES, what="header")
    body = unpackb(frames[2], max_bytes=max_body_bytes, what="body")
    return header, body


def check_frames(frames: list[Any]) -> None:
    """Frame count and magic: the checks before anything is decoded. ``frames`` may be
    bytes or memoryviews (the daemon decodes ZeroMQ's buffers without copying them)."""
    if len(frames) == 4 and len(frames[0]) == 0 and frames[1] == MAGIC:
        # What a REQ socket, or a DEALER written after the zguide's REQ-emulation, sends.
        raise InfernoError(
            "bad_request",
            "an empty delimiter frame came before the magic frame: send exactly 3 frames "
            "[magic, header, body]",
            "use a DEALER socket and send no empty frame (docs/protocol.md, 'Framing')",
        )
    if len(frames) != 3:
        raise InfernoError(
            "bad_request",
            f"expected 3 frames [magic, header, body], got {len(frames)}",
            "see docs/protocol.md, 'Framing'",
        )
    if frames[0] != MAGIC:
        raise InfernoError(
            "bad_request",
            f"bad magic frame {bytes(frames[0][:8])!r}, expected {MAGIC!r}",
            "this daemon speaks Inferno protocol version 1",
        )


def now_wall() -> float:
    return time.time()

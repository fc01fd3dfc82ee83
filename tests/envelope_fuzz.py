"""Random request envelopes for fuzzing (tests/test_hostile.py, bench/fuzz_envelope.py).

Built with a ``random.Random`` so that hypothesis (``st.randoms()``) drives them cheaply and
the long bench run can make millions. Mostly plausible envelopes (a known type, fields that
the schemas know, values of the wrong type and size), some raw, cut, spliced or nested.
"""

from __future__ import annotations

import random

import msgpack

from infernod.protocol import codec
from infernod.protocol.errors import InfernoError
from infernod.protocol.messages import SCHEMAS, validate_body, validate_header

TYPES = sorted(SCHEMAS) + ["nope", "", "x" * 70]
FIELDS = ["model", "prompt", "max_tokens", "messages", "request_id", "from_seq", "key", "stop",
          "temperature", "priority", "seed", "x"]


def _scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, float("nan"),
        float("inf"), "", "a", "gemma3-270m", "x" * rng.randint(0, 300),
        bytes(rng.randrange(256) for _ in range(rng.randint(0, 16))),
        "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(4) if True).encode(
            "utf-8", "surrogatepass").decode("utf-8", "replace"),
    ])


def _value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.6:
        return _scalar(rng)
    if r < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(FIELDS + ["role", "content"]): _value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def random_envelope(rng: random.Random) -> list[bytes]:
    header = {"id": rng.choice(["1", "a b", "x" * 65, str(rng.random())]),
              "type": rng.choice(TYPES), "session": rng.choice(["s", "", "ß", "s" * 64])}
    for k in ("ts", "deadline", "idem", "x"):
        if rng.random() < 0.2:
            header[k] = _value(rng)
    body = {rng.choice(FIELDS): _value(rng) for _ in range(rng.randint(0, 5))}
    frames = [codec.MAGIC, msgpack.packb(header, use_bin_type=True),
              msgpack.packb(body, use_bin_type=True)]
    how = rng.randrange(8)
    if how == 1:  # one frame replaced by random bytes
        frames[rng.randrange(3)] = rng.randbytes(rng.randint(0, 64))
    elif how == 2:  # truncated
        i = rng.randint(1, 2)
        frames[i] = frames[i][:rng.randint(0, len(frames[i]))]
    elif how == 3:  # wrong frame count
        frames = frames[:rng.randint(0, 3)] + [rng.randbytes(4)] * rng.randint(0, 2)
    elif how == 4:  # hostile msgpack headers: huge counts, deep nesting, ext, int keys
        frames[2] = rng.choice([b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                                b"\x81\xa1a" + b"\x91" * rng.randint(30, 3000) + b"\xc0",
                                b"\xc7\x01\x05a", b"\x81\x01\x02",
                                b"\xdb\xff\xff\xff\xff" + b"a" * 8])
    elif how == 5:  # a byte flipped
        i = rng.randint(1, 2)
        if frames[i]:
            b = bytearray(frames[i])
            b[rng.randrange(len(b))] = rng.randrange(256)
            frames[i] = bytes(b)
    return frames


def check_envelope(frames: list[bytes]) -> str:
    """What the daemon does before a handler: only InfernoError may come out."""
    try:
        header, body = codec.decode_request(frames, max_body_bytes=1 << 20)
        validate_header(header)
        validate_body(header["type"], body, SCHEMAS)
    except InfernoError as e:
        assert e.code in ("bad_request", "unknown_type"), e
        return e.code
    return "ok"

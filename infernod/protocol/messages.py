"""Request schemas: every request body is validated here before a handler sees it.

A schema is a dict of field name -> :class:`F`. Unknown fields are refused (a typo such as
``max_token`` must not be silently ignored). The same tables generate the field lists in
docs/protocol.md, so the doc and the code cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import JOB_STATES as JOB_STATES
from infernod.protocol.vocabulary import PRIORITIES as PRIORITIES

_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # no '.': it separates topic parts


@dataclass(frozen=True)
class F:
    """One field: its type(s), whether it is required, and bounds."""

    types: tuple[type, ...]
    required: bool = False
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    choices: tuple[Any, ...] | None = None
    items: type | None = None
    doc: str = ""


NUM = (int, float)
STR = (str,)
BOOL = (bool,)
INT = (int,)
LIST = (list,)
MAP = (dict,)
BIN = (bytes,)

HEADER: dict[str, F] = {
    "id": F(STR, True, max_len=64, doc="message id chosen by the client, unique per session"),
    "type": F(STR, True, max_len=64, doc="request type, e.g. 'generate'"),
    "session": F(STR, True, max_len=64, doc="client session id (random, per connection)"),
    "ts": F(NUM, False, doc="client wall-clock time, seconds since the epoch"),
    "deadline": F(NUM, False, doc="absolute wall-clock deadline, seconds since the epoch"),
    "idem": F(STR, False, max_len=128, doc="idempotency key (jobs.submit)"),
    "api_key": F(STR, False, max_len=128, doc="an HTTP user's API key, forwarded by the "
                 "gateway: the request runs as that key's principal and role"),
}

# The keys of vocabulary.GENERATION_PARAMS, in its order (tests/test_bodies.py checks).
_SAMPLING: dict[str, F] = {
    "max_tokens": F(INT, min=1, max=131072, doc="tokens to generate at most (default 256)"),
    "temperature": F(NUM, min=0, max=5, doc="0 = greedy (default 0.8)"),
    "top_k": F(INT, min=0, max=100000, doc="0 = off (default 40)"),
    "top_p": F(NUM, min=0, max=1, doc="default 0.95"),
    "min_p": F(NUM, min=0, max=1, doc="default 0.05"),
    "repeat_penalty": F(NUM, min=0, max=10, doc="default 1.0 (off)"),
    "frequency_penalty": F(NUM, min=-2, max=2, doc="default 0"),
    "presence_penalty": F(NUM, min=-2, max=2, doc="default 0"),
    "repeat_last_n": F(INT, min=0, max=8192, doc="window for penalties (default 64)"),
    "seed": F(INT, min=0, max=2**32 - 1, doc="sampling seed"),
    "stop": F(LIST, max_len=16, items=str, doc="stop strings (never emitted)"),
    "ignore_eos": F(BOOL, doc="keep generating past end-of-generation tokens (benchmarks)"),
}

# A label the queue rows and profiles show for the request instead of its session (the
# gateway sends OpenAI's ``user``); printable text only, since log lines carry it too.
MAX_LABEL_CHARS = 64
_LABEL: dict[str, F] = {
    "client": F(STR, max_len=MAX_LABEL_CHARS, doc="a label shown with the request in queue "
                "rows and profiles instead of its session, e.g. the end user an HTTP request "
                "is for (not an identity: the principal decides what it may do)"),
}

# Structured output (generate and jobs.submit): at most one of the two.
_STRUCTURED: dict[str, F] = {
    "json_schema": F(MAP, doc="a JSON Schema the output must match (enforced with a llama.cpp "
                     "grammar; {\"type\": \"object\"} = any JSON object); bad_schema if it "
                     "cannot be converted"),
    "grammar": F(STR, max_len=256 * 1024, doc="a GBNF grammar (root rule 'root') the output "
                 "must match"),
}

SCHEMAS: dict[str, dict[str, F]] = {
    "hello": {
        "client": F(STR, max_len=64, doc="client program name"),
        "version": F(STR, max_len=32, doc="client program version"),
    },
    "ping": {},
    "status": {},
    "config.get": {"key": F(STR, max_len=128, doc="dotted key; omit for the whole config")},
    "models.list": {},
    "models.show": {"model": F(STR, True, max_len=64)},
    "models.load": {
        "model": F(STR, True, max_len=64),
        "keep_alive": F(NUM, min=-1, max=10**7, doc="seconds idle before unload; -1 pins"),
    },
    "models.unload": {"model": F(STR, True, max_len=64)},
    "models.import": {
        "path": F(STR, True, max_len=4096, doc="absolute path of a .gguf/.onnx file or ONNX "
                  "directory on the daemon host, inside models.import_dirs"),
        "name": F(STR, max_len=64),
        "link": F(BOOL, doc="symlink instead of copy"),
    },
    "models.upload.begin": {
        "filename": F(STR, True, max_len=255, doc="the file's bare name; .gguf or .onnx"),
        "size": F(INT, True, min=1, max=2**44, doc="bytes the client will send"),
        "name": F(STR, max_len=64, doc="model name (default from filename)"),
        "resume": F(BOOL, doc="go on with your unfinished upload of the same name and size "
                              "(default true)"),
    },
    "models.upload.chunk": {
        "upload_id": F(STR, True, max_len=64),
        "offset": F(INT, True, min=0, max=2**44, doc="bytes sent before this chunk"),
        "data": F(BIN, True, doc="1 to chunk_bytes bytes (binary)"),
    },
    "models.upload.finish": {
        "upload_id": F(STR, True, max_len=64),
        "sha256": F(STR, True, max_len=64, doc="hex sha256 of the whole file"),
    },
    "models.upload.abort": {"upload_id": F(STR, True, max_len=64)},
    "models.remove": {"model": F(STR, True, max_len=64)},
    "models.pull": {
        "source": F(STR, True, max_len=2048, doc="an http(s):// URL of a .gguf/.onnx file, "
                    "hf://org/repo/file.gguf, or org/repo:QUANT"),
        "name": F(STR, max_len=64, doc="model name (default from the file name)"),
        "sha256": F(STR, max_len=64, doc="hex sha256 the file must have (default: the hub's, "
                    "if any)"),
        "stall_timeout_s": F(NUM, min=1, max=3600, doc="fail when no byte arrives for this "
                             "long (default 60)"),
    },
    "models.pull.cancel": {"pull": F(STR, True, max_len=64, doc="pull_id or model name")},
    "models.pulls": {},
    "models.set": {
        "model": F(STR, True, max_len=64),
        "settings": F(MAP, True, doc="{key: value}: the model's own settings (see "
                      "'inferno models keys')"),
    },
    "models.unset": {
        "model": F(STR, True, max_len=64),
        "keys": F(LIST, True, max_len=64, items=str, doc="settings to remove: the model "
                  "falls back to the config's value"),
    },
    "generate": {
        "model": F(STR, True, max_len=64),
        "prompt": F(STR, max_len=4 * 1024 * 1024, doc="raw completion prompt"),
        "messages": F(LIST, max_len=1024, items=dict, doc="chat: [{role, content}]"),
        "priority": F(STR, choices=PRIORITIES, doc="default 'normal'"),
        "keep_alive": F(NUM, min=-1, max=10**7),
        "timeout_s": F(NUM, min=0.1, max=86400, doc="total inference timeout"),
        "stall_timeout_s": F(NUM, min=0.1, max=3600, doc="max time between tokens"),
        "logprobs": F(BOOL, doc="token events carry each token's log-probability"),
        "top_logprobs": F(INT, min=0, max=20, doc="with logprobs: the N most likely "
                          "alternatives of each token (default 0)"),
        **_LABEL,
        **_STRUCTURED,
        **_SAMPLING,
    },
    "embed": {
        "model": F(STR, True, max_len=64, doc="an ONNX embedding model or a GGUF model"),
        "texts": F(LIST, True, max_len=4096, items=str, doc="texts to embed"),
        "normalize": F(BOOL, doc="L2-normalise each vector (default true)"),
        "priority": F(STR, choices=PRIORITIES, doc="default 'normal'"),
        "keep_alive": F(NUM, min=-1, max=10**7),
        "timeout_s": F(NUM, min=0.1, max=86400, doc="queue + run time limit"),
        **_LABEL,
    },
    "infer": {
        "model": F(STR, True, max_len=64, doc="an ONNX model"),
        "inputs": F(MAP, True, doc="{input name: {dtype, shape, data}}"),
        "priority": F(STR, choices=PRIORITIES, doc="default 'normal'"),
        "keep_alive": F(NUM, min=-1, max=10**7),
        "timeout_s": F(NUM, min=0.1, max=86400, doc="queue + run time limit"),
    },
    "cancel": {"request_id": F(STR, True, max_len=128)},
    "queue.list": {"model": F(STR, max_len=64, doc="only this model's requests")},
    "reprioritize": {
        "request_id": F(STR, True, max_len=128),
        "priority": F(STR, True, choices=PRIORITIES, doc="new requested class"),
    },
    "jobs.submit": {
        "model": F(STR, True, max_len=64),
        "prompts": F(LIST, True, max_len=10000, items=str, doc="one item per prompt"),
        "priority": F(STR, choices=PRIORITIES, doc="default 'low'"),
        "client": F(STR, max_len=64, doc="a label shown with the job (not an identity: the "
                    "owner is the caller's principal, which also scopes header.idem)"),
        "chat": F(BOOL, doc="wrap each prompt as one user message in the chat template"),
        "timeout_s": F(NUM, min=0.1, max=86400, doc="total inference timeout per item"),
        "stall_timeout_s": F(NUM, min=0.1, max=3600, doc="max time between tokens"),
        **_STRUCTURED,
        **_SAMPLING,
    },
    "jobs.get": {
        "job_id": F(STR, True, max_len=64),
        "offset": F(INT, min=0, max=10_000_000, doc="first item index to return (default 0)"),
        "limit": F(INT, min=1, max=10_000, doc="items per reply (default 1000)"),
    },
    "jobs.list": {
        "state": F(STR, choices=JOB_STATES),
        "model": F(STR, max_len=64),
        "owner": F(STR, max_len=128, doc="uid:N or key:NAME (another's: operator only)"),
        "client": F(STR, max_len=64, doc="the label given at submit"),
        "since": F(NUM, min=0, max=1e11, doc="created at or after (wall clock, epoch seconds)"),
        "limit": F(INT, min=1, max=1000, doc="newest first (default 100)"),
    },
    "jobs.cancel": {"job_id": F(STR, True, max_len=64)},
    "stream.fetch": {
        "request_id": F(STR, True, max_len=128),
        "from_seq": F(INT, min=0, max=2**53, doc="first token-event seq wanted (default 0)"),
    },
    "stats": {},
    "profiles.recent": {
        "n": F(INT, min=1, max=1_000_000, doc="how many of the latest profiles (default 20)"),
    },
    "metrics.get": {},
}


def _check(name: str, value: Any, spec: F, where: str) -> None:
    if isinstance(value, bool) and bool not in spec.types:
        ok = False
    else:
        ok = isinstance(value, spec.types)
    if not ok:
        want = "/".join(t.__name__ for t in spec.types)
        raise InfernoError(
            "bad_request", f"{where}.{name} must be {want}, got {type(value).__name__}"
        )
    if spec.choices is not None and value not in spec.choices:
        raise InfernoError(
            "bad_request",
            f"{where}.{name} = {value!r} is not one of {', '.join(map(str, spec.choices))}",
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):  # NaN, inf, -inf
            raise InfernoError("bad_request", f"{where}.{name} = {value} is not a finite "
                                              "number")
        if spec.min is not None and value < spec.min:
            raise InfernoError("bad_request", f"{where}.{name} = {value} is below {spec.min}")
        if spec.max is not None and value > spec.max:
            raise InfernoError("bad_request", f"{where}.{name} = {value} is above {spec.max}")
    if spec.max_len is not None and isinstance(value, (str, list)) and len(value) > spec.max_len:
        raise InfernoError(
            "bad_request", f"{where}.{name} has {len(value)} items/chars, limit {spec.max_len}"
        )
    if spec.items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, spec.items):
                raise InfernoError(
                    "bad_request",
                    f"{where}.{name}[{i}] must be {spec.items.__name__}, "
                    f"got {type(item).__name__}",
                )


def validate(fields: dict[str, Any], schema: dict[str, F], where: str) -> dict[str, Any]:
    for name, spec in schema.items():
        if spec.required and name not in fields:
            raise InfernoError("bad_request", f"{where}.{name} is required")
    for name, value in fields.items():
        field = schema.get(name)
        if field is None:
            known = ", ".join(sorted(schema)) or "none"
            raise InfernoError(
                "bad_request", f"unknown field {where}.{name}", f"known fields: {known}"
            )
        if value is None and not field.required:
            continue
        _check(name, value, field, where)
    return fields


def validate_header(header: dict[str, Any]) -> dict[str, Any]:
    validate(header, HEADER, "header")
    if not _ID_RE.match(header["id"]):
        raise InfernoError("bad_request", "header.id may only hold A-Z a-z 0-9 . _ : - "
                                          "(1-64 chars)")
    if not _SESSION_RE.match(header["session"]):
        raise InfernoError("bad_request", "header.session may only hold A-Z a-z 0-9 _ - "
                                          "(1-64 chars)")
    return header


def validate_body(
    type_: str, body: dict[str, Any], schemas: dict[str, dict[str, F]]
) -> dict[str, Any]:
    schema = schemas.get(type_)
    if schema is None:
        raise InfernoError(
            "unknown_type",
            f"unknown request type {type_!r}",
            f"supported: {', '.join(sorted(schemas))}",
        )
    validate(body, schema, type_)
    if type_ == "generate":
        _validate_generate(body)
    if "stop" in schema:
        _validate_stop(type_, body)
    if "client" in schema and type_ != "hello":  # hello's: the program's name
        _validate_label(type_, body)
    return body


def valid_label(label: str) -> bool:
    """A label goes into queue rows, profiles and log lines: 1-MAX_LABEL_CHARS characters,
    none of them a control character (a newline would forge a log line)."""
    return 0 < len(label) <= MAX_LABEL_CHARS and label.isprintable()


def _validate_label(type_: str, body: dict[str, Any]) -> None:
    label = body.get("client")
    if label is not None and not valid_label(label):
        raise InfernoError("bad_request", f"{type_}.client must be 1-{MAX_LABEL_CHARS} "
                           "printable characters (no newlines or other control characters)",
                           "send a name or an opaque id, e.g. a hash of the user's account")


MAX_STOP_CHARS = 256


def _validate_stop(type_: str, body: dict[str, Any]) -> None:
    """Stop strings are matched against every token's text: each is 1-256 characters, for
    every request type that takes them (a job applies them to each of its items)."""
    for i, s in enumerate(body.get("stop") or []):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InfernoError("bad_request",
                               f"{type_}.stop[{i}] must be 1-{MAX_STOP_CHARS} characters")


def _validate_generate(body: dict[str, Any]) -> None:
    has_prompt = body.get("prompt") is not None
    has_messages = body.get("messages") is not None
    if has_prompt == has_messages:
        raise InfernoError(
            "bad_request",
            "generate needs exactly one of 'prompt' (completion) or 'messages' (chat)",
        )
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise InfernoError("bad_request", "generate.top_logprobs needs logprobs: true")
    for i, msg in enumerate(body.get("messages") or []):
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InfernoError(
                "bad_request",
                f"generate.messages[{i}] must be {{role: system|user|assistant, content: str}}",
            )


SMALL_BODY_BYTES = 64 * 1024  # a body this small is always decoded (cheap), whatever its type


def max_body_bytes(type_: str, schemas: dict[str, dict[str, F]] | None = None) -> int | None:
    """The largest body a valid request of ``type_`` can have (msgpack bytes, at least
    SMALL_BODY_BYTES), or None when a field (a list, a map, an unbounded string) lets it be
    as large as any message. The daemon refuses a larger body before decoding it."""
    schema = (SCHEMAS if schemas is None else schemas).get(type_)
    if schema is None:
        return SMALL_BODY_BYTES
    size = 5  # map32 header
    for name, spec in schema.items():
        size += 5 + 4 * len(name)
        if set(spec.types) - {int, float, bool, str}:
            return None
        if str in spec.types:
            longest = spec.max_len if spec.choices is None else \
                max(len(str(c)) for c in spec.choices)
            if longest is None:
                return None
            size += 5 + 4 * longest  # UTF-8: at most 4 bytes per character
        else:
            size += 9
    return max(SMALL_BODY_BYTES, size)

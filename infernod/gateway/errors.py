"""Errors as OpenAI's clients read them: ``{"error": {message, type, param, code}}`` with
the HTTP status they branch on. The one table :data:`STATUS` maps every daemon error code
(infernod/protocol/errors.py) to its status; nothing else in the gateway picks a status
for a daemon error.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from infernod.protocol.errors import CODES, InfernoError

# Daemon error code -> HTTP status. 429 and 503 carry Retry-After when the daemon gave
# retry_after_ms. A code missing here is a bug in the table (tests check it covers CODES).
STATUS: dict[str, int] = {
    "bad_request": 400,
    "unknown_type": 501,
    "unknown_model": 404,
    "model_not_loaded": 503,
    "model_busy": 503,
    "model_unloaded": 503,
    "cpu_unsupported": 501,
    "backend_unavailable": 503,
    "insufficient_memory": 503,
    "context_exceeded": 400,
    "overloaded": 429,
    "would_miss_deadline": 504,
    "deadline_exceeded": 504,
    "timeout": 504,
    "cancelled": 499,
    "aborted": 503,
    "unknown_request": 404,
    "unknown_job": 404,
    "forbidden": 403,
    "unauthenticated": 401,
    "rate_limited": 429,
    "shutting_down": 503,
    "unavailable": 503,
    "config_error": 500,
    "invalid_setting": 400,
    "conflict": 409,
    "not_supported": 400,
    "bad_schema": 400,
    "quota_exceeded": 429,
    "busy": 429,
    "too_large": 413,
    "storage_full": 507,
    "runner_crashed": 502,
    "internal": 500,
    "path_not_allowed": 403,
    "unsafe_path": 403,
    "invalid_model": 400,
    "checksum_mismatch": 400,
    "unknown_upload": 404,
    "insufficient_storage": 507,
    "pull_failed": 502,
    "source_not_found": 404,
    "unknown_pull": 404,
}

# HTTP status -> OpenAI's error `type` (what its SDKs and LiteLLM read besides the status).
TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
}

# Codes OpenAI's clients know under another name.
OPENAI_CODES: dict[str, str] = {"unknown_model": "model_not_found",
                                "context_exceeded": "context_length_exceeded"}
# The request field a code is about, when the daemon's error does not name one.
PARAMS: dict[str, str] = {"bad_schema": "response_format", "unknown_model": "model",
                          "context_exceeded": "messages"}


class HttpError(Exception):
    """An error the gateway answers itself (a bad body, no key): already an HTTP status."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        out = dict(headers or {})
        if self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return web.Response(status=self.status, text=json.dumps(self.body()),
                            content_type="application/json", headers=out)


def bad_request(message: str, param: str | None = None,
                code: str = "invalid_request") -> HttpError:
    return HttpError(400, message, code=code, param=param)


def from_inferno(e: InfernoError) -> HttpError:
    """The daemon's (or the client library's) error as the HTTP error OpenAI clients expect;
    the hint travels in the message, the daemon's code in ``code``."""
    status = STATUS.get(e.code, 500)
    message = e.message if not e.hint else f"{e.message} ({e.hint})"
    retry_ms = e.extra.get("retry_after_ms")
    retry_s = retry_ms / 1000 if isinstance(retry_ms, (int, float)) else None
    if retry_s is None and status in (429, 503) and e.code != "unavailable":
        retry_s = 1.0
    param = e.extra.get("param")
    return HttpError(status, message, code=OPENAI_CODES.get(e.code, e.code),
                     param=param if isinstance(param, str) else PARAMS.get(e.code),
                     retry_after_s=retry_s)


def missing_codes() -> set[str]:
    """Daemon codes the table forgot (tests assert none)."""
    return set(CODES) - set(STATUS)

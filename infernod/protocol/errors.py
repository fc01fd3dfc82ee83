"""Stable error codes and the one exception type that carries them across the wire.

Every error reply is ``{code, message, hint}`` (plus optional extra fields such as
``retry_after_ms``). The daemon raises :class:`InfernoError` anywhere below the dispatcher;
the dispatcher turns it into an error reply; the client turns the reply back into the same
exception class, so a script sees the daemon's code unchanged.
"""

from __future__ import annotations

from typing import Any

# code -> short default hint. The set of codes is part of the protocol: only add, never rename.
CODES: dict[str, str] = {
    "bad_request": "check the message against docs/protocol.md",
    "unknown_type": "send 'hello' to list the request types this daemon supports",
    "unknown_model": "run 'inferno models' to list available models",
    "model_not_loaded": "load it first: 'inferno load MODEL'",
    "model_busy": "the model is in use; retry when its requests finish",
    "model_unloaded": "an operator unloaded the model while the request waited for it; "
                      "resubmit to load it again",
    "cpu_unsupported": "this llama.cpp build cannot run on this CPU; see inferno doctor",
    "backend_unavailable": "llama.cpp could not be loaded; see inferno doctor",
    "insufficient_memory": "unload another model or raise the memory budget in infernod.toml",
    "context_exceeded": "shorten the prompt or load the model with a larger context",
    "overloaded": "the queue is full; retry after retry_after_ms",
    "would_miss_deadline": "relax the deadline or retry when the queue is shorter",
    "deadline_exceeded": "the deadline passed before the request could finish",
    "timeout": "the request ran past its time limit",
    "cancelled": "the request was cancelled",
    "aborted": "the daemon stopped the request; see the message for why",
    "unknown_request": "the request id is not known (finished long ago, or never existed)",
    "unknown_job": "run 'inferno jobs list' to see job ids",
    "forbidden": "your role does not allow this request",
    "unauthenticated": "the API key is missing, unknown or revoked; ask an operator for one",
    "rate_limited": "slow down; retry after retry_after_ms",
    "shutting_down": "the daemon is stopping; retry when it is back",
    "unavailable": "is infernod running? try 'systemctl status infernod'",
    "config_error": "fix the named key in infernod.toml",
    "invalid_setting": "see 'inferno models keys' for each per-model setting and its rules",
    "conflict": "the target already exists or is in the wrong state",
    "not_supported": "this build or model does not support the request",
    "bad_schema": "json_schema (or grammar) cannot be enforced: use the JSON Schema subset "
                  "llama.cpp converts (type, properties, required, items, enum, const, "
                  "anyOf/oneOf, local $ref, string pattern ^...$)",
    "quota_exceeded": "you have reached a per-principal quota; see the message and its "
                      "quota field",
    "busy": "your (or everyone's) unfinished requests hold too many bytes; retry after "
            "retry_after_ms",
    "too_large": "the request is larger than the daemon accepts; send less in one request",
    "storage_full": "free space on the daemon's state directory filesystem, then retry",
    "runner_crashed": "the model's runner process died (see the message for the signal); the "
                      "next request loads it again, 'inferno models' shows the reason",
    "internal": "this is a bug in infernod; the daemon log has the details",
    "path_not_allowed": "send the file from your machine instead: 'inferno import FILE'",
    "unsafe_path": "symlinks, hard links and paths leaving the model's directory are refused",
    "invalid_model": "the file is damaged or not a GGUF/ONNX model; nothing was imported",
    "checksum_mismatch": "the upload was corrupted or the file changed while it was sent; "
                         "send it again",
    "unknown_upload": "the upload finished, was aborted or expired; start it again",
    "insufficient_storage": "free disk space in the model directory, or import a smaller file",
    "pull_failed": "the download failed (see the message, and http_status if the server "
                   "answered); pull again to resume it",
    "source_not_found": "the URL, repository or file does not exist; check SOURCE",
    "unknown_pull": "the pull finished long ago or never existed; 'inferno pull --list'",
}


class InfernoError(Exception):
    """An error with a stable code, a human message and a hint on what to do next."""

    def __init__(self, code: str, message: str, hint: str | None = None, **extra: Any) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint if hint is not None else CODES[code]
        self.extra = extra

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "hint": self.hint}
        body.update(self.extra)
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> InfernoError:
        code = body.get("code")
        if not isinstance(code, str) or code not in CODES:
            code = "internal"
        extra = {k: v for k, v in body.items() if k not in ("code", "message", "hint")}
        return cls(code, str(body.get("message", "")), body.get("hint"), **extra)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"InfernoError({self.code!r}, {self.message!r})"


class DaemonUnavailable(InfernoError):
    """Raised by clients when no daemon answers (nothing listening, lost heartbeats, killed)."""

    def __init__(self, message: str, hint: str | None = None, **extra: Any) -> None:
        super().__init__("unavailable", message, hint, **extra)

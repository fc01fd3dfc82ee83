"""OpenAI request bodies to the daemon's ``generate``/``embed`` bodies, and the daemon's
answers back to OpenAI's response and chunk objects. Pure: no I/O, no aiohttp.

What OpenAI offers and Inferno cannot do yet is refused with a 400 naming the field, never
silently ignored: a caller relying on ``n=2`` must not get one answer.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from infernod.gateway.errors import bad_request
from infernod.protocol.messages import MAX_LABEL_CHARS, valid_label
from infernod.protocol.vocabulary import PRIORITIES


# vLLM's integer priority: lower runs earlier, 0 is the default. Inferno's classes.
def priority_from(value: object, where: str = "priority") -> str | None:
    """``vip``/``high``/``normal``/``low`` by name, or vLLM's integer (lower = sooner):
    <= -2 vip, -1 high, 0 normal, >= 1 low. None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITIES:
            return name
        try:
            value = int(name)
        except ValueError:
            raise bad_request(f"{where} must be one of {', '.join(PRIORITIES)} or an "
                              f"integer (vLLM: lower runs sooner), not {value!r}",
                              "priority") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{where} must be a class name or an integer", "priority")
    if value <= -2:
        return "vip"
    if value == -1:
        return "high"
    return "normal" if value == 0 else "low"


@dataclass
class GenCall:
    """One chat or completions request, ready for ``AsyncClient.generate``."""

    kind: str  # "chat" | "completion"
    model: str
    stream: bool
    include_usage: bool
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    user: str | None = None

    @property
    def logprobs(self) -> bool:
        return bool(self.params.get("logprobs"))


def _num(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{key}' must be a number", key)
    return v


def _int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{key}' must be an integer", key)
    return v


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported: send several requests for several "
                          "choices", "n", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad_request("best_of is not supported", "best_of", "unsupported_parameter")
    for key in ("tools", "functions", "logit_bias", "suffix"):
        if body.get(key):
            raise bad_request(f"'{key}' is not supported", key, "unsupported_parameter")
    if body.get("echo"):
        raise bad_request("'echo' is not supported", "echo", "unsupported_parameter")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = _num(body, key)
        if v is not None:
            params[key] = v
    seed = _int(body, "seed")
    if seed is not None:
        params["seed"] = seed
    # vLLM's extra sampling fields, for clients that already send them to vLLM.
    for key, ours in (("top_k", "top_k"), ("min_p", "min_p"),
                      ("repetition_penalty", "repeat_penalty")):
        v = _num(body, key) if ours != "top_k" else _int(body, key)
        if v is not None:
            params[ours] = 0 if ours == "top_k" and v == -1 else v  # vLLM: -1 = off
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise bad_request("'ignore_eos' must be a boolean", "ignore_eos")
        params["ignore_eos"] = ignore_eos
    stop = body.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            params["stop"] = stop
    elif stop is not None:
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    return params


def _logprobs(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """Chat: ``logprobs`` (bool) + ``top_logprobs`` (0-20). Completions: ``logprobs`` is the
    number of alternatives (0-5 at OpenAI; up to 20 here). The daemon's ``logprobs`` /
    ``top_logprobs``."""
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "completion":
        if value is None:
            return {}
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
            raise bad_request("'logprobs' must be an integer 0-20 (alternatives per token)",
                              "logprobs")
        return {"logprobs": True, "top_logprobs": value}
    if value is not None and not isinstance(value, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise bad_request("'top_logprobs' must be an integer 0-20", "top_logprobs")
        if not value:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not value:
        return {}
    return {"logprobs": True, "top_logprobs": top or 0}


def _response_format(body: dict[str, Any]) -> dict[str, Any]:
    """``json_object`` -> the daemon's ``json_schema: {"type": "object"}``; ``json_schema``
    -> its ``schema`` (enforced by a llama.cpp grammar in the daemon)."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with 'name' "
                              "and 'schema'", "response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON Schema "
                              "object", "response_format")
        return {"json_schema": schema}
    raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema'",
                      "response_format")


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include = bool((opts or {}).get("include_usage"))
    return bool(stream), include


def _model(body: dict[str, Any], default: str | None) -> str:
    model = body.get("model")
    if model is None or model == "":
        if default:
            return default
        raise bad_request("'model' is required", "model")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    return model


def user_label(body: dict[str, Any]) -> str | None:
    """OpenAI's ``user``: it travels to the daemon as the request's ``client`` label (queue
    rows, profiles), so it is held to that label's bounds here, with OpenAI's error shape."""
    user = body.get("user")
    if user is None or user == "":
        return None
    if not isinstance(user, str):
        raise bad_request("'user' must be a string", "user")
    if not valid_label(user):
        what = f"{len(user)} characters" if user.isprintable() else "control characters"
        raise bad_request(f"'user' must be at most {MAX_LABEL_CHARS} printable characters, "
                          f"not {what}: send a short id, e.g. a hash of the account", "user")
    return user


def _content(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content: only text parts are supported",
                                  "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                      "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: dict[str, Any], default_model: str | None) -> GenCall:
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(f"messages[{i}].role {m.get('role')!r} is not supported "
                              f"(use {', '.join(ROLES)})", "messages")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    stream, include = _stream_flags(body)
    params = {**_sampling(body), **_logprobs(body, "chat"), **_response_format(body)}
    return GenCall("chat", _model(body, default_model), stream, include, messages=out,
                   params=params, user=user_label(body))


def parse_completion(body: dict[str, Any], default_model: str | None) -> GenCall:
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (a list of one string is accepted; "
                          "token arrays and batches are not supported)", "prompt")
    stream, include = _stream_flags(body)
    params = {**_sampling(body), **_logprobs(body, "completion"), **_response_format(body)}
    params.setdefault("max_tokens", 16)  # OpenAI's default for /v1/completions
    return GenCall("completion", _model(body, default_model), stream, include,
                   prompt=prompt, params=params, user=user_label(body))


def parse_embeddings(body: dict[str, Any], default_model: str | None
                     ) -> tuple[str, list[str], str]:
    """(model, texts, encoding_format)."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        raise bad_request("'input' must be a string or a non-empty list of strings (token "
                          "arrays are not supported)", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: the model's own size is returned",
                          "dimensions", "unsupported_parameter")
    user_label(body)
    return _model(body, default_model), texts, fmt


# -- answers ---------------------------------------------------------------------------------
FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "stop"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(stats: dict[str, Any] | None) -> dict[str, int]:
    stats = stats or {}
    prompt = int(stats.get("prompt_tokens") or 0)
    completion = int(stats.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(stats: dict[str, Any] | None) -> str:
    return FINISH.get(str((stats or {}).get("finish_reason")), "stop")


def logprobs_object(call: GenCall, entries: list[dict[str, Any]] | None,
                    text_offset: int = 0) -> dict[str, Any] | None:
    """The daemon's per-token entries (``{id, token, logprob, bytes, top}``, see
    docs/protocol.md) in OpenAI's shape: chat's ``{content: [...], refusal}``, or the legacy
    completions' parallel lists (``text_offset`` counts from the text's start)."""
    if not call.logprobs or entries is None:
        return None
    if call.kind == "chat":
        return {"content": [
            {"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                               "bytes": t.get("bytes")} for t in e.get("top") or []]}
            for e in entries], "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top") or []}
                             for e in entries],
            "text_offset": offsets}


def completion_object(call: GenCall, rid: str, created: int, text: str,
                      stats: dict[str, Any] | None,
                      logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    reason = finish_reason(stats)
    lp = logprobs_object(call, logprobs)
    if call.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": text, "refusal": None},
                                  "logprobs": lp, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": call.model,
            "system_fingerprint": None, "choices": [choice], "usage": usage(stats)}


def chunk(call: GenCall, rid: str, created: int, *, text: str | None = None,
          first: bool = False, finish: str | None = None,
          usage_of: dict[str, Any] | None = None, final_usage: bool = False,
          logprobs: list[dict[str, Any]] | None = None, text_offset: int = 0
          ) -> dict[str, Any]:
    """One streamed chunk as OpenAI sends it: a delta (with its tokens' ``logprobs``), the
    finish, or (``final_usage``) the last chunk with empty choices and ``usage``."""
    choices: list[dict[str, Any]] = []
    lp = logprobs_object(call, logprobs, text_offset)
    if not final_usage:
        if call.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "logprobs": lp,
                        "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": lp,
                        "finish_reason": finish}]
    out: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk" if call.kind == "chat"
        else "text_completion", "created": created, "model": call.model,
        "system_fingerprint": None, "choices": choices}
    if call.include_usage:
        out["usage"] = usage(usage_of) if final_usage else None
    return out


def embeddings_object(model: str, vectors: Any, fmt: str, tokens: int) -> dict[str, Any]:
    data = []
    for i, row in enumerate(vectors):
        emb: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode()
                    if fmt == "base64" else [float(x) for x in row])
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_object(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": int(m.get("mtime") or 0),
         "owned_by": "inferno", "kind": m.get("kind"), "state": m.get("state")}
        for m in models]}


def now_s() -> int:
    return int(time.time())

"""Per-model settings: declared once here, validated with the config's and the wire's rules.

A model may carry its own n_ctx, slots, GPU layers, flash attention, threads, chat template,
system prompt, default sampling, keep_alive, pin and allowed roles. Each key names where its
rules and its default come from: a config key (``config.check_value`` validates it, the
config's value is its default), a field of the ``generate`` schema (the wire's own bounds;
the engine's default), or a rule of its own. Nothing is declared twice.

``SettingsStore`` keeps them in one TOML file in the state directory (0600, written
atomically), one table per model. Load keys (``Key.load``) take effect on the model's next
load; the others at once. The CLI parses ``key=value`` text with :func:`parse_text`; the
daemon validates typed values with :func:`check`.
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infernod import config as config_mod
from infernod.backends.base import SamplingParams
from infernod.protocol.errors import InfernoError
from infernod.protocol.messages import BOOL, INT, LIST, NUM, SCHEMAS, F, validate
from infernod.protocol.vocabulary import SAMPLING_KEYS

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo

log = logging.getLogger("infernod.model_settings")

ROLES = ("monitor", "user", "operator")  # lowest first; 'none' can send nothing anyway
TEMPLATE_NAMES = ("gemma", "llama3", "chatml")  # backends.templates.FALLBACK_TEMPLATES
MAX_TEXT = 64 * 1024  # a system prompt or a chat template
SOURCES = ("request", "model", "config", "default")


@dataclass(frozen=True)
class Key:
    doc: str
    config: str | None = None  # validated by and defaulting to this config key
    wire: F | None = None  # validated by this generate field (its bounds)
    load: bool = False  # takes effect on the next load (else at once)
    default: bool | int | float | str | list[str] | None = None  # without a config key


_SAMPLING_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SamplingParams)}
_GEN = SCHEMAS["generate"]

KEYS: dict[str, Key] = {
    "n_ctx": Key("context tokens per slot", config="models.n_ctx", load=True),
    "slots": Key("sequences decoded together", config="models.slots", load=True),
    "n_gpu_layers": Key("layers offloaded to the GPU; -1 = all; 'auto' = as many as fit "
                        "the GPU's free memory (the estimate)", config="models.n_gpu_layers",
                        load=True),
    "flash_attn": Key("flash attention", config="models.flash_attn", load=True),
    "threads": Key("decode threads; 0 = cores", config="models.threads", load=True),
    "threads_batch": Key("prompt threads; 0 = cores", config="models.threads_batch",
                         load=True),
    "keep_alive_s": Key("idle seconds before unloading; -1 = never",
                        config="models.keep_alive_s"),
    "pin": Key("never unloaded for idleness or to make room", default=False),
    "allowed_roles": Key("roles that may run requests on the model (operators always may); "
                         "[] = every role the request allows", default=[]),
    "chat_template": Key("chat template: gemma, llama3, chatml or a jinja template; '' = the "
                         "model's own (or its architecture's fallback)", default=""),
    "system_prompt": Key("system message put first in a chat that has none", default=""),
    "max_tokens": Key("default tokens to generate", wire=_GEN["max_tokens"], default=256),
    **{k: Key(f"default {k}", wire=_GEN[k], default=_SAMPLING_DEFAULTS[k])
       for k in SAMPLING_KEYS},
    "stop": Key("default stop strings", wire=_GEN["stop"], default=[]),
}
LOAD_KEYS = tuple(k for k, s in KEYS.items() if s.load)
# the keys a generate body may carry itself (a request's value wins)
REQUEST_KEYS = ("max_tokens", *SAMPLING_KEYS, "stop")


def _bad(key: str, message: str) -> InfernoError:
    spec = KEYS.get(key)
    hint = (f"{key}: {spec.doc}" if spec else
            f"known settings: {', '.join(KEYS)}")
    return InfernoError("invalid_setting", message, hint, key=key)


def check(key: str, value: Any) -> Any:
    """``value`` for ``key``, validated and normalised, or InfernoError invalid_setting."""
    spec = KEYS.get(key)
    if spec is None:
        raise _bad(key, f"unknown setting {key!r}")
    if value is None:
        raise _bad(key, f"{key} needs a value ('unset' removes a setting)")
    if spec.config is not None:
        if key == "n_gpu_layers" and value == "auto":
            return value
        try:
            return config_mod.check_value(spec.config, value)
        except config_mod.ConfigError as e:
            raise _bad(key, str(e).replace(f"config error: {spec.config}", key, 1)) from None
    if spec.wire is not None:
        if spec.wire.types == NUM and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            validate({key: value}, {key: spec.wire}, "settings")
        except InfernoError as e:
            raise _bad(key, e.message) from None
        if key == "stop" and any(not s or len(s) > 256 for s in value):
            raise _bad(key, "stop strings must be 1-256 characters")
        return list(value) if isinstance(value, list) else value
    if key == "pin":
        if not isinstance(value, bool):
            raise _bad(key, f"{value!r} is not true or false")
        return value
    if key == "allowed_roles":
        if not isinstance(value, list) or any(r not in ROLES for r in value):
            raise _bad(key, f"{value!r} is not a list of roles ({', '.join(ROLES)})")
        return [r for r in ROLES if r in value]
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _bad(key, f"{key} must be text of at most {MAX_TEXT} characters")
    if key == "chat_template" and value and value not in TEMPLATE_NAMES:
        from infernod.backends import templates  # jinja2: only when a template is set

        problem = templates.compile_error(value)
        if problem:
            raise _bad(key, f"the template does not compile: {problem}")
    return value


def parse_text(key: str, text: str) -> Any:
    """``inferno models set NAME key=TEXT``: TEXT in the key's type (check() validates)."""
    spec = KEYS.get(key)
    if spec is None:
        raise _bad(key, f"unknown setting {key!r}")
    if spec.config is not None:
        if key == "n_gpu_layers" and text == "auto":
            return text
        try:
            return config_mod.parse_cli_value(spec.config, text)
        except config_mod.ConfigError as e:
            raise _bad(key, str(e).replace(f"config error: {spec.config}", key, 1)) from None
    try:
        if key == "pin" or (spec.wire is not None and spec.wire.types == BOOL):
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if key == "allowed_roles" or (spec.wire is not None and spec.wire.types == LIST):
            return [s.strip() for s in text.split(",") if s.strip()]
        if spec.wire is not None and spec.wire.types == INT:
            return int(text)
        if spec.wire is not None and spec.wire.types == NUM:
            return float(text)
    except ValueError:
        raise _bad(key, f"{text!r} is not a valid value for {key}") from None
    return text


def default_of(key: str, cfg: config_mod.Config) -> tuple[Any, str]:
    """(value, source) of ``key`` for a model that does not set it."""
    spec = KEYS[key]
    if spec.config is not None:
        return config_mod.get_key(cfg, spec.config), "config"
    value = spec.default
    return (list(value) if isinstance(value, list) else value), "default"


def describe() -> list[dict[str, Any]]:
    """Every setting with its doc, where its rules come from and when it applies."""
    return [{"key": k, "doc": s.doc, "config_key": s.config, "applies": "next load"
             if s.load else "at once"} for k, s in KEYS.items()]


class SettingsStore:
    """Every model's own settings, kept in ``path`` (TOML, one table per model). Read once
    at start; ``set``/``unset`` change the memory copy on the event loop, ``save`` (blocking:
    the executor) writes a snapshot; a newer snapshot always wins over an older one."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._models: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._written = 0
        self._lock = threading.Lock()
        if path is not None:
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            return
        except (OSError, tomllib.TOMLDecodeError) as e:
            log.error("model settings in %s not read (%s): every model uses the config's "
                      "values until it is fixed", path, e)
            return
        for name, table in data.items():
            if not isinstance(table, dict):
                continue
            kept: dict[str, Any] = {}
            for key, value in table.items():
                try:
                    kept[key] = check(key, value)
                except InfernoError as e:
                    log.error("%s: model %s: setting %s ignored: %s", path, name, key, e.message)
            if kept:
                self._models[name] = kept

    def get(self, name: str) -> dict[str, Any]:
        """``name``'s own settings (a copy)."""
        return dict(self._models.get(name, {}))

    def value(self, name: str, key: str, cfg: config_mod.Config) -> Any:
        own = self._models.get(name, {})
        return own[key] if key in own else default_of(key, cfg)[0]

    def effective(self, name: str, cfg: config_mod.Config) -> dict[str, dict[str, Any]]:
        """Every key: {value, source} (source "model" or its default's)."""
        own = self._models.get(name, {})
        out: dict[str, dict[str, Any]] = {}
        for key in KEYS:
            value, source = (own[key], "model") if key in own else default_of(key, cfg)
            out[key] = {"value": value, "source": source}
        return out

    def keep_alive_for(self, name: str, requested: float | None,
                       cfg: config_mod.Config) -> tuple[float, str]:
        """(keep_alive_s, source) for ``name``: pinned models stay pinned; else a request's
        value, the model's own, the config's."""
        own = self._models.get(name, {})
        if own.get("pin"):
            return -1.0, "model"
        if requested is not None:
            return float(requested), "request"
        if "keep_alive_s" in own:
            return float(own["keep_alive_s"]), "model"
        return cfg.models.keep_alive_s, "config"

    def check_role(self, name: str, role: str, cfg: config_mod.Config) -> None:
        """Refuse a request on ``name`` from a role its ``allowed_roles`` leaves out
        (operators always pass)."""
        allowed = self.value(name, "allowed_roles", cfg)
        if allowed and role != "operator" and role not in allowed:
            raise InfernoError("forbidden", f"model {name} serves only {', '.join(allowed)} "
                               f"requests, and this one comes from a {role}",
                               "ask an operator (the model's allowed_roles setting)")

    def render_chat(self, info: ModelInfo, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """A chat rendered with the model's settings: its ``system_prompt`` first unless the
        chat has a system message, its ``chat_template`` instead of the model's own."""
        from infernod.backends import templates

        own = self._models.get(info.name, {})
        system = own.get("system_prompt")
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        return templates.render_chat(info, messages, override=own.get("chat_template") or "")

    def request_defaults(self, name: str) -> dict[str, Any]:
        """The model's own defaults for what a generate body may carry."""
        own = self._models.get(name, {})
        return {k: own[k] for k in REQUEST_KEYS if k in own}

    def update(self, name: str, set_: Mapping[str, Any] | None = None,
               unset: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        """Apply validated values (``set_``) and removals; returns the model's settings."""
        own = dict(self._models.get(name, {}))
        own.update(dict(set_ or {}))
        for key in unset:
            if key not in KEYS:
                raise _bad(key, f"unknown setting {key!r}")
            own.pop(key, None)
        if own:
            self._models[name] = own
        else:
            self._models.pop(name, None)
        self._version += 1
        return dict(own)

    def forget(self, name: str) -> bool:
        """Drop a removed model's settings; True if it had any."""
        if self._models.pop(name, None) is None:
            return False
        self._version += 1
        return True

    def snapshot(self) -> tuple[int, dict[str, dict[str, Any]]]:
        return self._version, {n: dict(s) for n, s in self._models.items()}

    def save(self, snapshot: tuple[int, dict[str, dict[str, Any]]]) -> None:
        """Write ``snapshot`` atomically (0600) unless a newer one was written already."""
        import tomli_w

        version, data = snapshot
        if self.path is None:
            return
        with self._lock:
            if version <= self._written:
                return
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"# per-model settings; written by infernod ('inferno models set')\n")
                tomli_w.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self._written = version

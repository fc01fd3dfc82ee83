"""Where a client connects, and with which CURVE keys: flags, then env, then client.toml.

``$INFERNO_CLIENT_CONFIG`` or ``$XDG_CONFIG_HOME/inferno/client.toml`` (``~/.config/...``)::

    endpoint = "tcp://gpu-box.example:7700"
    server_key = "~/inferno-keys/server.key"        # relative paths: next to this file
    client_key = "~/inferno-keys/alice.key_secret"

Precedence: ``--endpoint`` / ``--server-key`` / ``--client-key``, then ``$INFERNO_ENDPOINT``
(endpoint only), then the file, then the local daemon's ipc socket. Keys from the file are
only used for tcp:// endpoints (ipc needs none).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from infernod.client import CurveKeys
from infernod.protocol.errors import InfernoError

KEYS = ("endpoint", "server_key", "client_key")


def client_config_path() -> Path:
    env = os.environ.get("INFERNO_CLIENT_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "inferno" / "client.toml"


def load(path: Path | None = None) -> dict[str, str]:
    path = path or client_config_path()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InfernoError("config_error", f"{path}: {e}") from e
    for key, value in data.items():
        if key not in KEYS:
            raise InfernoError("config_error", f"{path}: unknown key {key!r}",
                               f"known keys: {', '.join(KEYS)}")
        if not isinstance(value, str):
            raise InfernoError("config_error", f"{path}: {key} must be a string")
    base = path.parent
    out = dict(data)
    for key in ("server_key", "client_key"):
        if key in out:
            out[key] = str(base / Path(out[key]).expanduser())
    return out


def resolve(endpoint: str | None = None, server_key: str | None = None,
            client_key: str | None = None) -> tuple[str | None, CurveKeys | None]:
    """(endpoint or None for the default, CURVE keys or None)."""
    if bool(server_key) != bool(client_key):
        raise InfernoError("bad_request", "--server-key and --client-key go together")
    if server_key and client_key:
        return endpoint, _curve(server_key, client_key)
    if endpoint is None and os.environ.get("INFERNO_ENDPOINT"):
        return None, None  # paths.default_endpoints() reads it
    file = load()
    endpoint = endpoint or file.get("endpoint")
    if endpoint and endpoint.startswith("tcp://"):
        if not (file.get("server_key") and file.get("client_key")):
            raise InfernoError("bad_request", f"{endpoint} needs CURVE keys",
                               "pass --server-key and --client-key, or set server_key and "
                               f"client_key in {client_config_path()}")
        return endpoint, _curve(file["server_key"], file["client_key"])
    return endpoint, None


def _curve(server_key: str, client_key: str) -> CurveKeys:
    try:
        return CurveKeys.from_files(server_key, client_key)
    except (OSError, ValueError) as e:
        raise InfernoError("bad_request", f"cannot read CURVE key: {e}",
                           "--server-key is server.key, --client-key is NAME.key_secret "
                           "(both from 'inferno keys add')") from e

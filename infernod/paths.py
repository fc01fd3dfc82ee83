"""Where the daemon's sockets and state live, for the daemon and its clients alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def runtime_dir(configured: str = "") -> Path:
    """$RUNTIME_DIRECTORY (systemd) or $XDG_RUNTIME_DIR/inferno, else /tmp/inferno-$UID."""
    if configured:
        return Path(configured)
    systemd = os.environ.get("RUNTIME_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "inferno"
    return Path(f"/tmp/inferno-{os.getuid()}")


def state_dir(configured: str = "") -> Path:
    """$STATE_DIRECTORY (systemd) or $XDG_STATE_HOME/inferno (~/.local/state/inferno)."""
    if configured:
        return Path(configured)
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "inferno"


@dataclass(frozen=True)
class Endpoints:
    control: str
    events: str

    @classmethod
    def in_dir(cls, directory: Path) -> Endpoints:
        return cls(f"ipc://{directory}/control.sock", f"ipc://{directory}/events.sock")

    @classmethod
    def from_control(cls, control: str) -> Endpoints:
        """Clients name one endpoint; the events endpoint sits beside it.

        ipc://DIR/control.sock -> ipc://DIR/events.sock; tcp://host:P -> tcp://host:P+1.
        """
        if control.startswith("ipc://"):
            path = Path(control[len("ipc://"):])
            if path.suffix != ".sock":  # a directory was given
                return cls.in_dir(path)
            return cls(control, f"ipc://{path.with_name('events.sock')}")
        if control.startswith("tcp://"):
            host, _, port = control[len("tcp://"):].rpartition(":")
            return cls(control, f"tcp://{host}:{int(port) + 1}")
        raise ValueError(f"endpoint must start with ipc:// or tcp://, got {control!r}")


def default_endpoints() -> Endpoints:
    env = os.environ.get("INFERNO_ENDPOINT")
    if env:
        return Endpoints.from_control(env)
    return Endpoints.in_dir(runtime_dir())

"""Where the daemon's sockets and state live, for the daemon and its clients alike."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

# The user the packaged systemd unit runs infernod as (systemd/infernod.service, User=).
DEFAULT_DAEMON_USER = "inferno"
JOBS_DB = "jobs.sqlite3"  # in the state directory (docs/operations.md names it)
MODEL_SETTINGS = "model-settings.toml"  # in the state directory: 'inferno models set'


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


def trusted_socket_owners() -> set[int]:
    """uids a client believes when they own the daemon's socket: itself, root and the daemon's
    user (``$INFERNO_DAEMON_USER``: names or uids, comma-separated; default ``inferno``)."""
    uids = {os.getuid(), 0}
    for name in os.environ.get("INFERNO_DAEMON_USER", DEFAULT_DAEMON_USER).split(","):
        name = name.strip()
        if name.isdigit():
            uids.add(int(name))
        elif name:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass
    return uids


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def untrusted_socket(path: Path) -> str | None:
    """Why a client must not send anything to the ipc socket at ``path``, or None.

    Without ``$XDG_RUNTIME_DIR`` the socket sits under /tmp, where any local user can create
    ``/tmp/inferno-$UID/control.sock`` first and read every prompt sent to it. The socket and
    the directory holding it must belong to a trusted uid (:func:`trusted_socket_owners`),
    and the directory must not let others replace the socket (writable by group or others
    without the sticky bit).
    """
    trusted = trusted_socket_owners()
    real = Path(os.path.realpath(path))
    try:
        sock, parent = os.stat(real), os.stat(real.parent)
    except OSError:
        return None  # nothing there: the caller reports a missing daemon
    if sock.st_uid not in trusted:
        return f"{real} belongs to {_owner(sock.st_uid)}, not to you, root or the daemon's user"
    if parent.st_uid not in trusted:
        return (f"{real.parent} belongs to {_owner(parent.st_uid)}, not to you, root or the "
                "daemon's user")
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        return (f"{real.parent} (mode {stat.S_IMODE(parent.st_mode):o}) lets users other than "
                "its owner replace the socket")
    return None


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: it holds other people's prompts."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_sqlite(path: Path) -> Path:
    """Make a SQLite database file 0600 before it is opened, with its ``-wal``/``-shm``/
    ``-journal`` files where they exist already (SQLite creates them later with the main
    file's mode). Files made by an older version with a looser umask are tightened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass
    return path

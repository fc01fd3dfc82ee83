"""API keys for HTTP users (``inferno-gateway``): bearer secrets the daemon checks itself.

``inferno keys add NAME --role ROLE --http`` makes a fresh key (``sk-inferno-`` and 43
characters of ``secrets.token_urlsafe(32)``: 256 random bits), prints it once and stores
only its SHA-256 in ``<state_dir>/keys/api-keys.json`` (0600, written whole and renamed
into place). A plain SHA-256 is enough because the key is 256 random bits, not a password:
there is no dictionary to try and nothing to slow down, and a per-request check stays a few
microseconds. The file therefore holds nothing that lets anyone call the daemon.

The gateway forwards the caller's key in the ``api_key`` header field of every request; the
daemon (not the gateway) looks it up here, so a gateway on another host needs no copy of the
file and ``keys revoke`` applies to the next request. Each key is the principal
``key:NAME`` with the key's role; CURVE client keys are ``key:NAME`` too, so one name is
either an HTTP key or a CURVE key, never both (``add`` refuses, and the daemon refuses an
HTTP key whose name is also a CURVE key's).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infernod.keys import CLIENT_ROLES, KeyStoreError, check_name

API_KEYS_FILE = "api-keys.json"
PREFIX = "sk-inferno-"
MAX_KEY_CHARS = 128  # the header field's bound (protocol.messages.HEADER)


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    sha256: str  # hex digest of the whole key; the key itself is never stored
    created: float  # unix time
    hint: str  # the key's first characters, to tell keys apart in 'keys list'


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def path_in(kdir: Path) -> Path:
    return kdir / API_KEYS_FILE


def read_file(path: Path) -> list[ApiKey]:
    """The stored keys ([] when the file does not exist); KeyStoreError if malformed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KeyStoreError(f"cannot read {path}: {e.strerror}") from e
    try:
        data = json.loads(raw)
        entries = [ApiKey(str(k["name"]), str(k["role"]), str(k["sha256"]),
                          float(k.get("created", 0)), str(k.get("hint", "")))
                   for k in data["keys"]]
    except (ValueError, KeyError, TypeError) as e:
        raise KeyStoreError(f"{path} is not a valid API key file ({e})",
                            "restore it from a backup, or remove it and add the keys again") from e
    return entries


def _write_file(path: Path, entries: list[ApiKey]) -> None:
    """Atomically replace the file; 0600 whatever the umask."""
    body = json.dumps({"version": 1, "keys": [asdict(k) for k in entries]}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _Locked:
    """An exclusive lock for a read-modify-write of the key file (two CLIs at once)."""

    def __init__(self, kdir: Path) -> None:
        kdir.mkdir(parents=True, exist_ok=True)
        os.chmod(kdir, 0o700)
        self.fd = os.open(kdir / ".api-keys.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> _Locked:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def add(kdir: Path, name: str, role: str, *, force: bool = False) -> tuple[str, ApiKey]:
    """Make a key for ``name``; returns (the key, to show once; its stored entry)."""
    check_name(name)
    if role not in CLIENT_ROLES:
        raise KeyStoreError(f"bad role {role!r}", f"one of {', '.join(CLIENT_ROLES)}")
    if (kdir / "clients" / f"{name}.key").exists():
        raise KeyStoreError(f"{name} already names a CURVE client key (principal key:{name})",
                            "pick another name: one name is an HTTP key or a CURVE key")
    with _Locked(kdir):
        entries = read_file(path_in(kdir))
        if any(k.name == name for k in entries) and not force:
            raise KeyStoreError(f"an API key named {name} already exists",
                                "revoke it first, pick another name, or pass --force")
        key = new_key()
        entry = ApiKey(name, role, digest(key), round(time.time(), 3),
                       key[:len(PREFIX) + 4] + "...")
        _write_file(path_in(kdir), [k for k in entries if k.name != name] + [entry])
    return key, entry


def list_keys(kdir: Path) -> list[ApiKey]:
    return read_file(path_in(kdir))


def revoke(kdir: Path, name: str) -> ApiKey | None:
    """Remove ``name``'s API key; None if there is none."""
    check_name(name)
    path = path_in(kdir)
    if not path.exists():
        return None
    with _Locked(kdir):
        entries = read_file(path)
        gone = next((k for k in entries if k.name == name), None)
        if gone is not None:
            _write_file(path, [k for k in entries if k.name != name])
    return gone


class ApiKeyStore:
    """The daemon's view of the key file: looked up by digest, re-read when it changes.

    Every lookup stats the file (one syscall): ``add`` and ``revoke`` replace it by rename,
    so a new inode (or size, mtime) means a re-read, and a revoked key fails on the very
    next request. A file that cannot be read or parsed keeps no key valid (fail closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._by_digest: dict[str, ApiKey] = {}
        self.error: str = ""
        self.loose_mode = False  # readable by others: logged by the daemon, still used

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            stamp, st = (0, 0, 0, 0), None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self.loose_mode = st is not None and bool(st.st_mode & 0o077)
        try:
            entries = read_file(self.path)
            self.error = ""
        except KeyStoreError as e:
            entries, self.error = [], str(e)
        self._by_digest = {k.sha256: k for k in entries if k.role in CLIENT_ROLES}

    def verify(self, key: str) -> ApiKey | None:
        """The entry of a presented key, or None. The lookup is by the SHA-256 of the key:
        how long it takes tells nothing about the stored keys (finding a key from its digest
        is a preimage search), and the final compare is constant-time anyway."""
        self._refresh()
        d = digest(key)
        entry = self._by_digest.get(d)
        if entry is None or not hmac.compare_digest(entry.sha256, d):
            return None
        return entry

    def count(self) -> int:
        self._refresh()
        return len(self._by_digest)

    def names(self) -> list[str]:
        self._refresh()
        return sorted(k.name for k in self._by_digest.values())


def to_row(k: ApiKey) -> dict[str, Any]:
    return {"name": k.name, "role": k.role, "kind": "http", "hint": k.hint,
            "created": k.created}

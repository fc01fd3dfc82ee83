"""Models streamed from a client: ``models.upload.begin`` / ``.chunk`` / ``.finish`` / ``.abort``.

``inferno import FILE`` reads the file with the caller's own rights and sends it over the
control socket, so what a user can import is what that user can read, not what the daemon
can read (``models.import`` by path is limited to ``models.import_dirs`` for that reason).

One upload is one hidden file ``.upload-<id>.partial`` in the writable model directory (the
scan skips hidden entries), preallocated at ``begin`` so a full disk refuses the upload
instead of failing it half-way. Chunks arrive in order (``offset`` must be the number of
bytes received so far), each at most ``chunk_bytes`` (below ``daemon.max_message_bytes``),
and are written straight to the file while a running sha256 is updated: memory stays one
chunk per upload whatever the file's size. ``finish`` compares the client's sha256, then
validates the whole header as ``models.import`` does and renames the file into place;
any refusal deletes the partial file.

Bounds: ``MAX_PER_PRINCIPAL`` uploads per principal and ``MAX_UPLOADS`` in all; an upload
idle for ``IDLE_S`` is deleted; a client that lost its connection resumes by sending
``begin`` again for the same name and size (the reply's ``offset`` says where to go on).
Partial files left by a previous daemon process are deleted at start.

File I/O runs in the default executor; the loop side only keeps the table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infernod.daemon.importing import validate_model_file
from infernod.daemon.registry import Registry, _name_from_path, check_name
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.daemon.server import Call

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
IDLE_S = 600.0
MAX_PER_PRINCIPAL = 2
MAX_UPLOADS = 8
SPACE_MARGIN = 64 * 1024 * 1024  # left free on the model directory's filesystem
_PARTIAL_RE = re.compile(r"^\.upload-[0-9a-f]{32}\.partial$")
_MAGIC = {"gguf": (b"GGUF", "a GGUF file starts with 'GGUF'"),
          "onnx": (b"\x08", "an ONNX model starts with its ir_version field")}  # fmt: skip


@dataclass
class Upload:
    upload_id: str
    principal: str
    name: str
    kind: str
    size: int
    label: str
    path: Path
    fd: int
    touched: float
    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_progress: float = 0.0


def _unknown(upload_id: str) -> InfernoError:
    return InfernoError("unknown_upload", f"no upload {upload_id} in progress for you")


class Uploads:
    """The uploads in progress, owned by the event loop."""

    def __init__(self, registry: Registry, max_message_bytes: int,
                 publish: Callable[[str, str, dict[str, Any]], object],
                 on_imported: Callable[[str], None]) -> None:
        self.registry = registry
        self.publish = publish
        self.on_imported = on_imported
        self.chunk_bytes = max(1024, min(CHUNK_BYTES, max_message_bytes - 4096))
        self.active: dict[str, Upload] = {}

    # -- lifecycle

    def remove_stale(self) -> int:
        """Deletes partial uploads a previous daemon process left (blocking: executor)."""
        removed = 0
        for d in self.registry.model_dirs:
            try:
                entries = list(d.iterdir()) if d.is_dir() else []
            except OSError:
                continue
            for p in entries:
                if _PARTIAL_RE.match(p.name) and not p.is_symlink() and p.is_file():
                    p.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("uploads: removed %d partial uploads from an earlier run", removed)
        return removed

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            for up in [u for u in self.active.values() if now - u.touched > IDLE_S]:
                if not up.lock.locked():
                    log.info("uploads: %s (%s) idle for %.0fs, deleted", up.upload_id,
                             up.name, now - up.touched)
                    await self._drop(up)

    async def close(self) -> None:
        for up in list(self.active.values()):
            await self._drop(up)

    async def _drop(self, up: Upload) -> None:
        if self.active.pop(up.upload_id, None) is None:
            return
        self.registry.release(up.name)
        await asyncio.get_running_loop().run_in_executor(None, _discard, up)

    def _get(self, req: Call) -> Upload:
        up = self.active.get(req.body["upload_id"])
        if up is None or up.principal != req.principal:
            raise _unknown(req.body["upload_id"])
        return up

    # -- handlers

    async def begin(self, req: Call) -> dict[str, Any]:
        b = req.body
        label = str(b["filename"])
        if "/" in label or label in (".", ".."):
            raise InfernoError("bad_request", f"filename {label!r} must be a bare file name",
                               "send the file's name without its directory")
        kind = Path(label).suffix.lower().lstrip(".")
        if kind not in _MAGIC:
            raise InfernoError("bad_request", f"{label}: only .gguf and .onnx files can be "
                               "uploaded", "an ONNX model with external data or a tokenizer "
                               "is a directory: copy it into a model directory on the host")
        name = check_name(b.get("name") or _name_from_path(Path(label), is_dir=False))
        size = int(b["size"])
        for up in self.active.values():  # the same upload again: go on where it stopped
            if (up.principal, up.name, up.size, up.kind) == (req.principal, name, size, kind) \
                    and b.get("resume", True) and not up.lock.locked():
                up.touched = time.monotonic()
                return self._state(up)
        mine = sum(1 for u in self.active.values() if u.principal == req.principal)
        if mine >= MAX_PER_PRINCIPAL or len(self.active) >= MAX_UPLOADS:
            raise InfernoError(
                "conflict", f"too many uploads in progress ({mine} of yours, "
                f"{len(self.active)} in all; limits {MAX_PER_PRINCIPAL} and {MAX_UPLOADS})",
                "finish or abort the others first (they expire after "
                f"{IDLE_S:.0f}s without a chunk)")
        self.registry._reserve(name)
        upload_id = secrets.token_hex(16)
        try:
            path, fd = await asyncio.get_running_loop().run_in_executor(
                None, self._create, upload_id, size)
        except BaseException:
            self.registry.release(name)
            raise
        up = Upload(upload_id=upload_id, principal=req.principal, name=name, kind=kind,
                    size=size, label=label, path=path, fd=fd, touched=time.monotonic())
        self.active[upload_id] = up
        log.info("uploads: %s started by %s: %s (%d bytes) as %s", upload_id,
                 req.principal or "?", label, size, name)
        return self._state(up)

    def _create(self, upload_id: str, size: int) -> tuple[Path, int]:
        d = self.registry.writable_dir()
        free = shutil.disk_usage(d).free
        if size + SPACE_MARGIN > free:
            raise InfernoError("insufficient_storage", f"{size} bytes do not fit: {free} bytes "
                               f"free in {d}, {SPACE_MARGIN} kept free")
        path = d / f".upload-{upload_id}.partial"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise InfernoError("insufficient_storage",
                               f"cannot reserve {size} bytes in {d}: {e.strerror}") from None
        return path, fd

    def _state(self, up: Upload) -> dict[str, Any]:
        return {"upload_id": up.upload_id, "model": up.name, "offset": up.received,
                "size": up.size, "chunk_bytes": self.chunk_bytes, "idle_timeout_s": IDLE_S}

    async def chunk(self, req: Call) -> dict[str, Any]:
        up = self._get(req)
        data: bytes = req.body["data"]
        offset = int(req.body["offset"])
        async with up.lock:
            if up.upload_id not in self.active:
                raise _unknown(up.upload_id)
            if offset != up.received:
                raise InfernoError("conflict", f"chunk at offset {offset}, but {up.received} "
                                   "bytes were received", "send from offset "
                                   f"{up.received}", offset=up.received)  # fmt: skip
            if len(data) > self.chunk_bytes or not data:
                raise InfernoError("bad_request", f"a chunk holds 1 to {self.chunk_bytes} "
                                   f"bytes, got {len(data)}")  # fmt: skip
            if up.received + len(data) > up.size:
                raise InfernoError("bad_request", f"{up.received + len(data)} bytes is more "
                                   f"than the {up.size} announced at begin")  # fmt: skip
            if offset == 0:
                magic, why = _MAGIC[up.kind]
                if not data.startswith(magic):
                    await self._drop(up)
                    raise InfernoError("invalid_model", f"{up.label} is not a "
                                       f"{up.kind.upper()} model ({why}); upload deleted")
            await asyncio.get_running_loop().run_in_executor(None, _write, up, offset, data)
            up.received += len(data)
            up.touched = now = time.monotonic()
            if now - up.last_progress > 0.5 or up.received == up.size:
                up.last_progress = now
                self.publish("models", "progress", {
                    "event": "progress", "model": up.name, "done_bytes": up.received,
                    "total_bytes": up.size, "message": f"receiving {up.name}"})
            return {"upload_id": up.upload_id, "offset": up.received}

    async def finish(self, req: Call) -> dict[str, Any]:
        up = self._get(req)
        async with up.lock:
            if up.upload_id not in self.active:
                raise _unknown(up.upload_id)
            if up.received != up.size:
                raise InfernoError("conflict", f"{up.received} of {up.size} bytes received",
                                   f"send the rest from offset {up.received}",
                                   offset=up.received)  # fmt: skip
            want = str(req.body["sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", want):
                raise InfernoError("bad_request", "sha256 must be 64 hex digits")
            got = up.digest.hexdigest()
            loop = asyncio.get_running_loop()
            try:
                if got != want:
                    raise InfernoError("checksum_mismatch", f"{up.label}: sha256 of what "
                                       f"arrived is {got}, the client says {want}; upload "
                                       "deleted")  # fmt: skip
                info = await loop.run_in_executor(None, self._install, up)
            except BaseException:
                await self._drop(up)
                raise
            self.active.pop(up.upload_id, None)
            self.registry.release(up.name)
        self.on_imported(info.name)
        log.info("uploads: %s finished: %s (%d bytes, sha256 %s)", up.upload_id, info.path,
                 up.size, got)
        return {"model": info.name, "path": str(info.path), "size": up.size, "sha256": got}

    def _install(self, up: Upload) -> Any:
        os.fsync(up.fd)
        os.close(up.fd)
        up.fd = -1
        validate_model_file(up.path, up.kind, up.label)
        return self.registry.add_file(up.name, up.path, up.kind)

    async def abort(self, req: Call) -> dict[str, Any]:
        up = self._get(req)
        async with up.lock:
            await self._drop(up)
        return {"upload_id": up.upload_id, "state": "aborted"}


def _write(up: Upload, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(up.fd, view, offset)
        offset += n
        view = view[n:]
    up.digest.update(data)


def _discard(up: Upload) -> None:
    if up.fd >= 0:
        os.close(up.fd)
        up.fd = -1
    up.path.unlink(missing_ok=True)


async def maintain(uploads: Uploads) -> None:
    """The daemon's task for uploads: partial files of an earlier run go, idle ones expire."""
    await asyncio.get_running_loop().run_in_executor(None, uploads.remove_stale)
    await uploads.expire_loop()

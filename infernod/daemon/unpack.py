"""An ONNX model directory pulled as an archive (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``).

The archive comes from the network, so nothing of it is trusted: only regular files and
directories are taken (a symlink, hard link, device or FIFO refuses the archive:
``unsafe_path``), no name may be absolute or contain ``..``, and the number of entries and
the unpacked size are bounded (the size by the free space, so a zip bomb fails with
``insufficient_storage`` before it fills the disk). Files are written one by one into a
hidden temporary directory beside the model directory's entries, and the result is checked
as ``models.import`` checks a directory model (``inspect_onnx``: external data inside the
directory, a readable graph) before the pull renames it into place. ``model.onnx`` may sit at
the top of the archive or in its single top-level directory.

Blocking: the pull's worker thread runs it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from infernod.protocol.errors import CODES, InfernoError

MAX_ENTRIES = 10_000
SPACE_MARGIN = 64 * 1024 * 1024
ARCHIVES = {".tar": "tar", ".tar.gz": "tar", ".tgz": "tar", ".zip": "zip"}
MAGIC = {"zip": b"PK\x03\x04"}


def archive_of(name: str) -> str | None:
    """``tar`` or ``zip`` when ``name`` ends like an archive, else None."""
    low = name.lower()
    for suffix, kind in ARCHIVES.items():
        if low.endswith(suffix):
            return kind
    return None


def stem(name: str) -> str:
    low = name.lower()
    for suffix in ARCHIVES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _refuse(label: str, why: str) -> InfernoError:
    return InfernoError("unsafe_path", f"{label}: {why}; nothing was kept",
                        "an archive of a model directory holds only plain files and "
                        "directories, with relative names")


def _entries(archive: Path, kind: str,
             label: str) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    """(name, is_dir, reader) for each entry, refusing anything but files and dirs."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise _refuse(label, f"{info.filename!r} is not a plain file")
                if info.is_dir():
                    yield info.filename, True, None
                else:
                    with zf.open(info) as f:
                        yield info.filename, False, f
        return
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if member.isdir():
                yield member.name, True, None
            elif member.isreg():
                yield member.name, False, tf.extractfile(member)
            else:
                raise _refuse(label, f"{member.name!r} is a link or special file")


def unpack(archive: Path, kind: str, parent: Path, name: str, label: str) -> tuple[Path, Path]:
    """Unpacks into a hidden temp dir in ``parent``; returns (temp dir, the model's root in
    it). The caller renames the root into place and removes the temp dir."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".unpack"))
    try:
        budget = shutil.disk_usage(parent).free - SPACE_MARGIN
        count = used = 0
        try:
            for entry, is_dir, reader in _entries(archive, kind, label):
                count += 1
                if count > MAX_ENTRIES:
                    raise _refuse(label, f"more than {MAX_ENTRIES} entries")
                path = PurePosixPath(entry)
                if path.is_absolute() or ".." in path.parts or not path.parts:
                    raise _refuse(label, f"{entry!r} leaves the model directory")
                dest = tmp.joinpath(*path.parts)
                if is_dir:
                    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                assert reader is not None
                used = _copy(reader, dest, used, budget, label)
        except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError,
                zlib.error) as e:
            raise InfernoError("invalid_model", f"{label} is not a readable {kind} archive "
                               f"({e}); nothing was kept", CODES["invalid_model"]) from None
        root = tmp
        if not (tmp / "model.onnx").is_file():
            tops = list(tmp.iterdir())
            if len(tops) == 1 and (tops[0] / "model.onnx").is_file():
                root = tops[0]
            else:
                raise InfernoError("invalid_model", f"{label} has no model.onnx at its top "
                                   "or in its single top-level directory; nothing was kept",
                                   "an ONNX model directory holds model.onnx (and "
                                   "tokenizer.json for embeddings)")
        from infernod.backends.onnx_inspect import inspect_onnx

        try:
            inspect_onnx(root)
        except InfernoError as e:
            code = "unsafe_path" if e.code == "unsafe_path" else "invalid_model"
            raise InfernoError(code, f"{label}: {e.message}; nothing was kept",
                               e.hint if code == "unsafe_path" else CODES["invalid_model"]
                               ) from e
        return tmp, root
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy(reader: IO[bytes], dest: Path, used: int, budget: int, label: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(dest, flags, 0o600), "wb") as out:
        while block := reader.read(1024 * 1024):
            used += len(block)
            if used > budget:
                raise InfernoError("insufficient_storage", f"{label} unpacks to more than the "
                                   f"{max(budget, 0)} bytes free; nothing was kept")
            out.write(block)
    return used

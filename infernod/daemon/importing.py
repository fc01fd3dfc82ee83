"""Reading a model from a path the daemon did not choose, and writing it into place.

``models.import`` by path reads with the daemon's rights, so the path must lie below one of
``models.import_dirs``: it is walked one ``O_NOFOLLOW`` open at a time (no symlink, hard link
or special file anywhere on the way), each descriptor checked to be the inode that was
stat'ed, the whole header validated on that descriptor, and the copy made from it, never by
path again; the copy is validated once more before it is renamed into place. Uploads
(``infernod.daemon.uploads``) use the same final check, ``validate_model_file``.

Blocking file I/O only: the registry calls it from the daemon's default executor.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from infernod.backends.gguf_meta import check_gguf_header
from infernod.backends.onnx_header import parse_header
from infernod.daemon.memory import MiB
from infernod.protocol.errors import CODES, InfernoError

Progress = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, message)``, called from the worker thread."""

COPY_CHUNK = 8 * MiB


def open_import_source(src: str, import_dirs: list[tuple[Path, Path]]) -> tuple[int, Path]:
    """An ``O_NOFOLLOW`` descriptor for ``src`` inside an import dir, and its real path.
    ``import_dirs``: (the directory as configured, its real path) pairs."""
    path = PurePosixPath(src)
    if not path.is_absolute():
        raise InfernoError("bad_request", f"{src!r} is not an absolute path",
                           "give the absolute path of the file on the daemon's host")
    if ".." in path.parts:
        raise InfernoError("unsafe_path", f"{src!r} contains '..'",
                           "give the path without '..' components")  # fmt: skip
    if not import_dirs:
        raise InfernoError(
            "path_not_allowed",
            f"importing a path on the daemon's host is off (models.import_dirs is empty): "
            f"{src}",
            "send the file from your machine: 'inferno import FILE' streams it; or ask the "
            "host's administrator to list its directory in models.import_dirs")
    for given, real in import_dirs:
        for root in (given, real):
            if path.is_relative_to(root):  # the root itself too
                return open_beneath(real, path.relative_to(root).parts, src)
    raise InfernoError(
        "path_not_allowed",
        f"{src} is not inside an import directory "
        f"({', '.join(str(g) for g, _ in import_dirs)})",
        "move the file into one of models.import_dirs, or send it from your machine: "
        "'inferno import FILE'")




class AtomicFile:
    """Writes to a hidden temp file beside ``dest``, renamed over it only on success."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest

    def __enter__(self) -> Any:
        fd, tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.",
                                   suffix=".partial")  # fmt: skip
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ok = False
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.dest)
                ok = True
        finally:
            if not ok:
                self.tmp.unlink(missing_ok=True)


def copy_stream(
    src: Path, out: Any, done: int, total: int, message: str,
    progress: Progress | None, digest: Any,
) -> int:  # fmt: skip
    with src.open("rb") as f:
        while block := f.read(COPY_CHUNK):
            out.write(block)
            if digest is not None:
                digest.update(block)
            done += len(block)
            if progress:
                progress(done, total, message)
    return done


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_ENTRY = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: FIFOs
_MAX_TREE_FILES = 10_000
_MAX_TREE_DEPTH = 16
_INVALID_HINT = CODES["invalid_model"]


def _unsafe(what: str, why: str, hint: str = CODES["unsafe_path"]) -> InfernoError:
    return InfernoError("unsafe_path", f"{what} {why}; nothing was imported", hint)


def _lstat_at(dfd: int, name: str, shown: str) -> os.stat_result:
    """The entry ``name`` of directory ``dfd``, refused unless a directory or regular file
    with a single link (a hard link is another name for a file someone else may own)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        raise InfernoError("bad_request", f"{shown} does not exist") from None
    except NotADirectoryError:
        raise InfernoError("bad_request", f"{shown}: a component on the way is not a "
                           "directory") from None
    except OSError as e:
        raise InfernoError("bad_request", f"cannot read {shown}: {e.strerror}",
                           "the daemon's user must be able to read it") from None
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(shown, "is a symlink",
                      "import the file it points to by its own path, or send it from your "
                      "machine: 'inferno import FILE'")
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink != 1:
            raise _unsafe(shown, f"has {st.st_nlink} hard links",
                          "import a copy of the file with a single link")
    elif not stat.S_ISDIR(st.st_mode):
        raise _unsafe(shown, "is neither a regular file nor a directory")
    return st


def _open_at(dfd: int, name: str, shown: str) -> int:
    """Opens an entry checked by ``_lstat_at`` without following links, and makes sure the
    descriptor is the very inode that was checked (nothing swapped it in between)."""
    st = _lstat_at(dfd, name, shown)
    try:
        fd = os.open(name, _O_DIR if stat.S_ISDIR(st.st_mode) else _O_ENTRY, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(shown, "was replaced while it was opened") from None
        raise InfernoError("bad_request", f"cannot open {shown}: {e.strerror}",
                           "the daemon's user must be able to read it") from None
    got = os.fstat(fd)
    if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or (
            stat.S_ISREG(got.st_mode) and got.st_nlink != 1):
        os.close(fd)
        raise _unsafe(shown, "was replaced while it was opened")
    return fd


def open_beneath(root: Path, parts: tuple[str, ...], shown: str) -> tuple[int, Path]:
    """Walks ``parts`` below the import dir ``root`` one ``O_NOFOLLOW`` open at a time."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise InfernoError("config_error", f"import directory {root}: {e.strerror}",
                           "fix models.import_dirs in infernod.toml") from None
    try:
        for part in parts:
            nfd = _open_at(fd, part, shown)
            os.close(fd)
            fd = nfd
        return fd, root.joinpath(*parts)
    except BaseException:
        os.close(fd)
        raise


def _check_gguf(buf: Any) -> None:
    check_gguf_header(buf)


def _check_onnx(buf: Any) -> dict[str, Any]:
    view = memoryview(buf)
    try:
        return parse_header(view)
    finally:
        view.release()


# the whole-header check per model kind: ONNX's answer lists the graph's external data files
_HEADER_CHECKS: dict[str, Callable[[Any], dict[str, Any] | None]] = {
    "gguf": _check_gguf, "onnx": _check_onnx}


def _check_buffer(buf: Any, kind: str, label: str) -> dict[str, Any] | None:
    """Parses the whole header (GGUF or ONNX); ``invalid_model`` if it does not hold up."""
    try:
        return _HEADER_CHECKS[kind](buf)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise InfernoError("invalid_model", f"{label} is not a valid {kind.upper()} model "
                           f"({e}); nothing was imported", _INVALID_HINT) from e


def check_fd(fd: int, kind: str, label: str) -> dict[str, Any] | None:
    """``_check_buffer`` over the open file, before a single byte is copied."""
    if os.fstat(fd).st_size == 0:
        raise InfernoError("invalid_model", f"{label} is empty; nothing was imported",
                           _INVALID_HINT)
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
        return _check_buffer(mm, kind, label)


def validate_model_file(path: Path, kind: str, label: str) -> None:
    """The check a copy passes before it is renamed into a model directory.

    A single ``.onnx`` file may not carry external data: its locations would be resolved
    in the shared model directory, so a directory model is the only way to bring them.
    """
    fd = os.open(path, _O_ENTRY)
    try:
        header = check_fd(fd, kind, label)
    finally:
        os.close(fd)
    if kind == "onnx" and header and header["external"]:
        raise InfernoError(
            "invalid_model", f"{label} keeps weights in external files "
            f"({', '.join(sorted(header['external']))}); nothing was imported",
            "import the model's directory (model.onnx beside its data files) instead")


def check_dir_model(dfd: int, canonical: Path) -> None:
    try:
        gfd = _open_at(dfd, "model.onnx", str(canonical / "model.onnx"))
    except InfernoError as e:
        if e.code != "bad_request":
            raise
        raise InfernoError("invalid_model", f"{canonical} is a directory without model.onnx",
                           "a directory model holds model.onnx (and tokenizer.json for "
                           "embeddings)") from None
    try:
        if not stat.S_ISREG(os.fstat(gfd).st_mode):
            raise _unsafe(str(canonical / "model.onnx"), "is not a regular file")
        check_fd(gfd, "onnx", str(canonical / "model.onnx"))
    finally:
        os.close(gfd)


def copy_fd(fd: int, out: Any, total: int, message: str, progress: Progress | None,
             done: int = 0) -> int:
    """Copies from an open descriptor (the one that was checked), never by path again."""
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, COPY_CHUNK):
        out.write(block)
        done += len(block)
        if progress:
            progress(done, total, message)
    return done


def _tree(dfd: int, shown: str, depth: int = 0, found: list[int] | None = None) -> int:
    """Bytes in a directory tree, refusing what ``_lstat_at`` refuses (and huge trees)."""
    found = found if found is not None else [0]
    if depth > _MAX_TREE_DEPTH:
        raise _unsafe(shown, f"is nested deeper than {_MAX_TREE_DEPTH} directories")
    total = 0
    for entry in sorted(os.listdir(dfd)):
        found[0] += 1
        if found[0] > _MAX_TREE_FILES:
            raise _unsafe(shown, f"holds more than {_MAX_TREE_FILES} entries")
        st = _lstat_at(dfd, entry, f"{shown}/{entry}")
        if stat.S_ISDIR(st.st_mode):
            sub = _open_at(dfd, entry, f"{shown}/{entry}")
            try:
                total += _tree(sub, f"{shown}/{entry}", depth + 1, found)
            finally:
                os.close(sub)
        else:
            total += st.st_size
    return total


def _copy_dir(dfd: int, dest: Path, shown: str, state: list[int], total: int, name: str,
              progress: Progress | None) -> None:
    for entry in sorted(os.listdir(dfd)):
        fd = _open_at(dfd, entry, f"{shown}/{entry}")
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                (dest / entry).mkdir(mode=0o700)
                _copy_dir(fd, dest / entry, f"{shown}/{entry}", state, total, name, progress)
            else:
                with open(dest / entry, "xb") as out:
                    state[0] = copy_fd(fd, out, total, f"importing {name}", progress, state[0])
        finally:
            os.close(fd)


def copy_tree_fd(dfd: int, dest: Path, name: str, progress: Progress | None) -> None:
    """Copies a directory model from its descriptor into a hidden temp dir, checks the copy
    as a scan and a load would (``inspect_onnx``, external data included), then renames it."""
    shown = name
    total = _tree(dfd, shown)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        _copy_dir(dfd, tmp, shown, [0], total, name, progress)
        from infernod.backends.onnx_inspect import inspect_onnx

        try:
            inspect_onnx(tmp)
        except InfernoError as e:
            code = "unsafe_path" if e.code == "unsafe_path" else "invalid_model"
            raise InfernoError(code, f"{e.message}; nothing was imported",
                               e.hint if code == "unsafe_path" else _INVALID_HINT) from e
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

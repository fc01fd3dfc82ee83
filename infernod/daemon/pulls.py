"""Models downloaded by the daemon: ``models.pull``, ``models.pull.cancel``, ``models.pulls``.

The daemon downloads (not the client), so an operator connected over CURVE from elsewhere
pulls straight onto the server. ``models.pull`` parses SOURCE (``pullsource``), resolves it
in the default executor (a Hugging Face reference lists the repository), claims the model
name, and starts one worker thread per download (``fetch.Fetch``: HTTP, resume, sha256,
header check). Its reply comes once the server's answer was checked (status, size, free
space), so a wrong URL or a full disk fails the request itself; the bytes then arrive in the
background, reported on the ``models`` topic (``progress`` events with ``pull_id``, rate and
ETA, at most 4 a second) and ended by a ``models`` event ``pulled`` or ``pull_failed``.

A second pull of the same file (the same URL) while one runs joins it: one download, one
model. On success the verified file is renamed into the writable model directory and added
to the registry (as an upload's is); on failure nothing is left in the model directory, and
an interrupted download (connection lost, stall, daemon stopped) keeps its partial file in
the hidden ``.pulls`` directory so the next pull of the same URL resumes it.

The loop side only keeps the table; the worker threads hand their news back with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infernod.daemon import fetch, pullsource, unpack
from infernod.daemon.registry import Registry, _name_from_path, check_name
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.daemon.server import Call

log = logging.getLogger(__name__)

MAX_PULLS = 4  # downloads at once
KEEP_FINISHED = 32  # finished pulls models.pulls still lists
DEFAULT_STALL_S = 60.0
REPLY_WAIT_S = 120.0  # the reply waits this long at most for the server's first answer
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

ModelsEvent = Callable[..., None]  # ModelManager.models_event(event, name, **extra)


@dataclass
class Pull:
    pull_id: str
    source: str
    name: str
    target: pullsource.Target
    owner: str
    state: str = "starting"  # starting, checking, downloading, verifying, done, failed, cancelled
    done_bytes: int = 0
    total_bytes: int | None = None
    rate_bytes_s: float = 0.0
    eta_s: float | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: dict[str, Any] | None = None
    path: str | None = None
    sha256: str | None = None
    requests: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    thread: threading.Thread | None = None

    def wire(self) -> dict[str, Any]:
        out = {"pull_id": self.pull_id, "model": self.name,
               "source": pullsource.shown(self.source),
               "url": pullsource.shown(self.target.url), "kind": self.target.kind, "state": self.state,
               "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
               "rate_bytes_s": round(self.rate_bytes_s), "eta_s": _round(self.eta_s),
               "started": self.started, "finished": self.finished,
               "sha256": self.sha256 or self.target.sha256, "path": self.path,
               "error": self.error}
        return {k: v for k, v in out.items() if v is not None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


class Pulls:
    """The downloads in progress, owned by the event loop."""

    def __init__(self, registry: Registry,
                 publish: Callable[[str, str, dict[str, Any]], object],
                 models_event: ModelsEvent) -> None:
        self.registry = registry
        self.publish = publish
        self.models_event = models_event
        self.active: dict[str, Pull] = {}  # pull_id -> running pull
        self.finished: deque[Pull] = deque(maxlen=KEEP_FINISHED)
        self.stopping = threading.Event()

    # -- handlers

    async def pull(self, req: Call) -> dict[str, Any]:
        b = req.body
        want_sha = b.get("sha256")
        if want_sha is not None:
            want_sha = str(want_sha).lower()
            if not _SHA_RE.match(want_sha):
                raise InfernoError("bad_request", "sha256 must be 64 hex digits")
        spec = pullsource.parse(str(b["source"]))
        loop = asyncio.get_running_loop()
        target = await loop.run_in_executor(None, pullsource.resolve, spec)
        if want_sha and target.sha256 and want_sha != target.sha256:
            raise InfernoError("checksum_mismatch", f"{pullsource.shown(spec.source)}: the hub says sha256 "
                               f"{target.sha256}, you gave {want_sha}; nothing was pulled",
                               "check --sha256")
        if want_sha:
            target = _with_sha(target, want_sha)
        if target.hub and pullsource.offline():
            raise InfernoError("pull_failed", f"{pullsource.shown(spec.source)}: Hugging Face offline mode is "
                               "on", "unset HF_HUB_OFFLINE in the daemon's environment")
        name = b.get("name")
        for p in self.active.values():  # the same file again: one download
            if p.target.key == target.key:
                if name is not None and name != p.name:
                    raise InfernoError("conflict", f"{pullsource.shown(target.url)} is being pulled as "
                                       f"{p.name} already", f"wait for it, or cancel it: "
                                       f"inferno pull --cancel {p.pull_id}")
                if want_sha and p.target.sha256 not in (None, want_sha):
                    raise InfernoError("conflict", f"{pullsource.shown(target.url)} is being pulled with "
                                       f"sha256 {p.target.sha256}", "wait for it, or cancel "
                                       "it and pull again")
                return await self._answer(p, joined=True)
        if len(self.active) >= MAX_PULLS:
            raise InfernoError("conflict", f"{len(self.active)} pulls are running (at most "
                               f"{MAX_PULLS})", "wait for one to finish, or cancel one: "
                               "inferno pull --cancel ID")
        if name is None:
            name = (_name_from_path(Path(unpack.stem(target.label)), is_dir=True)
                    if target.archive else _name_from_path(Path(target.label), is_dir=False))
        name = check_name(name)
        self.registry._reserve(name)
        stall = float(b.get("stall_timeout_s") or DEFAULT_STALL_S)
        p = Pull(pull_id=secrets.token_hex(8), source=spec.source, name=name, target=target,
                 owner=req.principal)
        self.active[p.pull_id] = p
        try:
            directory = await loop.run_in_executor(None, self.registry.writable_dir)
        except BaseException:
            self._end(p)
            raise
        p.thread = threading.Thread(target=self._work, args=(p, directory, stall, loop),
                                    name=f"pull-{p.pull_id}", daemon=True)
        p.thread.start()
        log.info("pulls: %s started by %s: %s as %s", p.pull_id, req.principal or "?",
                 pullsource.shown(target.url), name)
        return await self._answer(p, joined=False)

    async def _answer(self, p: Pull, joined: bool) -> dict[str, Any]:
        """The reply: after the server's first answer (or the end), so that a bad URL, a
        missing file or a full disk fail the request itself."""
        try:
            await asyncio.wait_for(p.answered.wait(), REPLY_WAIT_S)
        except TimeoutError:
            pass  # still connecting: the events say how it goes on
        if p.state == "failed" and p.error is not None:
            e = p.error
            raise InfernoError(e["code"], e["message"], e.get("hint"),
                               **{k: v for k, v in e.items()
                                  if k not in ("code", "message", "hint")})
        return {**p.wire(), "joined": joined}

    def _find(self, ref: str) -> Pull:
        for p in [*self.active.values(), *reversed(self.finished)]:
            if ref in (p.pull_id, p.name):
                return p
        raise InfernoError("unknown_pull", f"no pull {ref!r} in progress",
                           "'inferno pull --list' shows the pulls")

    async def cancel(self, req: Call) -> dict[str, Any]:
        p = self._find(str(req.body["pull"]))
        if p.pull_id in self.active:
            p.cancelled.set()
            log.info("pulls: %s (%s) cancelled by %s", p.pull_id, p.name,
                     req.principal or "?")
            end = time.monotonic() + 5.0
            while p.pull_id in self.active and time.monotonic() < end:
                await asyncio.sleep(0.05)
        return {**p.wire(), "state": p.state if p.pull_id not in self.active
                else "cancelling"}

    async def list(self, req: Call) -> dict[str, Any]:
        return {"pulls": [p.wire() for p in [*self.active.values(),
                                             *reversed(self.finished)]]}

    # -- the worker thread

    def _work(self, p: Pull, directory: Path, stall: float,
              loop: asyncio.AbstractEventLoop) -> None:
        def report(state: str, done: int, total: int | None, rate: float,
                   eta: float | None) -> None:
            loop.call_soon_threadsafe(self._progress, p, state, done, total, rate, eta)

        f = fetch.Fetch(p.target, directory, stall, p.cancelled, self.stopping, report)
        try:
            part, sha, size = f.run()
            info = self._install(p, part, directory)
            result: dict[str, Any] = {"path": str(info.path), "sha256": sha, "size": size}
            error = None
        except fetch.Stopped:
            result, error = {}, InfernoError("shutting_down", f"the daemon stopped while "
                                             f"pulling {p.name}; {f.have} bytes kept",
                                             "pull again when it is back: it resumes")
        except InfernoError as e:
            result, error = {}, e
        except Exception as e:  # noqa: BLE001 - a bug must end the pull, not hang it
            log.exception("pulls: %s crashed", p.pull_id)
            result, error = {}, InfernoError("internal", f"{type(e).__name__}: {e}")
        p.requests = f.requests
        try:
            loop.call_soon_threadsafe(self._finish, p, result, error)
        except RuntimeError:  # the loop is closed: the daemon is gone
            pass

    def _install(self, p: Pull, part: Path, directory: Path) -> Any:
        """The verified file into place: renamed beside the model directory's entries under
        a hidden name first, then linked under the model's name by the registry. An
        archive is unpacked into a hidden directory there, checked, and renamed."""
        if p.target.archive is not None:
            return self._install_dir(p, part, directory)
        ready = directory / f".pull-{p.target.key}.ready"
        part.rename(ready)
        try:
            return self.registry.add_file(p.name, ready, p.target.kind)
        finally:
            ready.unlink(missing_ok=True)

    def _install_dir(self, p: Pull, part: Path, directory: Path) -> Any:
        assert p.target.archive is not None
        try:
            tmp, root = unpack.unpack(part, p.target.archive, directory, p.name, p.target.label)
        finally:
            part.unlink(missing_ok=True)
        dest = directory / p.name
        try:
            if dest.exists() or dest.is_symlink():
                raise InfernoError("conflict", f"a model named {p.name!r} appeared meanwhile",
                                   "pick another name with --name")
            os.rename(root, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.registry.scan()
        try:
            return self.registry.get(p.name)
        except InfernoError:
            shutil.rmtree(dest, ignore_errors=True)  # read back differently: keep nothing
            raise

    # -- on the loop

    def _progress(self, p: Pull, state: str, done: int, total: int | None, rate: float,
                  eta: float | None) -> None:
        if p.pull_id not in self.active:
            return
        p.state, p.done_bytes, p.rate_bytes_s, p.eta_s = state, done, rate, eta
        p.total_bytes = total if total is not None else p.total_bytes
        if state == "downloading":
            p.answered.set()
        self.publish("models", "progress", {
            "event": "progress", **p.wire(),
            "message": f"{'pulling' if state == 'downloading' else state} {p.name}"})

    def _finish(self, p: Pull, result: dict[str, Any], error: InfernoError | None) -> None:
        p.finished = time.time()
        if error is None:
            p.state, p.path, p.sha256 = "done", result["path"], result["sha256"]
            p.done_bytes = p.total_bytes = result["size"]
            log.info("pulls: %s finished: %s (%d bytes, sha256 %s, %d requests)", p.pull_id,
                     p.path, p.done_bytes, p.sha256, p.requests)
        else:
            p.state = "cancelled" if error.code == "cancelled" else "failed"
            p.error = error.to_wire()
            log.info("pulls: %s %s: %s", p.pull_id, p.state, error)
        self._end(p)
        self.finished.append(p)
        p.answered.set()
        if error is None:
            self.models_event("pulled", p.name, pull_id=p.pull_id,
                              source=pullsource.shown(p.source),
                              size_bytes=p.done_bytes, sha256=p.sha256)
        else:
            self.models_event("pull_failed", p.name, pull_id=p.pull_id,
                              source=pullsource.shown(p.source),
                              state=p.state, error=p.error)

    def _end(self, p: Pull) -> None:
        self.active.pop(p.pull_id, None)
        self.registry.release(p.name)

    async def close(self) -> None:
        """Stops every download, keeping the partial files (the next pull resumes)."""
        self.stopping.set()
        threads = [p.thread for p in self.active.values() if p.thread is not None]
        loop = asyncio.get_running_loop()
        for t in threads:
            await loop.run_in_executor(None, t.join, 3.0)


def _with_sha(t: pullsource.Target, sha: str) -> pullsource.Target:
    from dataclasses import replace

    return replace(t, sha256=sha)


async def maintain(pulls: Pulls) -> None:
    """The daemon's task for pulls: partial downloads untouched for a week are deleted."""
    await asyncio.get_running_loop().run_in_executor(
        None, fetch.remove_stale, pulls.registry.model_dirs)

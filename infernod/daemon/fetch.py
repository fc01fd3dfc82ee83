"""One download of a pull, with resume: blocking, run in the pull's own worker thread.

Where the bytes go: ``<model dir>/.pulls/<key>.part``, ``<key>`` naming the URL, beside
``<key>.json`` (the URL, the server's ETag, the expected size and sha256). The directory is
hidden (the registry's scan skips it) and on the model directory's filesystem, so the
finished file is renamed into place, never copied, and nothing half-written ever appears
under a model's name.

A pull that finds a partial file for its URL hashes what is there and asks for the rest
(``Range: bytes=N-`` with ``If-Range``); a server that answers 200 instead of 206 (it
ignores ranges, or the file changed) or with another ETag than before starts it over. A
connection dropped mid-body is retried from where it stopped (``RETRIES`` times, with
backoff); no bytes for ``stall_s`` seconds fails the pull (``pull_failed``), keeping the
partial file for the next try. Before any byte is written the announced size is checked
against the free space (``insufficient_storage``); the first bytes must be the model
kind's magic (``invalid_model``: an error page is not a model). At the end the sha256 is
checked (``checksum_mismatch``) and the whole header validated as ``models.import`` does.

HTTP goes through ``httpx2``, the client ``huggingface_hub`` itself uses: one HTTP stack,
which honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE`` from the
daemon's environment.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infernod.daemon.importing import validate_model_file
from infernod.daemon.pullsource import Target, shown
from infernod.protocol.errors import InfernoError

log = logging.getLogger(__name__)

PULLS_DIR = ".pulls"
CHUNK = 1024 * 1024
RETRIES = 3
SPACE_MARGIN = 64 * 1024 * 1024  # left free on the model directory's filesystem
STALE_S = 7 * 86400  # partial downloads untouched this long are deleted at start
MAGIC = {"gguf": b"GGUF", "onnx": b"\x08"}


def magic_of(t: Target) -> bytes:
    """What the first bytes must be: the model kind's magic, or the archive's."""
    low = t.label.lower()
    if t.archive is None:
        return MAGIC[t.kind]
    if low.endswith((".gz", ".tgz")):
        return b"\x1f\x8b"
    return b"PK\x03\x04" if t.archive == "zip" else b""  # a plain tar: tarfile checks it

Report = Callable[[str, int, int | None, float, float | None], None]
"""``report(state, done_bytes, total_bytes, rate_bytes_s, eta_s)``, at most 4 times a
second, from the worker thread."""


class Stopped(Exception):
    """The daemon is stopping: the partial file stays for the next pull of the same URL."""


class _Transient(Exception):
    """A connection dropped mid-body: worth another request from where it stopped."""


class Fetch:
    def __init__(self, target: Target, directory: Path, stall_s: float,
                 cancelled: threading.Event, stopping: threading.Event,
                 report: Report) -> None:
        self.t = target
        self.magic = magic_of(target)
        self.where = shown(target.url)  # for messages: no query string, no credentials
        self.dir = directory / PULLS_DIR
        self.part = self.dir / f"{target.key}.part"
        self.meta_path = self.dir / f"{target.key}.json"
        self.stall_s = stall_s
        self.cancelled = cancelled
        self.stopping = stopping
        self.report = report
        self.digest = hashlib.sha256()
        self.have = 0
        self.total: int | None = target.size
        self.etag: str | None = None
        self.requests = 0
        self.ctype = ""
        self._samples: deque[tuple[float, int]] = deque()
        self._last_report = 0.0

    # -- the whole download

    def run(self) -> tuple[Path, str, int]:
        """Downloads, verifies and validates; returns (the finished file, sha256, size)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        try:
            self._resume_state()
            attempt = 0
            while True:
                try:
                    self._request()
                    break
                except _Transient as e:
                    attempt += 1
                    if attempt > RETRIES:
                        raise InfernoError("pull_failed", f"{self.t.label}: {e} ({RETRIES} "
                                           f"retries); {self.have} bytes kept",
                                           "pull again to resume") from None
                    log.info("pulls: %s: %s; resuming at %d (try %d)", self.t.label, e,
                             self.have, attempt + 1)
                    if self._wait(min(2.0 ** (attempt - 1), 8.0)):
                        self._check_stop()
            self.report("verifying", self.have, self.total, 0.0, None)
            got = self.digest.hexdigest()
            if self.t.sha256 and got != self.t.sha256:
                self.discard()
                raise InfernoError("checksum_mismatch", f"{self.t.label}: sha256 of what "
                                   f"arrived is {got}, expected {self.t.sha256}; nothing was "
                                   "kept", "check --sha256; if it is right, the server sent "
                                   "another file: pull again")
            try:
                if self.t.archive is None:  # an archive is checked as it is unpacked
                    validate_model_file(self.part, self.t.kind, self.t.label)
            except InfernoError:
                self.discard()
                raise
            self.meta_path.unlink(missing_ok=True)
            return self.part, got, self.have
        except InfernoError as e:
            if e.code == "cancelled":
                self.discard()
            raise

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)

    def _check_stop(self) -> None:
        if self.cancelled.is_set():
            raise InfernoError("cancelled", f"pull of {self.t.label} cancelled; nothing was "
                               "kept", "pull again to start over")
        if self.stopping.is_set():
            raise Stopped()

    def _wait(self, seconds: float) -> bool:
        """Sleeps, woken early by a cancel or a stop (then True)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.cancelled.is_set() or self.stopping.is_set():
                return True
            time.sleep(0.05)
        return False

    # -- partial state

    def _resume_state(self) -> None:
        meta = _read_json(self.meta_path)
        if (not self.part.is_file() or meta.get("url") != self.t.url
                or (self.t.sha256 and meta.get("sha256") not in (None, self.t.sha256))):
            self.discard()
            return
        self.etag = meta.get("etag")
        self.report("checking", 0, self.part.stat().st_size, 0.0, None)
        with self.part.open("rb") as f:
            while block := f.read(8 * CHUNK):
                self._check_stop()
                self.digest.update(block)
                self.have += len(block)
        log.info("pulls: %s: %d bytes from an earlier try kept", self.t.label, self.have)

    def _restart(self, why: str) -> None:
        log.info("pulls: %s: %s; starting over", self.t.label, why)
        self.part.unlink(missing_ok=True)
        self.digest = hashlib.sha256()
        self.have = 0

    def _save_meta(self) -> None:
        data = {"url": self.t.url, "source": self.t.source, "label": self.t.label,
                "kind": self.t.kind, "etag": self.etag, "size": self.total,
                "sha256": self.t.sha256, "saved": time.time()}
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.meta_path)

    # -- one request

    def _request(self) -> None:
        import httpx2

        headers = {**self.t.headers, "Accept-Encoding": "identity"}
        if self.have:
            headers["Range"] = f"bytes={self.have}-"
            if self.etag and not self.etag.startswith("W/"):
                headers["If-Range"] = self.etag
        timeout = httpx2.Timeout(self.stall_s, connect=min(self.stall_s, 30.0))
        self._check_stop()
        try:
            with httpx2.Client(follow_redirects=True, timeout=timeout) as client, \
                    client.stream("GET", self.t.url, headers=headers) as r:
                self.requests += 1
                self._start(r)
                self.report("downloading", self.have, self.total, 0.0, None)
                self._body(r)
        except httpx2.TimeoutException:
            raise InfernoError("pull_failed", f"{self.t.label}: no data from the server for "
                               f"{self.stall_s:g}s; {self.have} bytes kept",
                               "pull again to resume; a slow server may need a longer "
                               "--stall-timeout") from None
        except (httpx2.RemoteProtocolError, httpx2.ReadError) as e:
            raise _Transient(f"connection lost ({type(e).__name__})") from None
        except httpx2.HTTPError as e:
            raise InfernoError("pull_failed", f"{self.t.label}: cannot reach {self.where}: "
                               f"{type(e).__name__}: {e}", "check the URL, the daemon "
                               "host's network and its HTTPS_PROXY/NO_PROXY") from None

    def _start(self, r: Any) -> None:
        """Checks the response's status and headers before a byte of the body is taken."""
        if r.status_code == 416 and self.have:
            self._restart("the server refused the range")
            raise _Transient("range refused")
        if r.status_code in (404, 410):
            raise InfernoError("source_not_found", f"{self.where}: HTTP {r.status_code}",
                               "check the URL (or the repository and file name)",
                               http_status=r.status_code)
        if r.status_code in (401, 403):
            hint = ("a private or gated repository needs HF_TOKEN in the daemon's environment"
                    if self.t.hub else "the server wants credentials the daemon does not have")
            raise InfernoError("pull_failed", f"{self.where}: HTTP {r.status_code}", hint,
                               http_status=r.status_code)
        if r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise InfernoError("pull_failed", f"{self.where}: HTTP {r.status_code}",
                               "the server did not send the file", http_status=r.status_code)
        etag = r.headers.get("etag")
        self.ctype = r.headers.get("content-type", "")
        length = _int(r.headers.get("content-length"))
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("content-range", ""))
            if start != self.have or (self.etag and etag and etag != self.etag):
                self._restart("the file changed on the server" if start == self.have
                              else f"the server answered from byte {start}")
                raise _Transient("restart")
        else:
            if self.have:
                self._restart("the server ignored the range request")
            total = length
        if total is not None and self.t.size is not None and total != self.t.size:
            raise InfernoError("pull_failed", f"{self.where}: the server announces {total} "
                               f"bytes, the hub's metadata says {self.t.size}",
                               "retry later; the file may be changing")
        self.total = total if total is not None else self.total
        self.etag = etag
        if self.total is not None:
            need = self.total - self.have
            free = shutil.disk_usage(self.dir).free
            if need + SPACE_MARGIN > free:
                raise InfernoError("insufficient_storage", f"{self.t.label} needs {need} more "
                                   f"bytes; {free} are free in {self.dir.parent} "
                                   f"({SPACE_MARGIN} kept free)", "free disk space in the "
                                   "model directory, then pull again", need_bytes=need,
                                   free_bytes=free)
        self._save_meta()

    def _body(self, r: Any) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.part, flags, 0o600)
        try:
            if os.fstat(fd).st_size != self.have:
                os.ftruncate(fd, self.have)
            head = b""
            for block in r.iter_raw():  # as it arrives: a drop loses no buffered bytes
                self._check_stop()
                if self.have < len(self.magic):
                    head = (head + block)[:16]
                    if len(head) >= len(self.magic):
                        self._check_magic(head)
                if self.total is not None and self.have + len(block) > self.total:
                    raise InfernoError("pull_failed", f"{self.where}: more bytes than the "
                                       f"{self.total} announced", "retry later")
                _write_all(fd, block, self)
                self.digest.update(block)
                self.have += len(block)
                self._progress()
            os.fsync(fd)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InfernoError("insufficient_storage", f"{self.dir.parent} filled up "
                                   f"after {self.have} bytes of {self.t.label}; they are kept",
                                   "free disk space, then pull again to resume") from None
            raise
        finally:
            os.close(fd)
        if self.have == 0 or (self.total is not None and self.have < self.total):
            raise _Transient(f"the server closed the connection at {self.have} bytes")
        if self.have < len(self.magic):
            self._check_magic(self.part.read_bytes()[:16])
        self.total = self.have

    def _check_magic(self, head: bytes) -> None:
        if not head.startswith(self.magic):
            self.discard()
            what = (self.t.archive or self.t.kind).upper()
            raise InfernoError("invalid_model", f"{self.where} did not send a {what} file "
                               f"(it starts with {head[:8]!r}"
                               f"{', Content-Type ' + self.ctype if self.ctype else ''}); "
                               "nothing was kept", "check the URL: it may lead to a web page "
                               "instead of the file")

    def _progress(self) -> None:
        now = time.monotonic()
        self._samples.append((now, self.have))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        if now - self._last_report < 0.25 and self.have != self.total:
            return
        self._last_report = now
        t0, b0 = self._samples[0]
        rate = (self.have - b0) / (now - t0) if now > t0 else 0.0
        eta = ((self.total - self.have) / rate if rate > 0 and self.total is not None
               else None)
        self.report("downloading", self.have, self.total, rate, eta)


def _write_all(fd: int, block: bytes, f: Fetch) -> None:
    view = memoryview(block)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _content_range(text: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None when ``*``)."""
    try:
        unit, _, rest = text.partition(" ")
        span, _, total = rest.partition("/")
        if unit != "bytes":
            raise ValueError(text)
        return int(span.split("-")[0]), (None if total == "*" else int(total))
    except ValueError:
        raise _Transient(f"bad Content-Range {text!r}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_ORPHAN_RE = re.compile(r"^\.pull-[0-9a-f]{32}\.ready$|^\.[a-z0-9][a-z0-9._-]*\.\w+\.unpack$")


def remove_stale(model_dirs: list[Path], now: float | None = None) -> int:
    """At start (no pull runs): deletes partial downloads untouched for ``STALE_S``, and what
    a daemon killed between the last check and the rename left beside the models (a
    ``.pull-KEY.ready`` file, a ``.NAME.*.unpack`` directory). Blocking: executor."""
    now = time.time() if now is None else now
    removed = 0
    for d in model_dirs:
        try:
            orphans = [p for p in d.iterdir() if _ORPHAN_RE.match(p.name)] if d.is_dir() else []
        except OSError:
            orphans = []
        for p in orphans:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        pulls = d / PULLS_DIR
        try:
            entries = list(pulls.iterdir()) if pulls.is_dir() else []
        except OSError:
            continue
        for p in entries:
            try:
                if p.is_file() and not p.is_symlink() and now - p.stat().st_mtime > STALE_S:
                    p.unlink()
                    removed += 1
            except OSError:
                continue
    if removed:
        log.info("pulls: removed %d leftovers (partial downloads untouched for %d days, "
                 "unfinished installs)", removed, STALE_S // 86400)
    return removed

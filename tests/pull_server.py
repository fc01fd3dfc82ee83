"""A local HTTP file server for pull tests: real sockets on 127.0.0.1, ``Range`` support,
ETags, and misbehaviour on demand (drop the connection, stall, send garbage, announce a
huge size, trickle slowly, ignore ranges). It also answers the Hugging Face hub's
``/api/models/ORG/REPO/tree/REV`` listing and ``/ORG/REPO/resolve/REV/FILE`` URLs (the
latter redirected once, as the hub redirects to its CDN), so ``HF_ENDPOINT`` can point at it.

Every request is recorded (method, path, headers, bytes of body sent). Stalls wait on an
event that ``close()`` sets, so the server never outlives its test."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Plan:
    """How to answer one GET of a file (plans are used in order, then ``default``)."""

    drop_after: int | None = None  # close the connection after this many body bytes
    stall_after: int | None = None  # send this many bytes, then go silent
    rate: float | None = None  # bytes per second
    garbage: bool = False  # an HTML page with status 200
    announce: int | None = None  # a Content-Length that is a lie (and send nothing)
    ignore_range: bool = False
    status: int | None = None
    etag: str | None = None  # override the ETag


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    sent: int = 0


@dataclass
class HubFile:
    path: str
    data: bytes | Path
    lfs_sha256: str | None = None  # what the listing claims (default: the real one)


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes | Path] = {}
        self.plans: dict[str, list[Plan]] = {}
        self.hub: dict[str, list[HubFile]] = {}  # "org/repo" -> files
        self.seen: list[Seen] = []
        self.closing = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes | Path, *plans: Plan) -> str:
        self.files[path] = data
        self.plans[path] = list(plans)
        return self.url(path)

    def add_repo(self, repo: str, files: list[HubFile]) -> None:
        self.hub[repo] = files
        for f in files:
            self.files[f"/cdn/{repo}/{f.path}"] = f.data

    def gets(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET" and s.path == path]

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    # -- answering

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?")[0]
        seen = Seen(h.command, path, {k.lower(): v for k, v in h.headers.items()})
        with self.lock:
            self.seen.append(seen)
        for repo, files in self.hub.items():
            if path.startswith(f"/api/models/{repo}/tree/"):
                listing = [_tree_entry(f) for f in files]
                return _send(h, 200, json.dumps(listing).encode(), "application/json")
            prefix = f"/{repo}/resolve/main/"
            if path.startswith(prefix):
                target = f"/cdn/{repo}/{path[len(prefix):]}"
                if target not in self.files:
                    return _send(h, 404, b"Entry not found", "text/plain")
                h.send_response(302)
                h.send_header("Location", target)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
        if path.startswith("/api/models/"):
            return _send(h, 404, b'{"error":"Repository not found"}', "application/json",
                         {"X-Error-Code": "RepoNotFound"})
        data = self.files.get(path)
        if data is None:
            return _send(h, 404, b"not found", "text/plain")
        plans = self.plans.get(path, [])
        with self.lock:
            plan = plans.pop(0) if plans else Plan()
        self._serve(h, head, data, plan, seen)

    def _serve(self, h: BaseHTTPRequestHandler, head: bool, data: bytes | Path, plan: Plan,
               seen: Seen) -> None:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        etag = plan.etag or f'"{size:x}-{_tag(data)}"'
        if plan.status:
            return _send(h, plan.status, b"no", "text/plain")
        if plan.garbage:
            return _send(h, 200, b"<!doctype html><html><body>Sign in</body></html>" * 50,
                         "text/html")
        start = 0
        rng = seen.headers.get("range")
        if rng and not plan.ignore_range:
            if_range = seen.headers.get("if-range")
            if if_range is None or if_range == etag:
                start = int(rng.split("=")[1].split("-")[0])
        if start >= size and start:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{size}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.send_header("Content-Length", str(plan.announce or size - start))
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        h.end_headers()
        if head or plan.announce:
            return None
        pos, t0 = start, time.monotonic()
        try:
            f = data.open("rb") if isinstance(data, Path) else None
            try:
                while pos < size and not self.closing.is_set():
                    step = 64 * 1024 if plan.rate else 1024 * 1024
                    if plan.drop_after is not None:
                        step = min(step, start + plan.drop_after - pos)
                        if step <= 0:
                            h.close_connection = True
                            return None
                    if plan.stall_after is not None:
                        step = min(step, start + plan.stall_after - pos)
                        if step <= 0:
                            self.closing.wait(60)
                            h.close_connection = True
                            return None
                    if f is not None:
                        f.seek(pos)
                        block = f.read(step)
                    else:
                        assert isinstance(data, bytes)
                        block = data[pos : pos + step]
                    h.wfile.write(block)
                    h.wfile.flush()
                    pos += len(block)
                    seen.sent += len(block)
                    if plan.rate:
                        ahead = (pos - start) / plan.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            self.closing.wait(ahead)
            finally:
                if f is not None:
                    f.close()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        return None


def _tag(data: bytes | Path) -> str:
    return hashlib.md5(str(data).encode() if isinstance(data, Path) else data).hexdigest()[:12]


def sha256_of(data: bytes | Path) -> str:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    d = hashlib.sha256()
    with data.open("rb") as f:
        while block := f.read(8 << 20):
            d.update(block)
    return d.hexdigest()


def _tree_entry(f: HubFile) -> dict[str, Any]:
    size = f.data.stat().st_size if isinstance(f.data, Path) else len(f.data)
    return {"type": "file", "path": f.path, "size": size, "oid": "0" * 40,
            "lfs": {"oid": f.lfs_sha256 or sha256_of(f.data), "size": size,
                    "pointerSize": 134}}


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str,
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)

"""Client library for infernod: everything a script, the CLI or the TUI needs.

    from infernod.client import Client
    with Client() as c:
        for text in c.generate("gemma3-270m", prompt="The capital of France is"):
            print(text, end="", flush=True)

``Client`` is synchronous, ``AsyncClient`` is for asyncio (Textual runs on asyncio). Neither
is thread-safe: use one per thread, like the ZeroMQ sockets inside them.

A client never hangs: every wait has a timeout; no socket file or no reply raises
``DaemonUnavailable`` quickly; during a stream, three missed heartbeats or a new ``boot_id``
(the daemon restarted) raise it too. ZeroMQ reconnects by itself, so the same client works
again once the daemon is back. Missed stream events (a gap in ``seq``) are fetched with
``stream.fetch``, so a stream always delivers every token exactly once, in order.

Importing this module imports neither llama_cpp, onnxruntime, textual nor pynvml.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from infernod.paths import Endpoints, default_endpoints
from infernod.protocol import codec
from infernod.protocol.errors import DaemonUnavailable, InfernoError

__all__ = ["AsyncClient", "Client", "DaemonUnavailable", "Event", "InfernoError", "Stream",
           "AsyncStream"]

HEARTBEAT_MISSES = 3
LEASE_PING_S = 2.0


@dataclass
class Event:
    """One published event: topic, type, per-topic seq, the daemon's boot id, and its body."""

    topic: str
    type: str
    seq: int
    boot_id: str
    body: dict[str, Any]
    ts: float = 0.0


@dataclass
class CurveKeys:
    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_key: str, client_key: str) -> CurveKeys:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_key)
        client_public, client_secret = zmq.auth.load_certificate(client_key)
        if client_secret is None:
            raise InfernoError("bad_request", f"{client_key} holds no secret key",
                               "pass the .key_secret file made by 'inferno keys add'")
        return cls(server_public, client_public, client_secret)


def _endpoints(endpoint: str | Endpoints | None) -> Endpoints:
    if isinstance(endpoint, Endpoints):
        return endpoint
    return Endpoints.from_control(endpoint) if endpoint else default_endpoints()


def _check_socket_file(ep: Endpoints) -> None:
    if ep.control.startswith("ipc://"):
        path = Path(ep.control[len("ipc://"):])
        if not path.exists():
            raise DaemonUnavailable(f"no daemon socket at {path}",
                                    "start it with 'infernod' or 'systemctl start infernod'")


def _decode_event(frames: list[bytes]) -> Event | None:
    if len(frames) != 4 or frames[1] != codec.MAGIC:
        return None
    header = codec.unpackb(frames[2], max_bytes=codec.MAX_HEADER_BYTES * 4, what="header")
    body = codec.unpackb(frames[3], max_bytes=64 * 1024 * 1024)
    return Event(str(header.get("topic", "")), str(header.get("type", "")),
                 int(header.get("seq", 0)), str(header.get("boot_id", "")), body,
                 float(header.get("ts", 0.0)))


@dataclass
class _StreamState:
    """Ordering and gap detection for one token stream; pure, shared by both clients."""

    request_id: str
    boot_id: str
    next_seq: int = 0
    pending: dict[int, Event] = field(default_factory=dict)
    done: bool = False
    stats: dict[str, Any] | None = None
    start: dict[str, Any] | None = None
    text: list[str] = field(default_factory=list)
    queued: dict[str, Any] | None = None  # last 'queued' event: position, eta_s (until start)
    preemptions: int = 0

    def offer(self, ev: Event) -> list[Event]:
        """Accept an event in any order; return the ones now deliverable in order."""
        if ev.seq < self.next_seq:
            return []
        self.pending[ev.seq] = ev
        out = []
        while self.next_seq in self.pending:
            out.append(self.pending.pop(self.next_seq))
            self.next_seq += 1
        return out

    @property
    def has_gap(self) -> bool:
        return bool(self.pending)

    def apply(self, ev: Event) -> str | None:
        """Return text to hand to the user, raise for an error event, record the end."""
        if ev.type == "token":
            text = ev.body.get("text", "")
            self.text.append(text)
            return text
        if ev.type == "queued":
            self.queued = ev.body
        elif ev.type == "preempted":
            self.preemptions += 1
        elif ev.type == "start":
            self.start = ev.body
        elif ev.type == "done":
            self.done = True
            self.stats = ev.body
        elif ev.type == "error":
            self.done = True
            self.stats = ev.body.get("stats")
            raise InfernoError.from_wire(ev.body)
        return None


class _Base:
    def __init__(self, endpoint: str | Endpoints | None, timeout: float, name: str,
                 curve: CurveKeys | None) -> None:
        self.endpoints = _endpoints(endpoint)
        self.timeout = timeout
        self.name = name
        self.curve = curve
        self.session = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self.boot_id: str | None = None
        self.heartbeat_interval_s = 1.0
        self.last_heartbeat = time.monotonic()
        self.welcomed = False
        self.welcome: dict[str, Any] | None = None
        self.events: deque[Event] = deque(maxlen=100_000)
        self._streams: dict[str, deque[Event]] = {}
        self.restarted = False
        self._last_pump = time.monotonic()

    def _setup(self, dealer: zmq.Socket, sub: zmq.Socket, topics: tuple[str, ...]) -> None:
        if not self.endpoints.control.startswith("tcp://"):
            _check_socket_file(self.endpoints)
        elif self.curve is None:
            raise InfernoError("bad_request", "tcp:// endpoints need CURVE keys",
                               "pass --server-key and --client-key")
        for s in (dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if self.curve is not None:
                s.curve_serverkey = self.curve.server_public
                s.curve_publickey = self.curve.client_public
                s.curve_secretkey = self.curve.client_secret
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 1000)
        sub.setsockopt(zmq.RCVHWM, 100000)
        dealer.connect(self.endpoints.control)
        sub.connect(self.endpoints.events)
        sub.setsockopt(zmq.SUBSCRIBE, f"tokens.{self.session}.".encode())
        sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
        for t in topics:
            sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        # Subscribed last: when the welcome arrives, every subscription above is in place.
        sub.setsockopt(zmq.SUBSCRIBE, f"welcome.{self.session}".encode())

    def _frames(self, type_: str, body: dict[str, Any] | None, deadline: float | None,
                idem: str | None) -> tuple[str, list[bytes]]:
        msg_id = str(next(self._ids))
        header: dict[str, Any] = {"id": msg_id, "type": type_, "session": self.session,
                                  "ts": time.time()}
        if deadline is not None:
            header["deadline"] = deadline
        if idem is not None:
            header["idem"] = idem
        return msg_id, codec.encode_request(header, body or {})

    def _parse_reply(self, frames: list[bytes], msg_id: str) -> dict[str, Any] | None:
        if len(frames) != 3 or frames[0] != codec.MAGIC:
            return None
        header = codec.unpackb(frames[1], max_bytes=codec.MAX_HEADER_BYTES, what="header")
        if header.get("re") != msg_id:
            return None  # a late reply to an earlier, timed-out request
        body = codec.unpackb(frames[2], max_bytes=256 * 1024 * 1024)
        self._see_boot(str(header.get("boot_id", "")))
        if header.get("type") == "error":
            raise InfernoError.from_wire(body)
        return body

    def _see_boot(self, boot_id: str) -> None:
        if not boot_id:
            return
        if self.boot_id is not None and boot_id != self.boot_id:
            self.restarted = True
        self.boot_id = boot_id

    def _on_event(self, ev: Event) -> None:
        if ev.topic == "heartbeat" or ev.type == "welcome":
            # Only heartbeats count: queued token events still arrive from a dead daemon.
            self.last_heartbeat = time.monotonic()
        if ev.type == "welcome":
            self.welcomed = True
            self.welcome = ev.body
            self._see_boot(ev.boot_id)
            return
        if ev.boot_id and self.boot_id is not None and ev.boot_id != self.boot_id:
            self._see_boot(ev.boot_id)
        elif ev.boot_id and self.boot_id is None:
            self.boot_id = ev.boot_id
        if ev.topic == "heartbeat":
            self.heartbeat_interval_s = float(ev.body.get("interval_s", 1.0))
        if ev.topic.startswith("tokens."):
            rid = ev.topic[len("tokens."):]
            self._streams.setdefault(rid, deque()).append(ev)
        else:
            self.events.append(ev)

    def _note_pump(self) -> None:
        """Called each time we listen: if *we* stood still (SIGSTOP, a long pause between
        calls), the daemon's silence meanwhile proves nothing; give it a fresh window."""
        now = time.monotonic()
        if now - self._last_pump > self._lost_after():
            self.last_heartbeat = now
        self._last_pump = now

    def _lost_after(self) -> float:
        return self.heartbeat_interval_s * HEARTBEAT_MISSES

    def _check_alive(self, state: _StreamState | None = None) -> None:
        self._note_pump()  # stopped ourselves since we last listened? that is not the daemon
        silent = time.monotonic() - self.last_heartbeat
        if silent > self._lost_after():
            raise DaemonUnavailable(f"daemon lost: no heartbeat for {silent:.1f}s",
                                    "is infernod still running?")
        if state is not None and self.boot_id and state.boot_id and \
                self.boot_id != state.boot_id:
            raise DaemonUnavailable("the daemon restarted; the stream was lost",
                                    "submit the request again", reason="daemon_restarted")

    @staticmethod
    def _gen_body(model: str, prompt: str | None, messages: list | None,
                  params: dict[str, Any]) -> dict[str, Any]:
        body = {"model": model, **{k: v for k, v in params.items() if v is not None}}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        return body


class Client(_Base):
    """Synchronous client. ``timeout`` bounds every request (seconds)."""

    def __init__(self, endpoint: str | Endpoints | None = None, *, timeout: float = 10.0,
                 name: str = "inferno-client", curve: CurveKeys | None = None,
                 topics: tuple[str, ...] = ()) -> None:
        super().__init__(endpoint, timeout, name, curve)
        self.ctx = zmq.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        try:
            self._setup(self.dealer, self.sub, topics)
        except Exception:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in (self.dealer, self.sub):
            if not s.closed:
                s.close(0)

    # -- plumbing ---------------------------------------------------------------------------
    def _pump(self, timeout_s: float) -> list[bytes] | None:
        """Wait up to timeout for anything; handle events; return control frames if any."""
        self._note_pump()
        socks = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        self._note_pump()
        if self.sub in socks:
            for _ in range(1000):
                try:
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ev = _decode_event(frames)
                if ev is not None:
                    self._on_event(ev)
        if self.dealer in socks:
            return self.dealer.recv_multipart(zmq.NOBLOCK)
        return None

    def send(self, type_: str, body: dict[str, Any] | None = None, *,
             deadline: float | None = None, idem: str | None = None) -> str:
        msg_id, frames = self._frames(type_, body, deadline, idem)
        end = time.monotonic() + min(self.timeout, 2.0)
        while True:
            try:
                self.dealer.send_multipart(frames, zmq.NOBLOCK)
                return msg_id
            except zmq.Again:  # IMMEDIATE: no connection yet
                if time.monotonic() > end:
                    raise DaemonUnavailable(
                        f"cannot connect to {self.endpoints.control}",
                        "is infernod running? ('inferno status' / 'systemctl status infernod')",
                    ) from None
                self._pump(0.02)

    def try_send(self, type_: str, body: dict[str, Any] | None = None) -> bool:
        """Send without waiting for a connection (fire-and-forget keep-alives)."""
        _, frames = self._frames(type_, body, None, None)
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def request(self, type_: str, body: dict[str, Any] | None = None, *,
                timeout: float | None = None, deadline: float | None = None,
                idem: str | None = None) -> dict[str, Any]:
        msg_id = self.send(type_, body, deadline=deadline, idem=idem)
        limit = timeout if timeout is not None else self.timeout
        end = time.monotonic() + limit
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable(f"no reply to '{type_}' within {limit:.1f}s",
                                        "the daemon may be hung or gone")
            frames = self._pump(min(left, 0.5))
            if frames is not None:
                reply = self._parse_reply(frames, msg_id)
                if reply is not None:
                    return reply

    def wait_welcome(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the daemon's welcome arrived: from then on no event is missed."""
        end = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while not self.welcomed:
            if time.monotonic() > end:
                raise DaemonUnavailable("no welcome from the daemon's event socket")
            self._pump(0.05)
        return self.welcome or {}

    # -- requests ---------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return self.request("hello", {"client": self.name})

    def ping(self) -> dict[str, Any]:
        return self.request("ping")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def models(self) -> list[dict[str, Any]]:
        return self.request("models.list", timeout=max(self.timeout, 30))["models"]

    def show(self, model: str) -> dict[str, Any]:
        return self.request("models.show", {"model": model})

    def load(self, model: str, keep_alive: float | None = None,
             timeout: float = 600) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self.request("models.load", body, timeout=timeout)

    def unload(self, model: str) -> dict[str, Any]:
        return self.request("models.unload", {"model": model}, timeout=60)

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self.request("cancel", {"request_id": request_id})

    def config_get(self, key: str | None = None) -> dict[str, Any]:
        return self.request("config.get", {"key": key} if key else {})

    def embed(self, model: str, texts: list[str], *, normalize: bool = True,
              priority: str | None = None, deadline: float | None = None,
              timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Embed ``texts`` with an ONNX embedding model: ``(float32 array [n, dim], info)``,
        ``info`` being the reply without ``vectors`` (dim, truncated, tokens, stats)."""
        reply = self.request("embed", _embed_body(model, texts, normalize, priority),
                             deadline=deadline, timeout=timeout or max(self.timeout, 120))
        return _embed_result(reply)

    def infer(self, model: str, inputs: dict[str, Any], *, priority: str | None = None,
              deadline: float | None = None, timeout: float | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run an ONNX model on named numpy arrays: ``({output name: array}, stats)``."""
        reply = self.request("infer", _infer_body(model, inputs, priority), deadline=deadline,
                             timeout=timeout or max(self.timeout, 120))
        return _infer_result(reply)

    def stats(self) -> dict[str, Any]:
        """Latency percentiles computed in the daemon (see docs/protocol.md, ``stats``)."""
        return self.request("stats")

    def profiles(self, n: int = 20) -> list[dict[str, Any]]:
        """The latest ``n`` request profiles, oldest first."""
        return self.request("profiles.recent", {"n": n})["profiles"]

    def metrics(self) -> dict[str, Any] | None:
        """The latest system/GPU sample (None before the first)."""
        return self.request("metrics.get")["sample"]

    def queue_list(self, model: str | None = None) -> dict[str, Any]:
        return self.request("queue.list", {"model": model} if model else {})

    def reprioritize(self, request_id: str, priority: str) -> dict[str, Any]:
        return self.request("reprioritize", {"request_id": request_id, "priority": priority})

    def jobs_submit(self, model: str, prompts: list[str], *, idem: str | None = None,
                    **params: Any) -> dict[str, Any]:
        """Store a job; with ``idem`` a retried submit returns the same ``job_id``."""
        body = {"model": model, "prompts": prompts,
                **{k: v for k, v in params.items() if v is not None}}
        return self.request("jobs.submit", body, idem=idem, timeout=max(self.timeout, 30))

    def jobs_get(self, job_id: str) -> dict[str, Any]:
        return self.request("jobs.get", {"job_id": job_id})

    def jobs_list(self, **filters: Any) -> list[dict[str, Any]]:
        body = {k: v for k, v in filters.items() if v is not None}
        return self.request("jobs.list", body)["jobs"]

    def jobs_cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("jobs.cancel", {"job_id": job_id})

    def generate(self, model: str, prompt: str | None = None, *,
                 messages: list[dict[str, str]] | None = None, deadline: float | None = None,
                 **params: Any) -> Stream:
        """Start a generation and return its :class:`Stream` (iterate it for text)."""
        self.wait_welcome()
        body = self._gen_body(model, prompt, messages, params)
        reply = self.request("generate", body, deadline=deadline, timeout=max(self.timeout, 60))
        return Stream(self, reply["request_id"], reply)

    def attach(self, request_id: str) -> Stream:
        """Follow a stream started elsewhere (another client, or before a reconnect)."""
        self.sub.setsockopt(zmq.SUBSCRIBE, f"tokens.{request_id}".encode())
        self.wait_welcome()
        stream = Stream(self, request_id, {"request_id": request_id})
        stream.fetch_missing()
        return stream


class Stream:
    """Iterate for text deltas; ``stats`` holds the final statistics once it ends."""

    def __init__(self, client: Client, request_id: str, reply: dict[str, Any]) -> None:
        self.client = client
        self.request_id = request_id
        self.reply = reply
        self.state = _StreamState(request_id, client.boot_id or "")
        self._last_ping = time.monotonic()
        self._seq_at_ping = -1
        self.fetches = 0  # how often a gap had to be filled from the daemon's buffer
        self.client.last_heartbeat = time.monotonic()

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.state.stats

    @property
    def text(self) -> str:
        return "".join(self.state.text)

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.request_id)

    def fetch_missing(self, timeout: float | None = None) -> list[str]:
        """Ask the daemon for every event from the next expected seq (gap or reattach)."""
        out: list[str] = []
        self.fetches += 1
        reply = self.client.request("stream.fetch", {"request_id": self.request_id,
                                                     "from_seq": self.state.next_seq},
                                    timeout=timeout)
        for e in reply["events"]:
            ev = Event(f"tokens.{self.request_id}", e["type"], e["seq"],
                       self.client.boot_id or "", e["body"])
            for ready in self.state.offer(ev):
                text = self.state.apply(ready)
                if text:
                    out.append(text)
        return out

    def __iter__(self) -> Iterator[str]:
        client = self.client
        queue = client._streams.setdefault(self.request_id, deque())
        try:
            while not self.state.done:
                while queue and not self.state.done:
                    for ev in self.state.offer(queue.popleft()):
                        text = self.state.apply(ev)
                        if text:
                            yield text
                if self.state.done:
                    break
                if self.state.has_gap:
                    yield from self.fetch_missing()
                    continue
                client._check_alive(self.state)
                now = time.monotonic()
                if now - self._last_ping > LEASE_PING_S:  # keeps our lease on the slot
                    self._last_ping = now
                    if self.state.next_seq == self._seq_at_ping:
                        # Nothing for a while: the tail (even 'done') may have been dropped
                        # at our HWM while we were paused, and no later seq shows the gap.
                        yield from self.fetch_missing(timeout=client._lost_after())
                    else:
                        client.try_send("ping")
                    self._seq_at_ping = self.state.next_seq
                client._pump(0.1)
        finally:
            client._streams.pop(self.request_id, None)


class AsyncClient(_Base):
    """asyncio client with the same API as :class:`Client` (methods are coroutines)."""

    def __init__(self, endpoint: str | Endpoints | None = None, *, timeout: float = 10.0,
                 name: str = "inferno-client", curve: CurveKeys | None = None,
                 topics: tuple[str, ...] = ()) -> None:
        super().__init__(endpoint, timeout, name, curve)
        self.ctx = zmq.asyncio.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        try:
            self._setup(self.dealer, self.sub, topics)
        except Exception:
            self.close()
            raise
        self._waiters: dict[str, asyncio.Future] = {}
        self._event_waiters: list[asyncio.Future] = []
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        for s in (self.dealer, self.sub):
            if not s.closed:
                s.close(0)

    @property
    def _reader_task(self) -> asyncio.Task | None:
        return getattr(self, "_reader", None)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        while True:
            self._note_pump()
            socks = dict(await poller.poll(500))
            self._note_pump()
            if self.sub in socks:
                for _ in range(1000):
                    try:
                        frames = await self.sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        ev = _decode_event(frames)
                    except InfernoError:
                        continue
                    if ev is not None:
                        self._on_event(ev)
                self._wake_events()
            if self.dealer in socks:
                try:
                    frames = await self.dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if len(frames) == 3 and frames[0] == codec.MAGIC:
                    try:
                        header = codec.unpackb(frames[1], max_bytes=codec.MAX_HEADER_BYTES)
                    except InfernoError:
                        continue
                    fut = self._waiters.pop(str(header.get("re")), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frames)

    def _wake_events(self) -> None:
        waiters, self._event_waiters = self._event_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def next_event_batch(self, timeout: float) -> None:
        """Wait until new events arrived (or timeout)."""
        self._ensure_reader()
        fut = asyncio.get_running_loop().create_future()
        self._event_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass

    async def send(self, type_: str, body: dict[str, Any] | None = None, *,
                   deadline: float | None = None, idem: str | None = None
                   ) -> tuple[str, asyncio.Future]:
        self._ensure_reader()
        msg_id, frames = self._frames(type_, body, deadline, idem)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        end = time.monotonic() + min(self.timeout, 2.0)
        while True:
            try:
                await self.dealer.send_multipart(frames, zmq.NOBLOCK)
                return msg_id, fut
            except zmq.Again:
                if time.monotonic() > end:
                    self._waiters.pop(msg_id, None)
                    raise DaemonUnavailable(f"cannot connect to {self.endpoints.control}",
                                            "is infernod running?") from None
                await asyncio.sleep(0.02)

    async def try_send(self, type_: str, body: dict[str, Any] | None = None) -> bool:
        _, frames = self._frames(type_, body, None, None)
        try:
            await self.dealer.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    async def request(self, type_: str, body: dict[str, Any] | None = None, *,
                      timeout: float | None = None, deadline: float | None = None,
                      idem: str | None = None) -> dict[str, Any]:
        msg_id, fut = await self.send(type_, body, deadline=deadline, idem=idem)
        limit = timeout if timeout is not None else self.timeout
        try:
            frames = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise DaemonUnavailable(f"no reply to '{type_}' within {limit:.1f}s",
                                    "the daemon may be hung or gone") from None
        finally:
            self._waiters.pop(msg_id, None)
        reply = self._parse_reply(frames, msg_id)
        assert reply is not None
        return reply

    async def wait_welcome(self, timeout: float | None = None) -> dict[str, Any]:
        end = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while not self.welcomed:
            left = end - time.monotonic()
            if left <= 0:
                raise DaemonUnavailable("no welcome from the daemon's event socket")
            await self.next_event_batch(min(left, 0.2))
        return self.welcome or {}

    async def hello(self) -> dict[str, Any]:
        return await self.request("hello", {"client": self.name})

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def status(self) -> dict[str, Any]:
        return await self.request("status")

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("models.list", timeout=max(self.timeout, 30)))["models"]

    async def show(self, model: str) -> dict[str, Any]:
        return await self.request("models.show", {"model": model})

    async def load(self, model: str, keep_alive: float | None = None,
                   timeout: float = 600) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return await self.request("models.load", body, timeout=timeout)

    async def unload(self, model: str) -> dict[str, Any]:
        return await self.request("models.unload", {"model": model}, timeout=60)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self.request("cancel", {"request_id": request_id})

    async def config_get(self, key: str | None = None) -> dict[str, Any]:
        return await self.request("config.get", {"key": key} if key else {})

    async def embed(self, model: str, texts: list[str], *, normalize: bool = True,
                    priority: str | None = None, deadline: float | None = None,
                    timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """As :meth:`Client.embed`."""
        reply = await self.request("embed", _embed_body(model, texts, normalize, priority),
                                   deadline=deadline, timeout=timeout or max(self.timeout, 120))
        return _embed_result(reply)

    async def infer(self, model: str, inputs: dict[str, Any], *, priority: str | None = None,
                    deadline: float | None = None, timeout: float | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """As :meth:`Client.infer`."""
        reply = await self.request("infer", _infer_body(model, inputs, priority),
                                   deadline=deadline, timeout=timeout or max(self.timeout, 120))
        return _infer_result(reply)

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    async def profiles(self, n: int = 20) -> list[dict[str, Any]]:
        return (await self.request("profiles.recent", {"n": n}))["profiles"]

    async def metrics(self) -> dict[str, Any] | None:
        return (await self.request("metrics.get"))["sample"]

    async def generate(self, model: str, prompt: str | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       deadline: float | None = None, **params: Any) -> AsyncStream:
        await self.wait_welcome()
        body = self._gen_body(model, prompt, messages, params)
        reply = await self.request("generate", body, deadline=deadline,
                                   timeout=max(self.timeout, 60))
        return AsyncStream(self, reply["request_id"], reply)

    def check_alive(self) -> None:
        """Raise DaemonUnavailable when heartbeats stopped (for UIs that poll)."""
        self._check_alive()


class AsyncStream:
    def __init__(self, client: AsyncClient, request_id: str, reply: dict[str, Any]) -> None:
        self.client = client
        self.request_id = request_id
        self.reply = reply
        self.state = _StreamState(request_id, client.boot_id or "")
        self._last_ping = time.monotonic()
        self._seq_at_ping = -1
        self.fetches = 0
        client.last_heartbeat = time.monotonic()

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.state.stats

    @property
    def text(self) -> str:
        return "".join(self.state.text)

    async def cancel(self) -> dict[str, Any]:
        return await self.client.cancel(self.request_id)

    async def fetch_missing(self, timeout: float | None = None) -> list[str]:
        out: list[str] = []
        self.fetches += 1
        reply = await self.client.request("stream.fetch", {"request_id": self.request_id,
                                                           "from_seq": self.state.next_seq},
                                          timeout=timeout)
        for e in reply["events"]:
            ev = Event(f"tokens.{self.request_id}", e["type"], e["seq"],
                       self.client.boot_id or "", e["body"])
            for ready in self.state.offer(ev):
                text = self.state.apply(ready)
                if text:
                    out.append(text)
        return out

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        client = self.client
        queue = client._streams.setdefault(self.request_id, deque())
        try:
            while not self.state.done:
                while queue and not self.state.done:
                    for ev in self.state.offer(queue.popleft()):
                        text = self.state.apply(ev)
                        if text:
                            yield text
                if self.state.done:
                    break
                if self.state.has_gap:
                    for text in await self.fetch_missing():
                        yield text
                    continue
                client._check_alive(self.state)
                now = time.monotonic()
                if now - self._last_ping > LEASE_PING_S:
                    self._last_ping = now
                    if self.state.next_seq == self._seq_at_ping:  # see Stream.__iter__
                        for text in await self.fetch_missing(timeout=client._lost_after()):
                            yield text
                    else:
                        await client.try_send("ping")
                    self._seq_at_ping = self.state.next_seq
                await client.next_event_batch(0.1)
        finally:
            client._streams.pop(self.request_id, None)


def to_wire_array(array: Any) -> dict[str, Any]:
    """A numpy array as the wire's ``{dtype, shape, data}`` (C order, little-endian bytes)."""
    import numpy as np

    arr = np.ascontiguousarray(array)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def from_wire_array(obj: dict[str, Any]) -> Any:
    """A wire ``{dtype, shape, data}`` as a (writable) numpy array."""
    import numpy as np

    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()


def _embed_body(model: str, texts: list[str], normalize: bool,
                priority: str | None) -> dict[str, Any]:
    if isinstance(texts, str):
        raise InfernoError("bad_request", "texts must be a list of strings, not one string")
    body: dict[str, Any] = {"model": model, "texts": list(texts), "normalize": normalize}
    if priority is not None:
        body["priority"] = priority
    return body


def _embed_result(reply: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    info = {k: v for k, v in reply.items() if k != "vectors"}
    return from_wire_array(reply["vectors"]), info


def _infer_body(model: str, inputs: dict[str, Any], priority: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model,
                            "inputs": {name: to_wire_array(a) for name, a in inputs.items()}}
    if priority is not None:
        body["priority"] = priority
    return body


def _infer_result(reply: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    outputs = {name: from_wire_array(a) for name, a in reply["outputs"].items()}
    return outputs, reply.get("stats") or {}


def default_client_name() -> str:
    return f"{os.path.basename(os.sys.argv[0]) or 'python'}:{os.getpid()}"

"""The daemon: one asyncio loop that owns the sockets and dispatches requests.

Sockets (both owned by the loop thread):
  control  ROUTER  requests in, replies out (ROUTER_MANDATORY, MAXMSGSIZE)
  events   XPUB    tokens.*, heartbeat, metrics, models, queue, stats, welcome.*

The dispatcher is the only broad ``except`` in the daemon: every handler raises
``InfernoError`` (or a bug), and the client gets ``{code, message, hint}`` either way.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from infernod import __version__
from infernod import config as config_mod
from infernod.config import Config
from infernod.daemon.auth import Security, SecurityError
from infernod.daemon.budget import ByteLedger, Hold
from infernod.daemon.publisher import Publisher
from infernod.daemon.ratelimit import RateLimiter
from infernod.daemon.systemd import Notifier
from infernod.keys import keys_dir
from infernod.paths import Endpoints, runtime_dir, state_dir
from infernod.protocol import codec
from infernod.protocol.errors import InfernoError
from infernod.protocol.messages import (
    PRIORITIES,
    F,
    max_body_bytes,
    validate_body,
    validate_header,
)
from infernod.zmqio import FdWatch, plain_socket

log = logging.getLogger("infernod")

ROLES = {"none": 0, "monitor": 1, "user": 2, "operator": 3}
MAX_IN_FLIGHT = 1024  # handlers running at once; beyond, requests wait in ZeroMQ's queue
EVENTS_BATCH = 512  # subscriptions handled before the loop runs anything else
EVENTS_SLICE_S = 0.002  # ... or this long, whichever comes first
# Messages ZeroMQ queues per connection before it stops reading that peer's socket. It counts
# messages, not bytes, so it is kept small: the loop takes every message out at once and the
# byte limits (budget.py) decide; the queue only fills while MAX_IN_FLIGHT handlers run.
CONTROL_RCVHWM = 256
TRIM_AFTER_FRAMES = 50_000  # after a burst this big has been read, return freed heap to the OS
TRIM_IDLE_FRAMES = 1_000  # ... and after a smaller one once the socket has been idle for 250 ms


@dataclass
class Call:
    """One incoming control message (header, body, the sender's role and principal) while
    its handler runs. Not the work it starts: that has its own record and outlives it."""

    identity: bytes
    header: dict[str, Any]
    body: dict[str, Any]
    role: str
    received: float
    principal: str = ""  # who sent it, as the security layer knows them: uid:N or key:NAME
    # its bytes, charged to the principal until the handler returns; a handler that keeps
    # the request's data longer (a queued generation) takes it over and sets this to None
    hold: Hold | None = None
    connection: str = ""  # the connection's principal (differs with an HTTP user's api_key)

    def acts_for(self, principal: str, connection: str) -> bool:
        """May this request act on work of ``principal`` sent over ``connection``? Its own
        principal's; and, sent without an API key, what its connection sent for HTTP users
        (a gateway follows and cancels the requests it submitted on their behalf)."""
        return principal == self.principal or (
            self.principal == self.connection and connection == self.connection)

    @property
    def session(self) -> str:
        return self.header["session"]

    @property
    def type(self) -> str:
        return self.header["type"]


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Route:
    """One request type as dispatch sees it (built from ``daemon/handlers/table.py``)."""

    role: str  # the minimum role (ROLES)
    schema: dict[str, F]  # the body's fields (protocol.messages.SCHEMAS[type])
    handler: Handler


# sysexits.h EX_SOFTWARE: a background task died. Any non-zero status makes systemd's
# Restart=on-failure start the daemon again (StartLimitBurst bounds the loop).
EXIT_TASK_DIED = 70


class LockError(Exception):
    pass


class SingleInstanceLock:
    """flock on <runtime dir>/infernod.lock: a second daemon must not steal the endpoint.

    Binding an ipc:// path unlinks whatever socket file was there, silently cutting off
    the running daemon's clients; the lock is taken *before* binding.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LockError(
                f"another infernod (pid {holder}) already serves {self.path.parent}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def shared_with_group(group: str) -> bool:
    """Sockets are group-accessible with a configured group, or under systemd, where
    RuntimeDirectory= already belongs to the service's group."""
    return bool(group) or bool(os.environ.get("RUNTIME_DIRECTORY"))


def prepare_runtime_dir(path: Path, group: str) -> None:
    """0700 for a user daemon; 0750 (owner + group) for a shared service.

    With a configured group the directory is also setgid (2750), so the socket files
    created in it belong to that group too; otherwise they would carry the daemon's own
    group and the group's members could not connect."""
    path.mkdir(parents=True, exist_ok=True)
    owner = path.stat().st_uid
    if owner != os.geteuid():  # e.g. /tmp/inferno-$UID made first by another local user
        raise SecurityError(f"runtime directory {path} belongs to uid {owner}, not to the "
                            f"daemon's uid {os.geteuid()}: another user could replace its "
                            "sockets", "remove it, or set XDG_RUNTIME_DIR or "
                            "daemon.runtime_dir to a private directory")
    if group:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o2750)
        return
    os.chmod(path, 0o750 if shared_with_group(group) else 0o700)


class Daemon:
    def __init__(self, cfg: Config, *, endpoints: Endpoints | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.boot_id = uuid.uuid4().hex
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.runtime_dir = runtime_dir(cfg.daemon.runtime_dir)
        self.state_dir = state_dir(cfg.daemon.state_dir)
        self.endpoints = endpoints or Endpoints.in_dir(self.runtime_dir)
        self.notifier = notifier or Notifier()
        # request type -> role, schema, handler: set by the subclass before serving
        self.routes: dict[str, Route] = {}
        self._schemas: dict[str, dict[str, F]] = {}
        self.stopping = asyncio.Event()
        self.failure: str | None = None  # set when a background task died: exit non-zero
        self.loop_lag_ms = 0.0
        self.requests_served = 0
        self.errors_logged = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._lock = SingleInstanceLock(self.runtime_dir / "infernod.lock")
        self.ctx: zmq.asyncio.Context | None = None
        self.security = Security(lambda: self.cfg.security, keys_dir(self.state_dir),
                                 self._log_error)
        self.limiter = RateLimiter(lambda: self.cfg.security)
        self.ledger = ByteLedger(lambda: (self.cfg.daemon.max_held_bytes_per_principal,
                                          self.cfg.daemon.max_held_bytes_total))

    # -- request table ----------------------------------------------------------------------
    def serve_routes(self, routes: dict[str, Route]) -> None:
        """The requests this daemon answers (``infernod.daemon.handlers.table``)."""
        self.routes = dict(routes)
        self._schemas = {type_: r.schema for type_, r in routes.items()}

    # -- sockets ----------------------------------------------------------------------------
    def bind(self) -> None:
        prepare_runtime_dir(self.runtime_dir, self.cfg.daemon.socket_group)
        self._lock.acquire()
        self.ctx = zmq.asyncio.Context()
        self.security.start_zap(self.ctx)  # before any bind: no handshake skips ZAP
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.MAXMSGSIZE, self.cfg.daemon.max_message_bytes)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.SNDHWM, 10000)
        self.control.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
        # Plain, not asyncio: every token is published on it (infernod.zmqio).
        self.events = plain_socket(self.ctx, zmq.XPUB)
        # Every (un)subscription comes to us and none applies until we say so (_events_loop):
        # a principal's streams are its own (publisher.Publisher.decide).
        self.events.setsockopt(zmq.XPUB_MANUAL, 1)
        self.events.setsockopt(zmq.LINGER, 0)
        # Per subscriber: a paused one loses events past this (and re-fetches token gaps).
        self.events.setsockopt(zmq.SNDHWM, self.cfg.daemon.subscriber_hwm)
        if self.cfg.daemon.subscriber_sndbuf_bytes:
            self.events.setsockopt(zmq.SNDBUF, self.cfg.daemon.subscriber_sndbuf_bytes)
        self.events.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscriptions only
        # Subscriptions queued per subscriber inside libzmq: a flood waits in its sender's
        # socket, not in our memory (libzmq moves what a pipe holds to XPUB's own list).
        self.events.setsockopt(zmq.RCVHWM, 100)
        old = os.umask(0o007 if shared_with_group(self.cfg.daemon.socket_group) else 0o077)
        try:
            for sock in (self.control, self.events):
                self.security.protect_ipc(sock)
            self.control.bind(self.endpoints.control)
            self.events.bind(self.endpoints.events)
        finally:
            os.umask(old)
        if self.cfg.security.tcp_endpoint:  # CURVE or nothing (SecurityError: no start)
            self.tcp_endpoints = self.security.bind_tcp(self.control, self.events,
                                                        self.cfg.security.tcp_endpoint)
        self.publisher = Publisher(self.events, self.boot_id,
                                   stream_limit=self.cfg.daemon.stream_buffer_tokens,
                                   stream_retention_s=self.cfg.daemon.stream_retention_s)

    async def _control_loop(self) -> None:
        """Receive, admit (decode, validate, rate-limit, authorise) inline, run handlers as
        tasks. Bad input is answered without a task; at most MAX_IN_FLIGHT handlers run at
        once, and a flood yields to the rest of the loop every few messages."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            try:
                frames = await self.control.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    return
                self._log_error("recv failed: %s", e)
                continue
            n += 1
            if n % 64 == 0:
                await asyncio.sleep(0)  # a burst must not starve heartbeats and replies
            identity = frames[0].bytes
            header: dict[str, Any] = {}
            try:
                req, handler = self._admit(frames, header)
            except InfernoError as e:
                self.requests_served += 1
                await self._reply(identity, header, "error", e.to_wire())
                continue
            await slots.acquire()
            # Handlers run as tasks so a slow one (a model load) never blocks the others.
            task = loop.create_task(self._run(req, handler))
            task.add_done_callback(functools.partial(_finished, slots))

    def _admit(self, frames: list[zmq.Frame], header: dict[str, Any]) -> tuple[Call, Handler]:
        """Everything that can refuse a request before its handler runs. Fills ``header``
        as soon as it parses, so an error reply can still name the request id."""
        identity = frames[0].bytes
        received = time.monotonic()
        role = self.role_of(frames[-1]) if len(frames) > 1 else "none"
        principal = self.security.principal_of(frames[-1]) if len(frames) > 1 else ""
        key = principal or identity.hex()
        # Charged before parsing: a flood of garbage uses up its sender's allowance too.
        peer_wait = self.limiter.peer(key, received)
        bufs = [f.buffer for f in frames[1:]]  # decoded in place, never copied
        if len(bufs) == 4 and len(bufs[0]) == 0:  # an empty delimiter frame (REQ-style):
            _name_request(bufs[2], header)  # the refusal names the request it refuses
        codec.check_frames(bufs)
        header.update(codec.unpackb(bufs[1], max_bytes=codec.MAX_HEADER_BYTES, what="header"))
        validate_header(header)  # (at most 4 KiB) so that even a refusal names its request
        connection = principal
        if "api_key" in header:  # an HTTP user's key: the request is theirs, with their role
            principal, role = self.security.authenticate(header.pop("api_key"), principal, role)
            key = principal or key
        # A session's bucket belongs to its principal: anyone can write a session id (they
        # are public, queue.list), so charging the bare id would let one user spend another's.
        wait = max(peer_wait, self.limiter.session(f"{key}|{header['session']}", received))
        if wait:
            raise self.rate_limited(wait)
        # Its bytes are charged (budget.py) before the body is decoded: over the limit, it
        # is refused and its frames are freed at once.
        hold = self.ledger.charge(key, sum(len(f) for f in frames[1:]))
        try:
            type_ = header["type"]
            route = self._lookup(type_)
            need = route.role
            if ROLES[role] < ROLES[need]:  # before the body: a refused body is never decoded
                raise InfernoError("forbidden", f"'{type_}' needs the {need} role; "
                                                f"you are {role}", "ask an operator")
            limit = self.cfg.daemon.max_message_bytes
            limit = min(limit, max_body_bytes(type_, self._schemas) or limit)
            if len(bufs[2]) > limit:
                raise InfernoError("too_large", f"a '{type_}' body is {len(bufs[2])} bytes; "
                                                f"no valid one is over {limit}",
                                   "see docs/protocol.md for the request's fields and limits",
                                   limit_bytes=limit)
            body = codec.unpackb(bufs[2], max_bytes=limit, what="body")
            validate_body(type_, body, self._schemas)
            if isinstance(body.get("priority"), str):
                self._check_priority(role, body["priority"])
        except BaseException:
            hold.release()
            raise
        return (Call(identity, header, body, role, received, principal, hold, connection),
                route.handler)

    def _check_priority(self, role: str, priority: str) -> None:
        """``security.max_priority``: the highest class each role may ask for."""
        top = self.cfg.security.max_priority.get(role, "normal")
        if PRIORITIES.index(priority) < PRIORITIES.index(top):
            allowed = ", ".join(PRIORITIES[PRIORITIES.index(top):])
            raise InfernoError("forbidden", f"the {role} role may not ask for priority "
                                            f"{priority!r} (allowed: {allowed})",
                               f"use priority {top!r} or lower, or ask an operator to raise "
                               f"security.max_priority for {role}")

    async def _run(self, req: Call, handler: Handler) -> None:
        try:
            self.on_request(req)
            result = await handler(req)
            await self._reply(req.identity, req.header, "reply", result)
        except InfernoError as e:
            if e.code == "internal":
                self._log_error("request %s failed: %s", req.header.get("id"), e)
            await self._reply(req.identity, req.header, "error", e.to_wire())
        except Exception as e:  # the one broad except: a bug must not kill the daemon
            log.exception("handler for %s crashed", req.type)
            err = InfernoError("internal", f"{type(e).__name__}: {e}")
            await self._reply(req.identity, req.header, "error", err.to_wire())
        finally:
            if req.hold is not None:  # not taken over by the handler
                req.hold.release()
                req.hold = None
        self.requests_served += 1

    def on_request(self, req: Call) -> None:
        """Hook for per-request bookkeeping (client liveness)."""

    def role_of(self, frame: zmq.Frame) -> str:
        return self.security.role_of(frame)

    def rate_limited(self, wait_s: float) -> InfernoError:
        ms = int(wait_s * 1000) + 1
        return InfernoError("rate_limited", f"too many requests; retry in {ms} ms",
                            retry_after_ms=ms)

    def _lookup(self, type_: str) -> Route:
        route = self.routes.get(type_)
        if route is None:
            raise InfernoError("unknown_type", f"unknown request type {type_!r}",
                               f"supported: {', '.join(sorted(self.routes))}")
        return route

    async def _reply(self, identity: bytes, req_header: dict[str, Any], kind: str,
                     body: dict[str, Any]) -> None:
        header = {"re": req_header.get("id") if isinstance(req_header, dict) else None,
                  "type": kind, "ts": time.time(), "boot_id": self.boot_id}
        try:
            await self.control.send_multipart([identity, codec.MAGIC, codec.packb(header),
                                               codec.packb(body)])
        except zmq.ZMQError as e:  # EHOSTUNREACH: the client left before its answer
            log.debug("reply to vanished peer dropped: %s", e)

    def _log_error(self, fmt: str, *args: Any) -> None:
        """Rate-limited error logging: a flood of bad input must not fill the journal."""
        self.errors_logged += 1
        if self.errors_logged <= 20 or self.errors_logged % 1000 == 0:
            suffix = f" ({self.errors_logged} errors so far)" if self.errors_logged > 20 else ""
            log.warning(fmt + suffix, *args)

    async def _events_loop(self) -> None:
        """(Un)subscriptions from subscribers (XPUB_MANUAL): each is decided by the publisher
        and applied with setsockopt to the pipe it came from, which libzmq remembers only
        until the next receive: so receive, decide and apply happen with no await between.

        A flood must not starve the loop: messages are taken without waiting (the socket is
        a plain one, watched by an infernod.zmqio.FdWatch), at most EVENTS_BATCH or
        EVENTS_SLICE_S at a time, then the loop runs everything else before the next batch.
        Waiting welcomes go out after each batch, as their principals' rate allows."""
        sock = self.events
        since_trim = 0
        publisher = self.publisher
        security = self.security
        principal_of = security.principal_of
        # Each publish may take in the descriptor's edge (infernod.zmqio): it kicks the watch.
        watch = FdWatch(sock)
        publisher.after_send = watch.kick
        try:
            while True:
                ready = await watch.wait(0.25)
                if not ready and since_trim > TRIM_IDLE_FRAMES:
                    # Quiet for 250 ms after a smaller burst, or after a flooder left (libzmq
                    # frees its pipe and sends us its unsubscribes): hand the pieces back too.
                    since_trim = 0
                    asyncio.get_running_loop().run_in_executor(None, _trim_heap)
                    continue
                start = time.monotonic()
                drained = False
                for _ in range(EVENTS_BATCH):
                    try:
                        frame = sock.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        drained = True
                        if since_trim > TRIM_AFTER_FRAMES:
                            # libzmq took the burst in ahead of us (XPUB keeps what it has read
                            # in its own list) and freed it in small pieces: give them back.
                            since_trim = 0
                            asyncio.get_running_loop().run_in_executor(None, _trim_heap)
                        break
                    except zmq.ZMQError as e:
                        if e.errno == zmq.ETERM:
                            return
                        break
                    since_trim += 1
                    data = frame.bytes
                    now = time.monotonic()
                    principal = principal_of(frame)
                    if publisher.decide(data, principal, now,
                                        functools.partial(security.role_of_principal, principal,
                                                          frame)):
                        option = zmq.SUBSCRIBE if data[0] == 1 else zmq.UNSUBSCRIBE
                        sock.setsockopt(option, data[1:])
                    if now - start > EVENTS_SLICE_S:
                        break
                if not drained:
                    watch.kick()  # the rest of the burst, after the loop's other work
                if publisher.welcomes_waiting():
                    publisher.flush_welcomes(time.monotonic())
                await asyncio.sleep(0)  # a burst must not starve heartbeats and replies
        finally:
            publisher.after_send = None
            watch.close()

    async def _heartbeat_loop(self) -> None:
        interval = self.cfg.daemon.heartbeat_interval_s
        watchdog_usec = self.notifier.watchdog_usec()
        loop = asyncio.get_running_loop()
        expected = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, expected - loop.time()))
            now = loop.time()
            self.loop_lag_ms = max(0.0, (now - expected) * 1000)
            expected = max(expected + interval, now)
            self.publisher.publish("heartbeat", "heartbeat", self.heartbeat_body())
            # Watchdog only while the loop really runs on time: a wedged loop stops pinging.
            if watchdog_usec and self.loop_lag_ms < watchdog_usec / 2000:
                self.notifier.watchdog()

    def heartbeat_body(self) -> dict[str, Any]:
        return {"uptime_s": round(time.monotonic() - self.started, 3),
                "loop_lag_ms": round(self.loop_lag_ms, 3),
                "interval_s": self.cfg.daemon.heartbeat_interval_s}

    # -- lifecycle --------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(self._task_died)
        self._tasks.append(task)
        return task

    def _task_died(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The daemon cannot serve without its loops: stop, and exit non-zero so that the
            # service manager (Restart=on-failure) starts a fresh one.
            log.critical("background task %s died: %r; stopping, exit status %d",
                         task.get_name(), exc, EXIT_TASK_DIED, exc_info=exc)
            if self.failure is None:
                self.failure = f"background task {task.get_name()} died: {exc!r}"
            self.stopping.set()

    async def start(self) -> None:
        """Bind, start the background tasks. Subclasses extend."""
        self.bind()
        self.spawn(self.security.serve(), "zap")
        self.spawn(self._control_loop(), "control")
        self.spawn(self._events_loop(), "events")
        self.spawn(self._heartbeat_loop(), "heartbeat")

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ctx is not None:
            self.control.close(0)
            self.events.close(0)
            self.security.close()
            self.ctx.term()
        self._lock.release()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        self.notifier.ready(f"serving on {self.endpoints.control}")
        log.info("infernod %s ready on %s (boot %s)", __version__, self.endpoints.control,
                 self.boot_id[:8])
        await self.stopping.wait()
        self.notifier.stopping(self.failure or "draining")
        await self.drain()
        await self.shutdown()
        if self.failure is not None:
            log.critical("infernod stopped after a fault (%s): exit status %d",
                         self.failure, EXIT_TASK_DIED)
            return EXIT_TASK_DIED
        log.info("infernod stopped")
        return 0

    async def drain(self) -> None:
        """Subclasses finish or abort running work here."""

    def reload(self) -> None:
        self.security.allow.invalidate()  # the CURVE allow-list is re-read too
        try:
            new = config_mod.load(self.cfg.source if self.cfg.source.endswith(".toml")
                                  else None)
        except config_mod.ConfigError as e:
            log.error("SIGHUP: config not reloaded, %s", e)
            return
        self.cfg, applied, restart = config_mod.reload_diff(self.cfg, new)
        self.apply_config(self.cfg)
        log.info("SIGHUP: applied %s; needs restart: %s", ", ".join(applied) or "nothing",
                 ", ".join(restart) or "nothing")
        self.publisher.publish("models", "config_reloaded",
                               {"applied": applied, "restart_required": restart})


    def apply_config(self, cfg: Config) -> None:
        """Hand a reloaded config to the parts that keep a reference; subclasses extend."""


def _trim_heap() -> None:
    """glibc's malloc_trim(0): freed small blocks go back to the OS (no-op elsewhere). It
    walks the whole heap, so it runs in a worker thread (ctypes drops the GIL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _name_request(buf: Any, header: dict[str, Any]) -> None:
    """Best effort: copy a well-formed message id from an unchecked header into ``header``."""
    try:
        parsed = codec.unpackb(buf, max_bytes=codec.MAX_HEADER_BYTES, what="header")
    except InfernoError:
        return
    msg_id = parsed.get("id") if isinstance(parsed, dict) else None
    if isinstance(msg_id, str) and 0 < len(msg_id) <= 64:
        header["id"] = msg_id


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("request task failed: %r", task.exception())


def _finished(slots: asyncio.Semaphore, task: asyncio.Task[Any]) -> None:
    """A request's task ended: free its slot and log what it raised."""
    slots.release()
    _consume(task)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(levelname)s %(name)s: %(message)s")

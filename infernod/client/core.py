"""The client's protocol logic, without I/O: what :class:`~infernod.client.Client` and
:class:`~infernod.client.AsyncClient` decide, apart from how they wait.

:class:`ClientCore` builds request frames and matches replies, follows the events socket
(welcome, heartbeats, restarts, gaps in a topic's ``seq``), keeps the token events of the
streams the client started or attached to and drops every other ``tokens.*`` event, and
judges the daemon's liveness from heartbeats and replies. It owns no socket and never blocks:
a driver feeds it what arrived and asks it what to do, so it is tested without a daemon.
Ordering and gap filling inside one token stream are :mod:`infernod.client.stream`'s.

Scripts use :mod:`infernod.client`; this module is for drivers and tests.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from infernod.protocol import codec
from infernod.protocol.errors import DaemonUnavailable, InfernoError

HEARTBEAT_MISSES = 3
# A gap this long between two listens (or a wait that overran by this much) means *we* stood
# still: SIGSTOP, a suspended laptop, a blocked event loop, a debugger. That time is not the
# daemon's silence, and not part of a request's timeout.
STOOD_STILL_S = 0.5
INBOX_LIMIT = 100_000  # events kept for events(); the oldest go first

# The HTTP user's API key that requests sent from this context carry (header ``api_key``).
_API_KEY: ContextVar[str | None] = ContextVar("inferno_api_key", default=None)


@contextmanager
def api_key(key: str | None) -> Iterator[None]:
    """Requests sent inside the block (this thread or asyncio task, and tasks it starts)
    carry ``key``: the daemon runs them as that key's principal and role. ``""`` says "an
    HTTP caller without a key" (refused once the daemon has API keys); None sends none.
    For a gateway: one shared client, each HTTP request in its own ``with api_key(...)``."""
    token = _API_KEY.set(key)
    try:
        yield
    finally:
        _API_KEY.reset(token)


@dataclass
class Event:
    """One published event: topic, type, per-topic seq, the daemon's boot id, and its body."""

    topic: str
    type: str
    seq: int
    boot_id: str
    body: dict[str, Any]
    ts: float = 0.0


@dataclass(frozen=True)
class Notice:
    """Said by the library, not the daemon, among the events of ``events()``.

    ``kind`` is ``events_lost`` (``lost`` events of ``topic`` were dropped before they
    reached us: a slow subscriber's high-water mark; for state topics the next event carries
    the whole state again) or ``daemon_restarted`` (a new ``boot_id``: the old daemon's
    streams and requests are gone, every topic's seq starts again at 0).
    """

    kind: str
    topic: str
    message: str
    lost: int = 0
    boot_id: str = ""


def decode_event(frames: list[bytes]) -> Event | None:
    """An event from its four frames, or None for anything else."""
    if len(frames) != 4 or frames[1] != codec.MAGIC:
        return None
    header = codec.unpackb(frames[2], max_bytes=codec.MAX_HEADER_BYTES * 4, what="header")
    body = codec.unpackb(frames[3], max_bytes=64 * 1024 * 1024)
    return Event(str(header.get("topic", "")), str(header.get("type", "")),
                 int(header.get("seq", 0)), str(header.get("boot_id", "")), body,
                 float(header.get("ts", 0.0)))


@dataclass
class Wait:
    """One wait for the daemon (a reply, the welcome): what it is for, when it began, how
    long we had stood still by then and which daemon (boot id) we were talking to."""

    what: str
    started: float
    stood_still_s: float
    boot_id: str | None


class ClientCore:
    """Everything a client decides; the sync and asyncio drivers only move bytes and wait.

    ``clock`` is the monotonic clock (tests pass a fake one).
    """

    def __init__(self, session: str | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.session = session or secrets.token_hex(8)
        self.clock: Callable[[], float] = clock or (lambda: time.monotonic())
        self.boot_id: str | None = None
        self.heartbeat_interval_s = 1.0
        self.last_heartbeat = self.clock()
        self.welcomed = False
        self.welcome: dict[str, Any] | None = None
        self.restarted = False
        self.watch_tokens = False  # subscribed to tokens.* on purpose (inferno watch)
        self.stood_still_s = 0.0  # total time we were not listening (see listened)
        self._last_listen = self.clock()
        self._inbox: deque[Event | Notice] = deque(maxlen=INBOX_LIMIT)
        # Token events of the streams this client started or attached to, by request id;
        # any other tokens.* event is dropped (see on_event).
        self._streams: dict[str, deque[Event]] = {}
        self._next_seq: dict[str, int] = {}  # per non-stream topic, for gap notices

    # -- requests and replies -----------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        """A message id no one else can guess: a generation's request id is
        ``<session>.<message id>``, the session id is public (``queue.list``), and a
        guessable id would let another user start a stream under the id of our next one."""
        return secrets.token_hex(8)

    def request_frames(self, type_: str, body: dict[str, Any] | None, *,
                       deadline: float | None = None, idem: str | None = None,
                       msg_id: str | None = None) -> tuple[str, list[bytes]]:
        """The message id and the three frames of a request."""
        msg_id = msg_id or self.new_id()
        header: dict[str, Any] = {"id": msg_id, "type": type_, "session": self.session,
                                  "ts": time.time()}
        if deadline is not None:
            header["deadline"] = deadline
        if idem is not None:
            header["idem"] = idem
        key = _API_KEY.get()
        if key is not None:
            header["api_key"] = key
        return msg_id, codec.encode_request(header, body or {})

    def saw_life(self) -> None:
        """A reply (to any request, e.g. a stream's lease ping) arrived: as fresh a sign of
        life as a heartbeat, and it still comes when a slow subscriber's heartbeats were
        dropped at its queue limit with its events."""
        self.last_heartbeat = self.clock()

    def parse_reply(self, frames: list[bytes], msg_id: str) -> dict[str, Any] | None:
        """The body of the reply to ``msg_id``; None for anything else (a late reply to an
        earlier, timed-out request); raises :class:`InfernoError` for an error reply."""
        if len(frames) != 3 or frames[0] != codec.MAGIC:
            return None
        header = codec.unpackb(frames[1], max_bytes=codec.MAX_HEADER_BYTES, what="header")
        if header.get("re") != msg_id:
            return None
        body = codec.unpackb(frames[2], max_bytes=256 * 1024 * 1024)
        self.see_boot(str(header.get("boot_id", "")))
        self.saw_life()
        if header.get("type") == "error":
            raise InfernoError.from_wire(body)
        return body

    @staticmethod
    def reply_to(frames: list[bytes]) -> str | None:
        """The ``re`` of a reply's frames (None when they are not a reply)."""
        if len(frames) != 3 or frames[0] != codec.MAGIC:
            return None
        try:
            header = codec.unpackb(frames[1], max_bytes=codec.MAX_HEADER_BYTES, what="header")
        except InfernoError:
            return None
        re_ = header.get("re")
        return re_ if isinstance(re_, str) else None

    # -- events ---------------------------------------------------------------------------
    def see_boot(self, boot_id: str) -> None:
        """Note the daemon's boot id; a new one means it restarted."""
        if not boot_id:
            return
        if self.boot_id is not None and boot_id != self.boot_id:
            self.restarted = True
            self._next_seq.clear()  # a new daemon counts every topic from 0 again
            self._inbox.append(Notice("daemon_restarted", "", f"the daemon restarted "
                                      f"(boot id {self.boot_id} -> {boot_id}); its streams "
                                      "and requests are gone", boot_id=boot_id))
        self.boot_id = boot_id

    def on_event(self, ev: Event) -> None:
        """Take one event from the events socket."""
        if ev.topic == "heartbeat" or ev.type == "welcome":
            # Heartbeats and replies count, not events: queued token events still arrive
            # from a dead daemon.
            self.last_heartbeat = self.clock()
        if ev.type == "welcome":
            self._on_welcome(ev)
            return
        self.see_boot(ev.boot_id)
        if ev.topic == "heartbeat":
            self.heartbeat_interval_s = float(ev.body.get("interval_s", 1.0))
        if ev.topic.startswith("tokens."):
            # Only streams we started or attached to. Anyone can start a stream under our
            # (public) session id, tokens.<our session>.<their id>, and it reaches our
            # subscription: kept for later, it would become the text of our next generate.
            queue = self._streams.get(ev.topic[len("tokens."):])
            if queue is not None:
                queue.append(ev)
            elif self.watch_tokens:
                self._inbox.append(ev)
            return
        expected = self._next_seq.get(ev.topic)
        if expected is not None and ev.seq > expected:
            lost = ev.seq - expected
            self._inbox.append(Notice("events_lost", ev.topic,
                                      f"{lost} event(s) of {ev.topic} were dropped before "
                                      f"they reached this client", lost=lost))
        self._next_seq[ev.topic] = max(ev.seq + 1, expected or 0)
        self._inbox.append(ev)

    def _on_welcome(self, ev: Event) -> None:
        self.welcomed = True
        self.welcome = ev.body
        self.see_boot(ev.boot_id)
        # The welcome's seqs are the next seq of each topic: gaps are counted from there (an
        # event that came before it, with a lower seq, is older than its state, not a gap).
        seqs = ev.body.get("seqs") if isinstance(ev.body, dict) else None
        if isinstance(seqs, dict):
            for topic, seq in seqs.items():
                if isinstance(topic, str) and isinstance(seq, int) and \
                        not topic.startswith("tokens."):
                    self._next_seq[topic] = seq
        # The welcome carries the last heartbeat: its period, before the next one comes.
        state = ev.body.get("state") if isinstance(ev.body, dict) else None
        beat = state.get("heartbeat") if isinstance(state, dict) else None
        if isinstance(beat, dict) and isinstance(beat.get("body"), dict):
            self.heartbeat_interval_s = float(beat["body"].get("interval_s",
                                                               self.heartbeat_interval_s))

    def take_events(self) -> list[Event | Notice]:
        """The events (and notices) that arrived since the last call, oldest first."""
        out = list(self._inbox)
        self._inbox.clear()
        return out

    @property
    def has_events(self) -> bool:
        return bool(self._inbox)

    # -- streams --------------------------------------------------------------------------
    def expect_stream(self, msg_id: str) -> str:
        """Register the stream a generate with ``msg_id`` starts, before sending it, so its
        first events (they may come before the reply) are kept; return its request id."""
        rid = f"{self.session}.{msg_id}"
        self._streams.setdefault(rid, deque())
        return rid

    def adopt_stream(self, expected: str, reply: dict[str, Any]) -> str:
        """The request id the daemon gave the stream; normally the one expected."""
        rid = str(reply["request_id"])
        if rid != expected:
            self._streams[rid] = self._streams.pop(expected, deque())
        return rid

    def follow(self, request_id: str) -> deque[Event]:
        """Keep the token events of ``request_id`` (attach); return its queue."""
        return self._streams.setdefault(request_id, deque())

    def unfollow(self, request_id: str) -> None:
        """Stop keeping the events of ``request_id``; those not yet read are dropped."""
        self._streams.pop(request_id, None)

    @property
    def followed(self) -> frozenset[str]:
        """The request ids whose token events are kept."""
        return frozenset(self._streams)

    def stream_events(self, request_id: str) -> list[Event]:
        """The kept token events of ``request_id`` not yet read by its stream (a copy)."""
        return list(self._streams.get(request_id, ()))

    # -- liveness -------------------------------------------------------------------------
    def listened(self, waited_s: float = 0.0) -> None:
        """Called before and after each wait for messages (``waited_s``: how long that wait
        was allowed to take). Time beyond it is time *we* stood still, not listening: it
        does not count as the daemon's silence, so the heartbeat clock moves past it. (Only
        moving it, not restarting it: silence before a short pause still counts.)"""
        now = self.clock()
        gap = now - self._last_listen - waited_s
        self._last_listen = now
        if gap > STOOD_STILL_S:
            self.stood_still_s += gap
            self.last_heartbeat = min(now, self.last_heartbeat + gap)

    def lost_after(self) -> float:
        """Seconds of silence after which the daemon counts as lost."""
        return self.heartbeat_interval_s * HEARTBEAT_MISSES

    def check_alive(self, stream_boot_id: str | None = None) -> None:
        """Raise :class:`DaemonUnavailable` when the daemon has been silent for three
        heartbeats, or (``stream_boot_id``: the daemon a stream began on) it restarted."""
        self.listened()  # stopped ourselves since we last listened? that is not the daemon
        silent = self.clock() - self.last_heartbeat
        if silent > self.lost_after():
            raise DaemonUnavailable(f"daemon lost: no heartbeat for {silent:.1f}s",
                                    "is infernod still running?")
        if stream_boot_id and self.boot_id and self.boot_id != stream_boot_id:
            raise DaemonUnavailable("the daemon restarted; the stream was lost",
                                    "submit the request again", reason="daemon_restarted")

    def begin_wait(self, what: str) -> Wait:
        """Begin waiting for the daemon; :meth:`check_wait` then says when to give up."""
        return Wait(what, self.clock(), self.stood_still_s, self.boot_id)

    def check_wait(self, wait: Wait) -> None:
        """Raise DaemonUnavailable once the daemon has been silent for three heartbeats
        while we waited (a request's whole timeout is far too long to notice a dead or
        stopped daemon), or a new daemon (boot id) answers: the old one took our request
        with it. Silence before the wait began is not held against it, so the first request
        after the daemon came back waits for a heartbeat instead of failing at once; time
        we stood still ourselves moves the start, as it moves the last heartbeat
        (see listened)."""
        floor = wait.started + (self.stood_still_s - wait.stood_still_s)
        silent = self.clock() - max(self.last_heartbeat, floor)
        if silent > self.lost_after():
            raise DaemonUnavailable(f"daemon lost while waiting for '{wait.what}': no "
                                    f"heartbeat for {silent:.1f}s",
                                    "is infernod still running? ('inferno status' / "
                                    "'systemctl status infernod')")
        if wait.boot_id and self.boot_id and self.boot_id != wait.boot_id:
            raise DaemonUnavailable(f"the daemon restarted while waiting for '{wait.what}'",
                                    "send the request again", reason="daemon_restarted")

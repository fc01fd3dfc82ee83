"""The XPUB side of the daemon: sequence numbers, last values, welcomes, stream buffers, and
who may subscribe to what.

Owned by the event-loop thread, like the socket it writes to.

* Every event carries ``seq`` (per topic, from 0) and the daemon's ``boot_id``, so a
  subscriber detects gaps and restarts.
* State-like topics (``metrics``, ``models``, ``queue``, ``heartbeat``, ``stats``) keep their
  last value. A subscriber that subscribes to ``welcome.<session>`` receives, on that private
  topic, a ``welcome`` carrying every last value, the current seq of the fixed topics and of
  the subscriber's own live streams (the zguide's Clone pattern without a second socket).
* Token streams (``tokens.<request_id>``) are buffered per request, so a client that missed
  events (slow joiner, paused, reconnected) fetches them with ``stream.fetch``. A stream's
  seq counter and buffer live in its :class:`StreamBuffer` and end with it (after
  ``stream_retention_s``): nothing here grows with the number of finished requests.

Subscriptions (``XPUB_MANUAL``): libzmq hands every subscribe/unsubscribe to the daemon and
applies none itself; :meth:`Publisher.decide` says whether the sender, known by its ZAP
``User-Id``, may have it, and the events loop then applies it to that pipe. The policy
(docs/protocol.md, "Who sees what"):

* anyone with a role: the fixed topics (``heartbeat``, ``metrics``, ``models``, ``queue``,
  ``stats``, ``profiles``, ``jobs``): aggregates and queue rows, never text;
* ``tokens.<scope>...`` and ``welcome.<session>``: only a principal's own. A *scope* is the
  part of a request id up to its first ``.`` (a session: ``<session>.``) or ``:`` (a job:
  ``<job_id>:``). A session belongs to the first principal that claims it, by subscribing
  or by opening a stream in it; a job's scope to the job's owner, claimed when its first
  item starts. A stream never opens in a scope claimed by someone else;
* operators: everything (they also claim their own session when they subscribe to its
  welcome, so no one else can open streams in it first).

Each principal's subscriptions and welcomes are rate-limited (token buckets), welcomes that
exceed the rate wait (a bounded queue per principal, one per topic) instead of being built at
once, and the same welcome topic is answered at most once per ``WELCOME_REPEAT_S``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from infernod.daemon.ratelimit import KeyedBuckets
from infernod.protocol.codec import MAGIC, PROTOCOL_VERSION, packb
from infernod.zmqio import send_frames

log = logging.getLogger("infernod.daemon.publisher")

STATE_TOPICS = ("heartbeat", "metrics", "models", "queue", "stats")
PUBLIC_TOPICS = frozenset({*STATE_TOPICS, "profiles", "jobs"})  # aggregates, no text

# Per principal (uid:N / key:NAME); a client subscribes to about ten topics once.
SUBSCRIBE_PER_S = 1000.0
SUBSCRIBE_BURST = 4000
WELCOME_PER_S = 20.0
WELCOME_BURST = 100
WELCOME_QUEUE = 256  # welcomes waiting for their principal's bucket; beyond, dropped
WELCOME_REPEAT_S = 1.0  # one welcome per topic per this long, however often subscribed
CLAIMS_PER_PRINCIPAL = 4096  # sessions a principal holds; the least recent idle one goes
CLAIM_IDLE_S = 3600.0  # a claimed session without streams or use is released after this
MAX_FINISHED_STREAMS = 20_000  # finished streams kept for stream.fetch, oldest dropped first
_SCOPE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def scope_of(request_id: str) -> str | None:
    """``<session>.`` or ``<job_id>:`` of a request id (or a ``tokens.`` subscription past
    its prefix); None when the text stops before a scope is complete."""
    for i, ch in enumerate(request_id):
        if ch in ".:":
            name = request_id[:i]
            return request_id[:i + 1] if _SCOPE_NAME.match(name) else None
    return None


@dataclass
class StreamBuffer:
    """One token stream: its seq counter and its newest ``limit`` events (older ones are
    dropped first). It ends with the stream, so nothing about it outlives retention."""

    limit: int
    events: deque = field(default_factory=deque)
    dropped_before: int = 0  # seq of the first event still held
    finished_at: float | None = None
    owner: str = ""  # the principal (uid:N / key:NAME) whose request this is
    via: str = ""  # the connection's principal that sent it (a gateway, for an HTTP user)
    next_seq: int = 0

    def add(self, seq: int, header: dict[str, Any], body: dict[str, Any]) -> None:
        self.events.append((seq, header, body))
        while len(self.events) > self.limit:
            self.events.popleft()
            self.dropped_before = self.events[0][0]

    def since(self, from_seq: int, limit: int) -> list[tuple[int, dict, dict]]:
        """Up to ``limit`` events from ``from_seq`` on (seqs are consecutive: an index)."""
        start = max(0, from_seq - self.dropped_before)
        n = len(self.events)
        return [self.events[i] for i in range(start, min(n, start + limit))]


@dataclass
class Claim:
    owner: str
    streams: int = 0  # open or retained streams in this scope
    used: float = 0.0  # monotonic time of the last subscription or stream in it


class Publisher:
    def __init__(self, sock: zmq.Socket[bytes], boot_id: str, *, stream_limit: int = 65536,
                 stream_retention_s: float = 300.0) -> None:
        self.sock = sock  # a plain socket (infernod.zmqio): one send per token
        # Called after each send: the events loop's FdWatch.kick (infernod.zmqio).
        self.after_send: Callable[[], None] | None = None
        self.boot_id = boot_id
        self.stream_limit = stream_limit
        self.stream_retention_s = stream_retention_s
        self._seq: dict[str, int] = {}  # fixed topics only; a stream's seq is in its buffer
        self._last: dict[str, tuple[dict, dict]] = {}
        self.streams: dict[str, StreamBuffer] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # request id -> finished at
        self.claims: dict[str, Claim] = {}
        self._claims_by: dict[str, OrderedDict[str, None]] = {}
        self.subscriptions: dict[bytes, int] = {}  # applied, per topic (as reported)
        self._sub_buckets = KeyedBuckets(10_000)
        self._welcome_buckets = KeyedBuckets(10_000)
        # principal -> welcome topic -> whether that subscriber sees every stream (operator)
        self._welcomes_waiting: OrderedDict[str, OrderedDict[str, bool]] = OrderedDict()
        self._welcomed: OrderedDict[str, float] = OrderedDict()  # topic -> when
        self.sent = 0
        self.refused = 0  # subscriptions not applied (policy) since start
        self.limited = 0  # subscriptions or welcomes over their principal's rate

    # -- publishing -------------------------------------------------------------------------
    def publish(self, topic: str, type_: str, body: dict[str, Any]) -> int:
        stream = None
        if topic.startswith("tokens."):
            stream = self.streams.get(topic[len("tokens."):])
            if stream is None:  # no open stream (expired, never opened): nobody may get it
                log.debug("event %s on %s without a stream dropped", type_, topic)
                return -1
            seq = stream.next_seq
            stream.next_seq = seq + 1
        else:
            seq = self._seq.get(topic, 0)
            self._seq[topic] = seq + 1
        header = {"topic": topic, "type": type_, "seq": seq, "boot_id": self.boot_id,
                  "ts": time.time()}
        if stream is not None:
            stream.add(seq, header, body)
        elif topic in STATE_TOPICS:
            self._last[topic] = (header, body)
        self._send(topic, header, body)
        return seq

    def _send(self, topic: str, header: dict, body: dict) -> None:
        try:
            send_frames(self.sock, (topic.encode(), MAGIC, packb(header), packb(body)))
            self.sent += 1
        except zmq.Again:  # XPUB drops per subscriber at HWM; Again means nobody could take it
            pass
        if self.after_send is not None:
            self.after_send()

    # -- streams ----------------------------------------------------------------------------
    def open_stream(self, request_id: str, owner: str, via: str = "") -> str:
        """Open ``tokens.<request_id>`` for principal ``owner`` sent over a connection of
        ``via`` (default: the owner's own); claims its scope for the connection, which
        subscribes to it (refused with ``forbidden`` when another principal holds it: its
        subscribers would read it)."""
        from infernod.protocol.errors import InfernoError

        via = via or owner
        scope = scope_of(request_id)
        if scope is None or not self.claim(scope, via):
            raise InfernoError("forbidden", f"request id {request_id!r} is in a session that "
                                            "belongs to another user", "use a fresh session")
        old = self.streams.get(request_id)
        if old is not None:
            if old.finished_at is None:
                raise InfernoError("conflict", f"request id {request_id} is already in use",
                                   "use a fresh message id per request")
            self._drop_stream(request_id)  # a finished namesake's buffer goes
            self.claim(scope, via)
        claim = self.claims[scope]
        claim.streams += 1
        self.streams[request_id] = StreamBuffer(limit=self.stream_limit, owner=owner, via=via)
        return f"tokens.{request_id}"

    def close_stream(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and stream.finished_at is None:
            stream.finished_at = time.monotonic()
            self._finished[request_id] = stream.finished_at
            while len(self._finished) > MAX_FINISHED_STREAMS:
                self._drop_stream(next(iter(self._finished)))

    def fetch(self, request_id: str) -> StreamBuffer | None:
        return self.streams.get(request_id)

    def expire_streams(self, now: float) -> int:
        n = 0
        while self._finished:
            rid, finished = next(iter(self._finished.items()))
            if now - finished <= self.stream_retention_s:
                break
            self._drop_stream(rid)
            n += 1
        self._expire_claims(now)
        self._prune(now)
        return n

    def _drop_stream(self, request_id: str) -> None:
        self._finished.pop(request_id, None)
        stream = self.streams.pop(request_id, None)
        scope = scope_of(request_id)
        claim = self.claims.get(scope) if scope else None
        if stream is not None and claim is not None:
            claim.streams -= 1
            claim.used = time.monotonic()
            if claim.streams <= 0 and scope is not None and scope_is_job(scope):
                self._release(scope)  # a job's scope lives as long as its streams

    def live_streams(self, principal: str, everyone: bool) -> dict[str, int]:
        """Next seq of each unfinished stream the principal may see."""
        return {f"tokens.{rid}": s.next_seq for rid, s in self.streams.items()
                if s.finished_at is None and (everyone or principal in (s.owner, s.via))}

    # -- scopes: who owns a session's (or job's) streams ------------------------------------
    def claim(self, scope: str, principal: str, now: float | None = None) -> bool:
        """Hold ``scope`` for ``principal``; False if another principal holds it."""
        now = time.monotonic() if now is None else now
        c = self.claims.get(scope)
        if c is not None:
            if c.owner != principal:
                return False
            c.used = now
            self._claims_by[principal].move_to_end(scope)
            return True
        mine = self._claims_by.setdefault(principal, OrderedDict())
        if len(mine) >= CLAIMS_PER_PRINCIPAL:  # make room: its least recent idle session
            idle = next((s for s in mine if self.claims[s].streams <= 0), None)
            if idle is None:
                return False
            self._release(idle)
        self.claims[scope] = Claim(principal, 0, now)
        mine[scope] = None
        return True

    def touch(self, session: str, principal: str, now: float) -> None:
        """A request in ``session`` from its owner keeps the claim alive."""
        c = self.claims.get(f"{session}.")
        if c is not None and c.owner == principal:
            c.used = now

    def _release(self, scope: str) -> None:
        c = self.claims.pop(scope, None)
        if c is None:
            return
        mine = self._claims_by.get(c.owner)
        if mine is not None:
            mine.pop(scope, None)
            if not mine:
                del self._claims_by[c.owner]

    def _expire_claims(self, now: float) -> None:
        for principal in list(self._claims_by):
            mine = self._claims_by.get(principal)
            while mine:
                scope = next(iter(mine))
                c = self.claims[scope]
                if c.streams > 0 or now - c.used <= CLAIM_IDLE_S:
                    break
                self._release(scope)
                mine = self._claims_by.get(principal)

    # -- subscriptions (XPUB_MANUAL) --------------------------------------------------------
    def decide(self, frame: bytes, principal: str, now: float,
               role_of: Callable[[], str]) -> bool:
        """Whether to apply this (un)subscription to the pipe it came from. Unsubscriptions
        always apply; a subscription if the policy allows it and its principal is within
        its rate (``role_of`` says the sender's role; asked only then). A
        ``welcome.<session>`` subscription also queues that session's welcome."""
        if not frame or frame[0] not in (0, 1):
            return False
        topic_b = bytes(frame[1:])
        if frame[0] == 0:  # only what we applied needs undoing (a refused one was not)
            n = self.subscriptions.get(topic_b, 0) - 1
            if n > 0:
                self.subscriptions[topic_b] = n
            elif self.subscriptions.pop(topic_b, None) is None:
                return False
            return True
        if not principal:
            self.refused += 1
            return False  # no ZAP identity: fail closed
        if self._sub_buckets.take(principal, SUBSCRIBE_PER_S, SUBSCRIBE_BURST, now):
            self.limited += 1
            return False
        role = role_of()
        if role == "none":
            self.refused += 1
            return False
        topic = topic_b.decode(errors="replace")
        if not self._allowed(topic, principal, role == "operator", now):
            self.refused += 1
            return False
        if len(self.subscriptions) >= 65_536 and topic_b not in self.subscriptions:
            self.limited += 1
            return False  # the table stays bounded, and what we apply we can undo
        self.subscriptions[topic_b] = self.subscriptions.get(topic_b, 0) + 1
        if topic.startswith("welcome."):
            self._queue_welcome(topic, principal, role == "operator")
        return True

    def _allowed(self, topic: str, principal: str, operator: bool, now: float) -> bool:
        if operator:
            # An operator may have anything, and still claims its own session: unclaimed,
            # another user could open streams in it first and get the operator's own
            # generate refused as "belongs to another user".
            if topic.startswith("welcome.") and _SCOPE_NAME.match(topic[len("welcome."):]):
                self.claim(f"{topic[len('welcome.'):]}.", principal, now)
            return True
        if topic in PUBLIC_TOPICS:
            return True
        if topic.startswith("welcome."):
            session = topic[len("welcome."):]
            return bool(_SCOPE_NAME.match(session)) and self.claim(f"{session}.", principal, now)
        if topic.startswith("tokens."):
            scope = scope_of(topic[len("tokens."):])
            if scope is None:
                return False  # 'tokens.' or a partial scope would match other people's
            if scope_is_job(scope):
                c = self.claims.get(scope)  # a job's scope is claimed by its first item
                return c is not None and c.owner == principal
            return self.claim(scope, principal, now)
        return False  # '' (everything), partial names, anything unknown

    # -- welcomes ---------------------------------------------------------------------------
    def _queue_welcome(self, topic: str, principal: str, everyone: bool) -> None:
        waiting = self._welcomes_waiting.get(principal)
        if waiting is None:
            waiting = self._welcomes_waiting[principal] = OrderedDict()
        if topic in waiting:
            return  # the same welcome subscribed again before it went out: one answers both
        if len(waiting) >= WELCOME_QUEUE:
            self.limited += 1
            return
        waiting[topic] = everyone

    def flush_welcomes(self, now: float) -> int:
        """Send waiting welcomes their principals' buckets allow; return how many went."""
        sent = 0
        for principal in list(self._welcomes_waiting):
            waiting = self._welcomes_waiting[principal]
            while waiting:
                topic, everyone = next(iter(waiting.items()))
                last = self._welcomed.get(topic)
                if last is not None and now - last < WELCOME_REPEAT_S:
                    break  # answered a moment ago: this one waits its turn
                if self._welcome_buckets.take(principal, WELCOME_PER_S, WELCOME_BURST, now):
                    break
                del waiting[topic]
                self._welcomed[topic] = now
                self._welcomed.move_to_end(topic)
                self.send_welcome(topic, principal, everyone)
                sent += 1
            if not waiting:
                del self._welcomes_waiting[principal]
        return sent

    def welcomes_waiting(self) -> int:
        return sum(len(w) for w in self._welcomes_waiting.values())

    def send_welcome(self, topic: str, principal: str = "", everyone: bool = True) -> None:
        body = {
            "boot_id": self.boot_id,
            "protocol": PROTOCOL_VERSION,
            "seqs": {**self._seq, **self.live_streams(principal, everyone)},
            "state": {t: {"header": h, "body": b} for t, (h, b) in self._last.items()},
        }
        header = {"topic": topic, "type": "welcome", "seq": 0, "boot_id": self.boot_id,
                  "ts": time.time()}
        self._send(topic, header, body)

    def _prune(self, now: float) -> None:
        while self._welcomed:
            topic, when = next(iter(self._welcomed.items()))
            if now - when < WELCOME_REPEAT_S:
                break
            del self._welcomed[topic]
        self._sub_buckets.prune(now)
        self._welcome_buckets.prune(now)

    def last(self, topic: str) -> dict[str, Any] | None:
        entry = self._last.get(topic)
        return entry[1] if entry else None


def scope_is_job(scope: str) -> bool:
    return scope.endswith(":")

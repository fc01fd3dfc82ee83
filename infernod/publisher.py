"""The XPUB side of the daemon: sequence numbers, last values, welcomes, stream buffers.

Owned by the event-loop thread, like the socket it writes to.

* Every event carries ``seq`` (per topic, from 0) and the daemon's ``boot_id``, so a
  subscriber detects gaps and restarts.
* State-like topics (``metrics``, ``models``, ``queue``, ``heartbeat``, ``stats``) keep their
  last value. A subscriber that subscribes to ``welcome.<session>`` receives, on that private
  topic, a ``welcome`` carrying every last value and every topic's current seq (the zguide's
  Clone pattern without a second socket: XPUB_VERBOSE shows us each subscription).
* Token streams (``tokens.<request_id>``) are buffered per request, so a client that missed
  events (slow joiner, paused, reconnected) fetches them with ``stream.fetch``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from infernod.protocol.codec import MAGIC, PROTOCOL_VERSION, packb

log = logging.getLogger("infernod.publisher")

STATE_TOPICS = ("heartbeat", "metrics", "models", "queue", "stats")


@dataclass
class StreamBuffer:
    """The newest ``limit`` events of one token stream (older ones are dropped first)."""

    limit: int
    events: deque = field(default_factory=deque)
    dropped_before: int = 0  # seq of the first event still held
    finished_at: float | None = None
    owner: str = ""

    def add(self, seq: int, header: dict[str, Any], body: dict[str, Any]) -> None:
        self.events.append((seq, header, body))
        while len(self.events) > self.limit:
            self.events.popleft()
            self.dropped_before = self.events[0][0]


class Publisher:
    def __init__(self, sock: zmq.Socket, boot_id: str, *, stream_limit: int = 65536,
                 stream_retention_s: float = 300.0) -> None:
        self.sock = sock
        self.boot_id = boot_id
        self.stream_limit = stream_limit
        self.stream_retention_s = stream_retention_s
        self._seq: dict[str, int] = {}
        self._last: dict[str, tuple[dict, dict]] = {}
        self.streams: dict[str, StreamBuffer] = {}
        self.subscriptions: dict[bytes, int] = {}
        self.sent = 0

    # -- publishing -------------------------------------------------------------------------
    def publish(self, topic: str, type_: str, body: dict[str, Any]) -> int:
        seq = self._seq.get(topic, 0)
        self._seq[topic] = seq + 1
        header = {"topic": topic, "type": type_, "seq": seq, "boot_id": self.boot_id,
                  "ts": time.time()}
        if topic in STATE_TOPICS:
            self._last[topic] = (header, body)
        elif topic.startswith("tokens."):
            stream = self.streams.get(topic[len("tokens."):])
            if stream is not None:
                stream.add(seq, header, body)
        self._send(topic, header, body)
        return seq

    def _send(self, topic: str, header: dict, body: dict) -> None:
        try:
            self.sock.send_multipart([topic.encode(), MAGIC, packb(header), packb(body)],
                                     flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:  # XPUB drops per subscriber at HWM; Again means nobody could take it
            pass

    # -- streams ----------------------------------------------------------------------------
    def open_stream(self, request_id: str, owner: str) -> str:
        self.streams[request_id] = StreamBuffer(limit=self.stream_limit, owner=owner)
        return f"tokens.{request_id}"

    def close_stream(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and stream.finished_at is None:
            stream.finished_at = time.monotonic()

    def fetch(self, request_id: str, from_seq: int) -> StreamBuffer | None:
        return self.streams.get(request_id)

    def expire_streams(self, now: float) -> int:
        old = [rid for rid, s in self.streams.items()
               if s.finished_at is not None and now - s.finished_at > self.stream_retention_s]
        for rid in old:
            del self.streams[rid]
        return len(old)

    # -- subscriptions (XPUB_VERBOSE) -------------------------------------------------------
    def on_subscription(self, frame: bytes) -> None:
        if not frame:
            return
        subscribe, topic = frame[0] == 1, bytes(frame[1:])
        if subscribe:
            self.subscriptions[topic] = self.subscriptions.get(topic, 0) + 1
        else:
            n = self.subscriptions.get(topic, 0) - 1
            if n > 0:
                self.subscriptions[topic] = n
            else:
                self.subscriptions.pop(topic, None)
        if subscribe and topic.startswith(b"welcome."):
            self.send_welcome(topic.decode(errors="replace"))

    def send_welcome(self, topic: str) -> None:
        body = {
            "boot_id": self.boot_id,
            "protocol": PROTOCOL_VERSION,
            "seqs": dict(self._seq),
            "state": {t: {"header": h, "body": b} for t, (h, b) in self._last.items()},
        }
        header = {"topic": topic, "type": "welcome", "seq": 0, "boot_id": self.boot_id,
                  "ts": time.time()}
        self._send(topic, header, body)

    def last(self, topic: str) -> dict[str, Any] | None:
        entry = self._last.get(topic)
        return entry[1] if entry else None

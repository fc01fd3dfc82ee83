"""Token streams as the client sees them: ordering by seq, gap filling, reattaching.

Used by :mod:`infernod.client`; scripts get :class:`Stream` / :class:`AsyncStream` from
``Client.generate`` / ``AsyncClient.generate`` and never build them directly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infernod.client.core import Event, decode_event
from infernod.protocol.bodies import QueuedEvent, queued_event_from_wire
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.client import AsyncClient, Client

__all__ = ["AsyncStream", "Event", "Stream", "decode_event"]

LEASE_PING_S = 2.0  # a following client renews its lease on the running slot this often


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
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # requests with logprobs
    queued: QueuedEvent | None = None  # the last 'queued' event: position, eta_s (until start)
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
            text: str = ev.body.get("text", "")
            self.text.append(text)
            self.logprobs.extend(ev.body.get("logprobs") or ())
            return text
        if ev.type == "queued":
            self.queued = queued_event_from_wire(ev.body)
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


class _StreamBase:
    """What a stream knows and decides, shared by :class:`Stream` and :class:`AsyncStream`:
    ordering by seq, gap and tail detection, and when to renew the client's lease."""

    def __init__(self, client: Client | AsyncClient, request_id: str,
                 reply: dict[str, Any]) -> None:
        self.client = client
        self.core = client.core
        self.request_id = request_id
        self.reply = reply
        self.state = _StreamState(request_id, self.core.boot_id or "")
        self.backlog: list[str] = []  # text fetched before iteration began (attach)
        self.fetches = 0  # stream.fetch requests sent: gap_fetches + tail_fetches + attach
        self.gap_fetches = 0  # ... because a seq was missing (or a fetch was cut short)
        self.tail_fetches = 0  # ... because the stream was silent (its tail may be lost)
        self._more = False  # the last fetch reply was cut short: fetch again at once
        self._last_ping = time.monotonic()
        self._seq_at_ping = -1
        self.core.saw_life()

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.state.stats

    @property
    def text(self) -> str:
        return "".join(self.state.text)

    @property
    def logprobs(self) -> list[dict[str, Any]]:
        """Each token's ``{id, token, logprob, bytes, top}`` so far (``logprobs=True``)."""
        return self.state.logprobs

    def _fetch_body(self) -> dict[str, Any]:
        self.fetches += 1
        return {"request_id": self.request_id, "from_seq": self.state.next_seq}

    def _absorb(self, reply: dict[str, Any]) -> list[str]:
        """Apply a stream.fetch reply; return the text it completed, in order."""
        first = int(reply.get("first_seq") or 0)
        if first > self.state.next_seq and not self.state.done:
            # The daemon's buffer no longer holds what we miss: no fetch can fill the gap
            # (fetching again would spin forever), and the text could not be exact.
            raise InfernoError("aborted", f"stream {self.request_id}: events {self.state.next_seq}"
                               f"-{first - 1} were dropped before they could be fetched",
                               "read streams promptly, or raise daemon.stream_buffer_tokens",
                               reason="events_lost")
        events = [Event(f"tokens.{self.request_id}", e["type"], e["seq"],
                        self.core.boot_id or "", e["body"]) for e in reply["events"]]
        self._more = bool(reply.get("more"))  # a reply holds 4096 events at most
        return self._feed(events)

    def _feed(self, events: Iterable[Event]) -> list[str]:
        out: list[str] = []
        for ev in events:
            if self.state.done:
                break
            for ready in self.state.offer(ev):
                text = self.state.apply(ready)
                if text:
                    out.append(text)
        return out

    def _drain(self, queue: deque[Event]) -> list[str]:
        out = self.backlog
        self.backlog = []
        while queue and not self.state.done:
            out += self._feed([queue.popleft()])
        return out

    def _next_step(self) -> str:
        """After draining: 'fetch' (a gap), 'fetch_tail', 'ping' or 'wait'."""
        if self.state.has_gap or (self._more and not self.state.done):
            self._more = False
            self.gap_fetches += 1
            return "fetch"
        self.core.check_alive(self.state.boot_id)
        now = time.monotonic()
        if now - self._last_ping <= LEASE_PING_S:
            return "wait"
        self._last_ping = now
        stalled = self.state.next_seq == self._seq_at_ping
        self._seq_at_ping = self.state.next_seq
        # Nothing for a while: the tail (even 'done') may have been dropped at our HWM while
        # we were paused, and no later seq would show the gap. Otherwise renew the lease.
        if stalled:
            self.tail_fetches += 1
            return "fetch_tail"
        return "ping"


class Stream(_StreamBase):
    """Iterate for text deltas; ``stats`` holds the final statistics once it ends."""

    client: Client

    def cancel(self) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.cancel(self.request_id)
        return reply

    def fetch_missing(self, timeout: float | None = None) -> list[str]:
        """Ask the daemon for every event from the next expected seq (gap or reattach)."""
        return self._absorb(self.client.request("stream.fetch", self._fetch_body(),
                                                timeout=timeout))

    def __iter__(self) -> Iterator[str]:
        client = self.client
        queue = self.core.follow(self.request_id)
        try:
            while True:
                yield from self._drain(queue)
                if self.state.done:
                    return
                step = self._next_step()
                if step == "fetch":
                    self.backlog += self.fetch_missing()
                    continue
                if step == "fetch_tail":
                    self.backlog += self.fetch_missing(timeout=self.core.lost_after())
                elif step == "ping":
                    client.try_send("ping")
                client.listen(0.1)
        finally:
            self.core.unfollow(self.request_id)


class AsyncStream(_StreamBase):
    """``async for text in stream``; ``stats`` holds the final statistics once it ends."""

    client: AsyncClient

    async def cancel(self) -> dict[str, Any]:
        reply: dict[str, Any] = await self.client.cancel(self.request_id)
        return reply

    async def fetch_missing(self, timeout: float | None = None) -> list[str]:
        return self._absorb(await self.client.request("stream.fetch", self._fetch_body(),
                                                      timeout=timeout))

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        client = self.client
        queue = self.core.follow(self.request_id)
        try:
            while True:
                for text in self._drain(queue):
                    yield text
                if self.state.done:
                    return
                step = self._next_step()
                if step == "fetch":
                    self.backlog += await self.fetch_missing()
                    continue
                if step == "fetch_tail":
                    self.backlog += await self.fetch_missing(timeout=self.core.lost_after())
                elif step == "ping":
                    await client.try_send("ping")
                await client.next_event_batch(0.1)
        finally:
            self.core.unfollow(self.request_id)

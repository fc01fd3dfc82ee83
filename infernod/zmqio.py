"""Plain ZeroMQ sockets on an asyncio loop, for the paths every token takes.

pyzmq's ``zmq.asyncio`` makes a Future for each send and receive, re-registers its poller on
every wake-up and does its flag arithmetic with ``enum.Flag`` objects. Per message that is
more CPU than the rest of a token's way through the daemon and the gateway together (py-spy
with ``--gil``; bench/cpu_per_token.py), and on a machine whose cores the decode threads
fill, every millisecond of it is a millisecond the decode stands still. So the sockets on
that path are plain ``zmq.Socket`` s: their file descriptor is watched once with
``loop.add_reader`` (:class:`FdWatch`) and the owner drains them without waiting.

libzmq's descriptor (``ZMQ_FD``) signals edges, not levels: it wakes the loop when commands
reach the socket's mailbox, and *any* call on the socket (a send, a subscription) may take
those commands in, and with them the news that messages wait, without it ever waking anyone.
Hence three rules, which :class:`FdWatch` carries out:

* drain until ``zmq.Again`` (or hand the rest to the next loop turn: :meth:`FdWatch.kick`);
* after any other call on the socket, :meth:`FdWatch.kick`: a drain on the next loop turn;
* drain on a timer anyway (``tick_s``), so a missed edge can only ever delay, not lose.

Imports nothing but pyzmq and asyncio (the client library uses it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import zmq

NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)

Sock = zmq.Socket[Any]
T = TypeVar("T")


def plain_socket(ctx: zmq.Context[Any], kind: int) -> Sock:
    """A plain (blocking-API) socket of ``kind`` in ``ctx``, even an asyncio context."""
    return zmq.Socket(ctx, kind)


def send_frames(sock: Sock, frames: Sequence[bytes]) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK)`` without its per-frame type checks and
    enum arithmetic. Raises ``zmq.Again`` as it does (nothing was sent then: libzmq takes a
    multipart message whole or not at all)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, MORE_NOBLOCK if i < last else NOBLOCK)


def recv_frames(sock: Sock) -> list[bytes]:
    """``sock.recv_multipart(zmq.NOBLOCK)``: raises ``zmq.Again`` when nothing waits."""
    frames = [sock.recv(NOBLOCK)]
    while sock.getsockopt(RCVMORE):
        frames.append(sock.recv(NOBLOCK))
    return frames


def resolve(fut: asyncio.Future[T], value: T) -> None:
    """``fut``'s result, unless something (a timer, a wake-up) got there first."""
    if not fut.done():
        fut.set_result(value)


class FdWatch:
    """Calls ``on_ready()`` on the running loop whenever ``sock`` may have messages: its
    descriptor woke the loop, :meth:`kick` was called, or ``tick_s`` passed (then
    ``on_tick()`` when given, instead). ``on_ready`` must drain the socket until
    ``zmq.Again``, or call :meth:`kick` for the rest: :meth:`drain` does both. Without ``on_ready``, :meth:`wait`
    waits for the next of those, for a coroutine that drains in its own loop.

    Loop thread only, like the socket; :meth:`close` before the socket closes."""

    def __init__(self, sock: Sock, on_ready: Callable[[], None] | None = None, *,
                 tick_s: float | None = None,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self._on_ready = on_ready if on_ready is not None else self._wake
        self._on_tick = on_tick if on_tick is not None else self._on_ready
        self._tick_s = tick_s
        self._kicked = False
        self._woken = False  # a wake-up no wait() has taken yet
        self._waiter: asyncio.Future[bool] | None = None
        self._fd = int(sock.getsockopt(zmq.FD))
        self.loop.add_reader(self._fd, self._ready)
        self._timer = (self.loop.call_later(tick_s, self._tick) if tick_s is not None
                       else None)
        self.kick()  # what came before the descriptor was watched

    def kick(self) -> None:
        """Drain on the next loop turn (at most one pending, however often called)."""
        if not self._kicked and not self.closed:
            self._kicked = True
            self.loop.call_soon(self._kicked_ready)

    def drain(self, handle: Callable[[list[bytes]], None], batch: int) -> int:
        """Hand each waiting message to ``handle`` until ``zmq.Again`` (or another error:
        the socket is going away), or ``batch`` of them and a :meth:`kick` for the rest, on
        the next loop turn after the loop's other work. How many were handed."""
        for n in range(batch):
            try:
                frames = recv_frames(self.sock)
            except zmq.ZMQError:
                return n
            handle(frames)
        self.kick()
        return batch

    def _kicked_ready(self) -> None:
        self._kicked = False
        self._ready()

    def _ready(self) -> None:
        if not self.closed and not self.sock.closed:
            self._on_ready()

    def _tick(self) -> None:
        if self.closed:
            return
        if not self.sock.closed:
            self._on_tick()
        assert self._tick_s is not None
        self._timer = self.loop.call_later(self._tick_s, self._tick)

    def _wake(self) -> None:
        if not int(self.sock.getsockopt(EVENTS)) & POLLIN:  # takes the descriptor's news in
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)
        else:
            self._woken = True

    async def wait(self, timeout: float) -> bool:
        """(Without ``on_ready``.) True once a message waits, False after ``timeout``
        seconds without one."""
        if self._woken:
            self._woken = False
            return True
        fut: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = fut
        timer = self.loop.call_later(timeout, resolve, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        """Stop watching (idempotent); the socket stays open."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)

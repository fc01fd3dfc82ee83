"""infernod.zmqio: plain sockets on an asyncio loop. What must hold: every message reaches the
owner without a poll of its own, even when a call on the socket took in the descriptor's only
wake-up (libzmq's ZMQ_FD signals edges), and no wait outlives its timeout."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator

import pytest
import zmq
import zmq.asyncio

from infernod.zmqio import FdWatch, plain_socket, recv_frames, send_frames

_ids = itertools.count()


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """(watched PULL, PUSH into it) over inproc, in an asyncio context like the daemon's."""
    ctx = zmq.asyncio.Context()
    pull, push = plain_socket(ctx, zmq.PULL), plain_socket(ctx, zmq.PUSH)
    endpoint = f"inproc://zmqio-{next(_ids)}"
    pull.bind(endpoint)
    push.connect(endpoint)
    yield pull, push
    pull.close(0)
    push.close(0)
    ctx.term()


def drainer(sock: zmq.Socket[bytes], got: list[list[bytes]]) -> Callable[[], None]:
    def drain() -> None:
        while True:
            try:
                got.append(recv_frames(sock))
            except zmq.Again:
                return
    return drain


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


Pair = tuple[zmq.Socket[bytes], zmq.Socket[bytes]]


def test_frames_round_trip_and_again_when_empty(pair: Pair) -> None:
    pull, push = pair
    with pytest.raises(zmq.Again):
        recv_frames(pull)
    send_frames(push, (b"topic", b"", b"\x00" * 3))
    assert pull.poll(2000)
    assert recv_frames(pull) == [b"topic", b"", b"\x00" * 3]
    with pytest.raises(zmq.Again):
        recv_frames(pull)


def test_messages_reach_the_callback_from_the_descriptor_alone(pair: Pair) -> None:
    pull, push = pair

    async def main() -> list[list[bytes]]:
        got: list[list[bytes]] = []
        watch = FdWatch(pull, drainer(pull, got))  # no tick: the descriptor must do it
        try:
            for i in range(50):
                send_frames(push, (b"n", str(i).encode()))
                await asyncio.sleep(0.001 if i % 10 else 0.02)
            assert await until(lambda: len(got) == 50)
        finally:
            watch.close()
        return got

    got = asyncio.run(main())
    assert [int(f[1]) for f in got] == list(range(50))  # all, once, in order


def test_a_call_that_took_in_the_edge_is_covered_by_kick(pair: Pair) -> None:
    """Reading ZMQ_EVENTS (as a send or a subscription may, inside libzmq) takes in the
    command that woke the descriptor: without kick() the message would sit unread."""
    pull, push = pair

    async def main() -> tuple[int, int]:
        got: list[list[bytes]] = []
        watch = FdWatch(pull, drainer(pull, got))
        try:
            await asyncio.sleep(0.05)  # the watch's first drain has run
            send_frames(push, (b"late",))  # inproc: in the pipe, the descriptor signalled
            pull.getsockopt(zmq.EVENTS)  # ... and its signal taken in, before the loop looks
            await asyncio.sleep(0.3)
            unread = len(got)  # nothing woke the loop: libzmq's edge behaviour
            watch.kick()
            await until(lambda: len(got) == 1, 2.0)
            return unread, len(got)
        finally:
            watch.close()

    unread, after_kick = asyncio.run(main())
    assert (unread, after_kick) == (0, 1)


def test_the_tick_drains_what_no_edge_announced(pair: Pair) -> None:
    pull, push = pair

    async def main() -> int:
        got: list[list[bytes]] = []
        watch = FdWatch(pull, drainer(pull, got), tick_s=0.1)
        try:
            await asyncio.sleep(0.05)
            send_frames(push, (b"late",))
            pull.getsockopt(zmq.EVENTS)  # the edge taken in (as above)
            await until(lambda: len(got) == 1, 2.0)
            return len(got)
        finally:
            watch.close()

    assert asyncio.run(main()) == 1


def test_kicks_coalesce_to_one_drain_per_loop_turn(pair: Pair) -> None:
    pull, _ = pair

    async def main() -> int:
        calls = [0]
        drain = drainer(pull, [])

        def count() -> None:
            calls[0] += 1
            drain()
        watch = FdWatch(pull, count)
        await asyncio.sleep(0.05)
        calls[0] = 0
        for _ in range(100):
            watch.kick()
        await asyncio.sleep(0.05)
        watch.close()
        return calls[0]

    assert asyncio.run(main()) == 1


def test_wait_times_out_wakes_on_a_message_and_keeps_an_early_wake(pair: Pair) -> None:
    pull, push = pair

    async def main() -> tuple[bool, bool, bool, float]:
        watch = FdWatch(pull)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            idle = await watch.wait(0.1)
            waited = loop.time() - t0
            loop.call_later(0.05, send_frames, push, (b"x",))
            woken = await watch.wait(5.0)
            drainer(pull, [])()  # until Again, as the owner must before it waits again
            send_frames(push, (b"y",))  # arrives while nobody waits ...
            await asyncio.sleep(0.1)
            early = await watch.wait(0.01)  # ... and is not lost
            return idle, woken, early, waited
        finally:
            watch.close()

    idle, woken, early, waited = asyncio.run(main())
    assert (idle, woken, early) == (False, True, True)
    assert 0.09 <= waited < 2.0


def test_close_stops_every_callback_and_ends_a_wait(pair: Pair) -> None:
    pull, push = pair

    async def main() -> tuple[bool, int]:
        got: list[list[bytes]] = []
        watch = FdWatch(pull, drainer(pull, got), tick_s=0.02)
        await asyncio.sleep(0.05)
        watch.close()
        watch.close()  # idempotent
        send_frames(push, (b"after",))
        await asyncio.sleep(0.2)
        waiter = FdWatch(pull)
        task = asyncio.ensure_future(waiter.wait(30))
        await asyncio.sleep(0.05)
        # the wake from "after" may end the wait first; either way it ends now
        waiter.close()
        result = await asyncio.wait_for(task, 2.0)
        return result in (True, False), len(got)

    ended, n = asyncio.run(main())
    assert ended and n == 0


def test_drain_hands_a_batch_per_turn_and_kicks_for_the_rest(pair: Pair) -> None:
    pull, push = pair

    async def main() -> tuple[list[int], list[int]]:
        got: list[int] = []
        counts: list[int] = []
        watch: FdWatch | None = None

        def ready() -> None:
            assert watch is not None
            counts.append(watch.drain(lambda f: got.append(int(f[0])), 10))
        watch = FdWatch(pull, ready)
        try:
            for i in range(25):
                send_frames(push, (str(i).encode(),))
            assert await until(lambda: len(got) == 25)
            await asyncio.sleep(0.05)
        finally:
            watch.close()
        return got, counts

    got, counts = asyncio.run(main())
    assert got == list(range(25))  # all of them, once, in order
    assert counts[:3] == [10, 10, 5]  # a batch per loop turn, the rest after a kick

"""Liveness: a stopped daemon is reported and recovered from, dead clients free their slots,
a paused subscriber costs the daemon nothing and recovers its stream, and 1,000 vanished
clients leave no trace. kill -9 of the daemon mid-stream: tests/test_daemon.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq

from infernod.protocol import codec
from infernod.protocol.errors import DaemonUnavailable


def _wait(cond, timeout: float, what: str, step: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(step)


def test_sigstop_10s_reported_lost_then_same_client_recovers(daemon):
    with daemon.client(timeout=2) as c, daemon.client(topics=("heartbeat",)) as watcher:
        boot = c.hello()["boot_id"]
        watcher.wait_welcome()
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable):
                while True:  # what `inferno watch` and the TUI do
                    watcher._check_alive()
                    watcher._pump(0.1)
            assert time.monotonic() - t0 < 3.5
            with pytest.raises(DaemonUnavailable):
                c.ping()
            time.sleep(max(0.0, 10 - (time.monotonic() - t0)))
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert c.ping()["pong"]  # the same client, no reconnect by hand
        assert c.hello()["boot_id"] == boot and not c.restarted
        watcher._pump(1.5)
        watcher._check_alive()  # heartbeats flow again


_CHILD = textwrap.dedent("""
    import json, sys
    from infernod.client import Client
    c = Client(sys.argv[1], timeout=10)
    s = c.generate("gemma3-270m", "Once upon a time", max_tokens=int(sys.argv[2]),
                   temperature=0)
    it = iter(s)
    next(it)
    print(json.dumps({"request_id": s.request_id}), flush=True)
    for _ in it:
        pass
    print(json.dumps({"text": s.text, "fetches": s.fetches, "stats": s.stats}), flush=True)
""")


def _child(daemon, max_tokens: int) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, daemon.endpoint, str(max_tokens)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())
    return p, first["request_id"]


@pytest.mark.model
def test_sigkilled_client_loses_its_slot_after_the_lease(daemon_factory):
    d = daemon_factory({"scheduler": {"client_lease_s": 3.0}})
    with d.client() as c:
        c.load("gemma3-270m")
        p, rid = _child(d, 5000)
        assert c.status()["queue"]["running"] == 1
        p.kill()
        p.wait(5)
        _wait(lambda: c.status()["queue"]["running"] == 0, 8, "the lease to expire")
        events = c.request("stream.fetch", {"request_id": rid})["events"]
        assert events[-1]["type"] == "error" and events[-1]["body"]["code"] == "aborted"
        assert "lease" in events[-1]["body"]["message"]
        # A live client keeps its lease while streaming longer than the lease.
        s = c.generate("gemma3-270m", "Hi", max_tokens=120, temperature=0)
        list(s)
        assert s.stats["finish_reason"] == "length"


@pytest.mark.model
def test_paused_subscriber_is_dropped_then_fetches_the_gap(daemon_factory):
    # A tiny per-subscriber queue (the default is 20,000 events; the mechanism is the same).
    d = daemon_factory({"daemon": {"subscriber_hwm": 8}})
    with d.client() as c:
        c.load("gemma3-270m")
        p, rid = _child(d, 400)
        proc = psutil.Process(d.pid)
        rss0 = proc.memory_info().rss
        os.kill(p.pid, signal.SIGSTOP)
        pings = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:
            t = time.perf_counter()
            c.ping()
            pings.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGCONT)
        grown = proc.memory_info().rss - rss0
        line = p.stdout.readline()
        assert line, p.stderr.read()
        out = json.loads(line)
        p.wait(30)
        full = c.request("stream.fetch", {"request_id": rid})
        assert full["finished"] and not full["more"]
        text = "".join(e["body"].get("text", "") for e in full["events"])
        # Over ipc the kernel's socket buffer (~208 KB, SO_SNDBUF does not apply to ipc in
        # libzmq) absorbs a few seconds of tokens, so a gap is likely but not certain here;
        # when there was one, it was fetched (fetches > 0) and the text is still exact.
        print(f"paused subscriber: {out['fetches']} gap fetches")
        assert out["text"] == text and out["stats"]["completion_tokens"] == 400
        pings.sort()
        assert pings[int(len(pings) * 0.99) - 1] < 50, pings[-5:]
        assert grown < 20 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB during the pause"


@pytest.mark.model
def test_a_thousand_clients_vanish_mid_stream(daemon_factory):
    d = daemon_factory({"scheduler": {"client_lease_s": 3.0},
                        "daemon": {"stream_retention_s": 1.0}})
    ctx = zmq.Context.instance()
    proc = psutil.Process(d.pid)

    def batch(n: int) -> None:
        socks = []
        for i in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.endpoint)
            s.send_multipart(codec.encode_request(
                {"id": "1", "type": "generate", "session": f"gone{os.getpid()}x{i}x{time.time_ns()}"},
                {"model": "gemma3-270m", "prompt": "Tell me a story", "max_tokens": 64}))
            socks.append(s)
        for s in socks:  # admitted (a reply) before the client vanishes
            assert s.poll(10000)
            header = codec.unpackb(s.recv_multipart()[1], max_bytes=4096)
            assert header["type"] == "reply", header
        for s in socks:
            s.close(0)  # gone without a word, like a kill -9
        _wait(lambda: c.status()["queue"] == {**c.status()["queue"], "running": 0, "queued": 0},
              30, "the vanished clients' work to be aborted", step=0.2)

    def snapshot() -> tuple[int, int, int]:
        return proc.num_fds(), proc.num_threads(), proc.memory_info().rss

    with d.client() as c:
        c.load("gemma3-270m")
        batch(200)
        batch(200)  # warm: allocator arenas, lazily created threads
        fds0, threads0, rss0 = snapshot()
        for _ in range(3):
            batch(200)
        time.sleep(1.5)  # finished streams expire after stream_retention_s
        fds, threads, rss = snapshot()
        assert fds <= fds0 + 2, (fds0, fds)
        assert threads == threads0, (threads0, threads)
        assert rss - rss0 < 15 * 2**20, f"RSS grew {(rss - rss0) / 2**20:.1f} MiB"
        # No slot leaked: four generations (slots = 4) run at the same time.
        streams = [c.generate("gemma3-270m", "Count to a hundred", max_tokens=300)
                   for _ in range(4)]
        _wait(lambda: c.status()["queue"]["running"] == 4, 20, "all four slots running")
        for s in streams:
            s.cancel()

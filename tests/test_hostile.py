"""Hostile input: each malformed envelope is refused with its reason, floods are rate limited,
the error log stays short, and a fuzzed envelope never crashes the codec or the daemon.

A longer fuzz run: ``python bench/fuzz_envelope.py --cases 1000000``.
"""

from __future__ import annotations

import random
import time

import psutil
import pytest
import zmq
from envelope_fuzz import check_envelope, random_envelope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawsock import raw_socket

from infernod.protocol import codec
from infernod.protocol.errors import InfernoError

HDR = {"id": "1", "type": "ping", "session": "hostile"}


def _raw(endpoint: str) -> zmq.Socket:
    return raw_socket(endpoint)


def _answer(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 3000) -> dict | None:
    sock.send_multipart(frames)
    if not sock.poll(timeout_ms):
        return None
    reply = sock.recv_multipart()
    return codec.unpackb(reply[2], max_bytes=1 << 20)


CASES = {
    "map32 header claiming 2^32-1 entries": ([codec.MAGIC, b"\xdf\xff\xff\xff\xff", b"\x80"],
                                             None),
    "array32 body claiming 2^32-1 items": ([codec.MAGIC, codec.packb(HDR),
                                            b"\x81\xa1a\xdd\xff\xff\xff\xff"], "body"),
    "nesting 2,000 deep": ([codec.MAGIC, codec.packb(HDR), b"\x81\xa1a" + b"\x91" * 2000 + b"\xc0"],
                           "malformed body"),
    "non-string key": ([codec.MAGIC, codec.packb(HDR), codec.packb({1: 2})], "body"),
    "ext type": ([codec.MAGIC, codec.packb(HDR), b"\x81\xa1a\xc7\x01\x05a"], "ext"),
    "two frames": ([codec.MAGIC, codec.packb(HDR)], "expected 3 frames"),
    "four frames": ([codec.MAGIC, codec.packb(HDR), b"\x80", b"x"], "expected 3 frames"),
    "bad magic": ([b"NOPE", codec.packb(HDR), b"\x80"], "magic"),
    "body not a map": ([codec.MAGIC, codec.packb(HDR), codec.packb([1, 2])], "map"),
    "unknown type": ([codec.MAGIC, codec.packb({**HDR, "type": "rm.rf"}), b"\x80"], None),
    "unknown body field": ([codec.MAGIC, codec.packb(HDR), codec.packb({"x": 1})], "unknown"),
    "header id with odd chars": ([codec.MAGIC, codec.packb({**HDR, "id": "a b"}), b"\x80"],
                                 "header.id"),
}


def _ping_ms(c) -> float:
    t0 = time.perf_counter()
    c.ping()
    return (time.perf_counter() - t0) * 1000


def test_each_hostile_envelope_is_refused_and_daemon_keeps_answering(daemon):
    raw = _raw(daemon.endpoint)
    proc = psutil.Process(daemon.pid)
    with daemon.client() as c:
        c.ping()
        rss0 = proc.memory_info().rss
        for name, (frames, needle) in CASES.items():
            body = _answer(raw, frames)
            if name == "map32 header claiming 2^32-1 entries":
                # No header to answer to: refused and answered with re=None.
                assert body is not None and body["code"] == "bad_request", name
                continue
            assert body is not None, f"{name}: no answer"
            want = "unknown_type" if name == "unknown type" else "bad_request"
            assert body["code"] == want, (name, body)
            if needle:
                assert needle in body["message"], (name, body)
        # Over MAXMSGSIZE: the connection is dropped before anything is parsed; no answer.
        big = _raw(daemon.endpoint)
        assert _answer(big, [codec.MAGIC, codec.packb(HDR), b"\0" * (5 << 20)], 1000) is None
        big.close(0)
        samples = sorted(_ping_ms(c) for _ in range(15))
        assert samples[len(samples) // 2] < 50, samples
        grown = proc.memory_info().rss - rss0
        assert grown < 10 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"
    raw.close(0)


def test_rate_limit_per_session_and_per_peer(daemon_factory):
    d = daemon_factory({"security": {"rate_limit_per_s": 5.0, "rate_limit_burst": 10,
                                     "rate_limit_peer_per_s": 20.0,
                                     "rate_limit_peer_burst": 30}})
    time.sleep(2.0)  # let wait_ready's pings refill the peer bucket
    with d.client() as c:
        codes = []
        for _ in range(20):
            try:
                c.ping()
                codes.append("ok")
            except InfernoError as e:
                codes.append(e.code)
                assert e.code == "rate_limited" and e.extra["retry_after_ms"] > 0
                retry_ms = e.extra["retry_after_ms"]
        assert codes[:10] == ["ok"] * 10 and codes.count("rate_limited") >= 8, codes
        time.sleep(retry_ms / 1000 + 0.05)
        assert c.ping()["pong"]  # retry_after_ms was honest
    # Many sessions of one uid share the peer bucket: new sessions do not reset it.
    time.sleep(2.0)
    limited = 0
    clients = [d.client() for _ in range(8)]
    for _ in range(8):
        for cl in clients:
            try:
                cl.ping()
            except InfernoError as e:
                assert e.code == "rate_limited"
                limited += 1
    for cl in clients:
        cl.close()
    assert limited >= 64 - 30 - 20, limited  # 64 pings, burst 30, ~20/s refill meanwhile


def test_error_log_stays_short_under_a_flood(daemon_factory):
    d = daemon_factory({"daemon": {"log_level": "debug"}})
    raw = _raw(d.endpoint)
    # ZAP refusals and internal errors go through the rate-limited logger; garbage that is
    # answered with bad_request is not logged at all. Flood both kinds.
    for _ in range(3000):
        raw.send_multipart([b"garbage"])
    for _ in range(200):
        bad = _raw(d.endpoint)
        bad.curve_serverkey = zmq.curve_keypair()[0]  # CURVE to a NULL socket: refused
    while raw.poll(500):
        raw.recv_multipart()
    with d.client() as c:
        assert c.ping()["pong"]
    assert len(d.log().splitlines()) < 200, len(d.log().splitlines())
    raw.close(0)


# -- fuzz -----------------------------------------------------------------------------------
@settings(max_examples=1_000, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**64))
def test_fuzz_envelope_in_process(seed):
    rng = random.Random(seed)  # hypothesis picks seeds; a plain Random makes the envelopes
    for _ in range(10):  # 1,000 examples x 10 envelopes = 10^4 cases
        check_envelope(random_envelope(rng))


@pytest.fixture(scope="module")
def fuzz_daemon(models_dir):
    from daemon_harness import DaemonProcess

    d = DaemonProcess({"models": {"dirs": [str(models_dir)]},
                       "security": {"rate_limit_per_s": 0.0, "rate_limit_peer_per_s": 0.0}})
    d.start()
    d.raw = _raw(d.endpoint)
    yield d
    d.raw.close(0)
    d.cleanup()


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**64))
def test_fuzz_envelope_live(fuzz_daemon, seed):
    frames = random_envelope(random.Random(seed))
    if check_envelope(frames) == "ok":
        return  # a valid request may legitimately do things (load a model); not fuzzed live
    raw = fuzz_daemon.raw
    raw.send_multipart(frames or [b""])
    while raw.poll(20):
        raw.recv_multipart()
    assert fuzz_daemon.proc.poll() is None, fuzz_daemon.log()


def test_daemon_alive_after_live_fuzz(fuzz_daemon):
    with fuzz_daemon.client() as c:
        assert c.ping()["pong"]
        assert "Traceback" not in fuzz_daemon.log()

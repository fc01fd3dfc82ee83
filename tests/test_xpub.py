"""The events socket under history, floods and other users (issue 12, items 3-5).

* Per-stream state ends with the stream: after 12,000 finished requests a new client still
  connects and its welcome is as small as on a fresh daemon.
* A monitor flooding the events socket with subscriptions does not freeze the daemon.
* A principal reads its own streams only (ipc uids and CURVE keys); operators read all.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq
from daemon_harness import wait_for
from rawsock import raw_socket
from test_security import NOBODY, STRANGER, _open_for_group, needs_root, run_as

from infernod.client import AsyncClient, Client, CurveKeys
from infernod.protocol import codec
from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"




def _welcome(d) -> dict:
    with d.client() as c:
        return c.wait_welcome(10)


def _cli_status(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from infernod.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "--endpoint", d.endpoint,
                           "status", "--json"], capture_output=True, text=True, timeout=60)


async def _tui_welcome(d) -> int:
    """What the console does on connect: hello, then the welcome with its topics."""
    from inferno_tui.connection import TOPICS, welcome_events

    client = AsyncClient(d.endpoint, timeout=10, name="inferno-tui", topics=TOPICS)
    try:
        await client.hello()
        welcome = await client.wait_welcome(10)
        return len(welcome_events(welcome))
    finally:
        client.close()


def _history_bytes(welcome: dict) -> int:
    """The welcome's size without the stats summary, whose size depends on which kinds of
    outcome it has seen so far (bounded, asserted on its own), not on how many."""
    state = {k: v for k, v in welcome["state"].items() if k != "stats"}
    return len(codec.packb({**welcome, "state": state}))


def _finished_requests(d, n: int, batch: int = 100) -> None:
    """``n`` real ``generate`` requests whose streams open and end: sent ``batch`` at a
    time on a raw socket while the one slot is busy, then cancelled while they wait (the
    stream ends with ``cancelled``): 12,000 take a minute, not the hours 12,000 real
    generations take on two cores."""
    s = raw_socket(d.endpoint, timeout_ms=20000)

    def call(requests: list[tuple[str, dict]], session: str) -> list[dict]:
        for i, (type_, body) in enumerate(requests):
            s.send_multipart(codec.encode_request(
                {"id": str(i), "type": type_, "session": session}, body))
        out = []
        for _ in requests:
            frames = s.recv_multipart()
            header = codec.unpackb(frames[1], max_bytes=4096)
            body = codec.unpackb(frames[2], max_bytes=1 << 20)
            # a cancel may come after the request ran (the busy slot had its own end)
            assert header["type"] == "reply" or body.get("code") == "unknown_request", body
            out.append(body)
        return out

    try:
        for b in range(0, n, batch):
            k = min(batch, n - b)
            started = call([("generate", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})] * k,
                           f"hist{b}x{time.time_ns()}")
            call([("cancel", {"request_id": r["request_id"]}) for r in started],
                 f"hist{b}x{time.time_ns()}")
    finally:
        s.close(0)


@pytest.mark.model
def test_welcome_and_memory_stay_flat_over_12000_finished_requests(daemon_factory):
    # One slot, kept busy by one long generation: the 12,000 wait for it and expire.
    d = daemon_factory({"daemon": {"stream_retention_s": 1.0},
                        "security": {"rate_limit_per_s": 0, "rate_limit_peer_per_s": 0},
                        "scheduler": {"max_queue_per_model": 512, "max_queue_total": 1024},
                        "models": {"n_ctx": 4096, "slots": 1, "host_cache_mib": 4}})
    proc = psutil.Process(d.pid)
    with d.client(timeout=60) as c:
        c.load(MODEL)
        busy = c.generate(MODEL, "Count from one to ten thousand, in words.", max_tokens=4000)
        t0 = time.monotonic()
        _finished_requests(d, 2000)  # warm: allocator arenas, lazily made threads
        time.sleep(1.5)  # their streams pass their retention (1 s) and the tick expires them
        rss0 = proc.memory_info().rss
        # Every state topic has a value before the base is taken: on a fast machine the warm
        # requests end before the first periodic stats event (a bounded summary: per model
        # and priority), which alone adds ~8 KB to every later welcome.
        wait_for(lambda: set(_welcome(d)["state"]) >= {"heartbeat", "metrics", "stats"}, 30,
              "the first stats event")
        base = _history_bytes(_welcome(d))
        t1 = time.monotonic()
        _finished_requests(d, 10_000)
        print(f"\n12,000 finished requests: {t1 - t0:.1f}s + {time.monotonic() - t1:.1f}s")
        try:
            busy.cancel()
        except InfernoError as e:  # it may have reached its end already
            assert e.code == "unknown_request", e
        wait_for(lambda: c.status()["held"]["streams"] == 0, 10, "finished streams to expire")
        held = c.status()["held"]
        rss = proc.memory_info().rss
    # A new CLI and a new console still connect, and the welcome did not grow with history.
    out = _cli_status(d)
    assert out.returncode == 0, out.stderr[-2000:]
    assert asyncio.run(_tui_welcome(d)) >= 1
    welcome = _welcome(d)
    after = _history_bytes(welcome)
    stats_bytes = len(codec.packb(welcome["state"].get("stats", {})))
    print(f"welcome {base} -> {after} bytes; RSS {rss0 / 2**20:.1f} -> {rss / 2**20:.1f} MiB;"
          f" held {held}")
    assert after < base + 1024, (base, after)
    # the stats summary is per model and priority: it gains families (TTFT, ITL) once a
    # generation completes, not entries per request
    assert stats_bytes < 32 * 1024, stats_bytes
    assert not [t for t in welcome["seqs"] if t.startswith("tokens.")], welcome["seqs"]
    assert held["requests"] == 0 and held["streams"] == 0, held
    assert rss - rss0 < 24 * 2**20, f"RSS grew {(rss - rss0) / 2**20:.1f} MiB over 10,000"


# -- item 5: a principal reads its own streams only --------------------------------------------
def _spy(events_endpoint: str, topics: list[str], seconds: float,
         curve: CurveKeys | None = None, until: threading.Event | None = None) -> dict:
    """Subscribe to ``topics`` on a raw SUB (plus a welcome of its own), listen ``seconds``;
    return the topics that delivered anything and the welcome's ``seqs``."""
    ctx = zmq.Context()
    keys = None if curve is None else (curve.server_public, curve.client_public,
                                       curve.client_secret)
    s = raw_socket(events_endpoint, zmq.SUB, ctx=ctx, timeout_ms=200, curve=keys)
    for t in topics:
        s.setsockopt(zmq.SUBSCRIBE, t.encode())
    me = f"welcome.spy{os.getpid()}x{time.time_ns()}"
    s.setsockopt(zmq.SUBSCRIBE, me.encode())
    seen: set[str] = set()
    seqs: list[str] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and not (until is not None and until.is_set()):
            try:
                frames = s.recv_multipart()
            except zmq.Again:
                continue
            seen.add(frames[0].decode())
            if frames[0].decode() == me:
                seqs = list(codec.unpackb(frames[3], max_bytes=1 << 24)["seqs"])
    finally:
        s.close(0)
        ctx.term()
    return {"topics": sorted(seen - {me}), "welcomed": me in seen, "seqs": seqs}


def _as_other_user(endpoint: str, events: str, victim_session: str, victim_rid: str,
                   job_id: str, can_generate: bool) -> dict:
    """In the child: what another principal can get of the victim's streams."""
    out: dict = {}
    out["spy"] = _spy(events, ["", "t", "tokens", "tokens.", f"tokens.{victim_session}.",
                               f"tokens.{victim_rid}", f"tokens.{job_id}:",
                               f"tokens.{job_id}:0", f"welcome.{victim_session}", "heartbeat"], 3.0)
    with Client(endpoint, timeout=10) as c:
        try:
            c.request("stream.fetch", {"request_id": victim_rid})
            out["fetch"] = "ok"
        except InfernoError as e:
            out["fetch"] = e.code
        if can_generate:
            stream = c.generate(MODEL, "Say hi", max_tokens=3)
            out["own_text"] = "".join(stream)
            out["own_rid"] = stream.request_id
            out["own_fetch"] = len(c.request("stream.fetch",
                                             {"request_id": stream.request_id})["events"])
        c.session = victim_session  # a request in the victim's session (public in queue rows)
        try:
            c.request("generate", {"model": MODEL, "prompt": "x", "max_tokens": 1})
            out["in_victims_session"] = "ok"
        except InfernoError as e:
            out["in_victims_session"] = e.code
    return out


def _cancel(stream) -> None:
    try:
        stream.cancel()
    except InfernoError as e:  # ended already (its lease: the test did not follow it)
        assert e.code == "unknown_request", e


def _leaked(spy: dict, victim_session: str, job_id: str) -> list[str]:
    return [t for t in spy["topics"] + spy["seqs"]
            if t.startswith((f"tokens.{victim_session}.", f"tokens.{job_id}:"))]


@needs_root
@pytest.mark.model
def test_another_uid_reads_no_one_elses_streams(daemon_factory):
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"users": [NOBODY], "monitors": [STRANGER],
                                     "default_role": "none"}})
    _open_for_group(d)
    ev = d.endpoints.events
    with d.client(timeout=60) as root:
        root.load(MODEL)
        secret = root.generate(MODEL, "Write a long story about a secret.", max_tokens=3000)
        next(iter(secret))
        job = root.jobs_submit(MODEL, ["Tell me a secret."] * 2, max_tokens=3000,
                               priority="high")
        wait_for(lambda: any(r.get("job") == job["job_id"] and r["state"] == "running"
                          for r in root.request("queue.list", {})["items"]), 60,
              "a job item to run")
        operator_spy: dict = {}
        done = threading.Event()
        t = threading.Thread(target=lambda: operator_spy.update(
            _spy(ev, ["tokens."], 120.0, until=done)), daemon=True)
        t.start()
        user = run_as(NOBODY, NOBODY, lambda: _as_other_user(
            d.endpoint, ev, root.session, secret.request_id, job["job_id"], True), 60)
        mon = run_as(STRANGER, NOBODY, lambda: _as_other_user(
            d.endpoint, ev, root.session, secret.request_id, job["job_id"], False), 60)
        done.set()
        t.join(15)
        # the user got its own stream, live and from the buffer; nothing of root's
        assert user["own_text"] and user["own_fetch"] >= 2, user
        for who in (user, mon):
            assert who["spy"]["welcomed"], who
            assert _leaked(who["spy"], root.session, job["job_id"]) == [], who
            assert "heartbeat" in who["spy"]["topics"], who  # aggregates: yes
            assert who["fetch"] == "unknown_request", who
        assert user["in_victims_session"] == "forbidden", user
        assert mon["in_victims_session"] == "forbidden", mon  # a monitor cannot generate
        # an operator sees everyone's: root's, the job's and the user's streams
        assert f"tokens.{user['own_rid']}" in operator_spy["topics"], operator_spy
        assert root.request("stream.fetch", {"request_id": user["own_rid"]})["events"]
        _cancel(secret)
        root.jobs_cancel(job["job_id"])
    # prompts and outputs at rest: the state dir is the daemon's only, the database 0600
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o700
    files = [p for p in d.state.iterdir() if p.name.startswith("jobs.sqlite3")]
    assert {p.name for p in files} >= {"jobs.sqlite3", "jobs.sqlite3-wal"}, files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


@pytest.mark.model
def test_another_curve_key_reads_no_one_elses_streams(daemon_factory, tmp_path):
    from test_security import _free_port_pair, _keys

    port = _free_port_pair()
    ep = f"tcp://127.0.0.1:{port}"
    d = daemon_factory({"security": {"tcp_endpoint": ep}}, start=False)
    assert _keys(d.state, "init") == 0
    for name in ("alice", "bob"):
        assert _keys(d.state, "add", name, "--role", "user", "--out", str(tmp_path / name)) == 0
    d.start()
    alice, bob = (CurveKeys.from_files(str(tmp_path / n / "server.key"),
                                       str(tmp_path / n / f"{n}.key_secret"))
                  for n in ("alice", "bob"))
    with Client(ep, curve=alice, timeout=60) as a, Client(ep, curve=bob, timeout=60) as b:
        assert a.hello()["role"] == b.hello()["role"] == "user"
        secret = a.generate(MODEL, "Write a long story about a secret.", max_tokens=3000)
        next(iter(secret))
        spy = _spy(f"tcp://127.0.0.1:{port + 1}",
                   ["", "tokens.", f"tokens.{a.session}.", f"tokens.{secret.request_id}",
                    f"welcome.{a.session}", "heartbeat"], 3.0, curve=bob)
        assert spy["welcomed"] and "heartbeat" in spy["topics"], spy
        assert _leaked(spy, a.session, "-") == [], spy
        with pytest.raises(InfernoError) as e:
            b.request("stream.fetch", {"request_id": secret.request_id})
        assert e.value.code == "unknown_request"
        assert len(a.request("stream.fetch", {"request_id": secret.request_id})["events"]) >= 2
        mine = b.generate(MODEL, "Say hi", max_tokens=3)
        assert "".join(mine)  # bob reads his own
        b.session = a.session
        with pytest.raises(InfernoError) as e:
            b.request("generate", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert e.value.code == "forbidden"
        _cancel(secret)


def test_chat_store_is_private_whatever_the_umask(tmp_path):
    from inferno_tui.store import ChatSettings, ChatStore

    old = os.umask(0o022)
    try:
        store = ChatStore(tmp_path / "data" / "chats.sqlite3")
        conv = store.create("secret", ChatSettings())
        store.add_message(conv.id, "user", "my secret prompt")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "data").iterdir()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    store.close()


# -- item 4: a flood of subscriptions does not freeze the daemon -------------------------------
def _flood(events_endpoint: str, n: int, limit_s: float) -> dict:
    """In the child (a monitor): ``n`` subscribe frames on a raw XSUB, every third a welcome,
    all distinct; stops at ``limit_s``. Then stays connected a moment and leaves."""
    ctx = zmq.Context()
    s = raw_socket(events_endpoint, zmq.XSUB, ctx=ctx, timeout_ms=2000)
    t0 = time.monotonic()
    sent = 0
    try:
        for i in range(n):
            topic = f"welcome.flood{i}" if i % 3 == 0 else f"tokens.flood{i}."
            try:
                s.send(b"\x01" + topic.encode())
            except zmq.Again:
                continue
            sent += 1
            if time.monotonic() - t0 > limit_s:
                break
        return {"sent": sent, "seconds": round(time.monotonic() - t0, 2)}
    finally:
        time.sleep(1.0)
        s.close(0)
        ctx.term()


@needs_root
@pytest.mark.model
def test_a_subscription_flood_does_not_freeze_the_daemon(daemon_factory):
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"monitors": [NOBODY], "default_role": "none"}})
    _open_for_group(d)
    proc = psutil.Process(d.pid)
    ev = d.endpoints.events
    with d.client(timeout=60) as c:
        c.load(MODEL)
        texts: list[str] = []

        def stream(i: int) -> None:
            with d.client(timeout=60) as sc:
                texts.append("".join(sc.generate(MODEL, f"Count to {20 + i}.", max_tokens=48)))

        # warm: four streams at once and a smaller flood (arenas, compute buffers, threads)
        warm = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
        for t in warm:
            t.start()
        run_as(NOBODY, NOBODY, lambda: _flood(ev, 100_000, 30.0), 60)
        for t in warm:
            t.join(120)
        del texts[:]
        time.sleep(2.0)
        rss0 = proc.memory_info().rss

        beats: list[float] = []
        pings: list[float] = []
        stop = threading.Event()

        def heartbeats() -> None:
            ctx = zmq.Context()
            s = raw_socket(ev, zmq.SUB, ctx=ctx, timeout_ms=200)
            s.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
            while not stop.is_set():
                try:
                    s.recv_multipart()
                    beats.append(time.monotonic())
                except zmq.Again:
                    pass
            s.close(0)
            ctx.term()

        def pinger() -> None:
            with d.client(timeout=10) as pc:
                while not stop.is_set():
                    t = time.perf_counter()
                    pc.ping()
                    pings.append(time.perf_counter() - t)
                    time.sleep(0.02)

        threads = [threading.Thread(target=f, daemon=True) for f in (heartbeats, pinger)]
        threads += [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(3.0)  # the streams are running, heartbeats counted
        baseline = sorted(pings)  # the same load without the flood: what this machine does
        del pings[:]
        flood = run_as(NOBODY, NOBODY, lambda: _flood(ev, 300_000, 60.0), 120)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(120)
        held = c.status()["held"]
        # The flooder's connection is gone; what libzmq and we held for it is freed in
        # small pieces and handed back to the OS once the events loop has been idle.
        end = time.monotonic() + 15
        rss = proc.memory_info().rss
        while rss - rss0 >= 10 * 2**20 and time.monotonic() < end:
            time.sleep(0.5)
            rss = proc.memory_info().rss
    pings.sort()
    p99 = pings[int(len(pings) * 0.99)] if pings else float("inf")
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    base99 = baseline[int(len(baseline) * 0.99)] if baseline else 0.0
    print(f"\nbefore: {len(baseline)} pings p99 {base99 * 1000:.1f} ms; "
          f"flood {flood}; {len(pings)} pings p99 {p99 * 1000:.1f} ms max "
          f"{pings[-1] * 1000:.1f} ms; heartbeat gaps max {max(gaps):.2f}s; RSS "
          f"{rss0 / 2**20:.1f} -> {rss / 2**20:.1f} MiB; held {held}")
    assert flood["sent"] == 300_000, flood
    assert len(texts) == 4 and all(texts), texts
    # The bounds are a kept period and p99 < 50 ms. With the models in runner
    # processes a quiet 2-core VM measures p99 10-21 ms during the flood (7-10 ms before it);
    # old main stalled replies for 11 s and more. A busy machine is slower with no flood at
    # all, so the bound is 50 ms or five times what this run measured before the flood.
    # What must hold anywhere: no client misses 3 beats (it would declare the daemon lost),
    # replies never stall for long, and memory comes back.
    assert max(gaps) < 3.0, gaps
    bound = max(0.05, 5 * base99)
    assert p99 < bound, (f"ping p99 {p99 * 1000:.1f} ms over {bound * 1000:.0f} ms "
                         f"(before: {base99 * 1000:.1f})")
    assert rss - rss0 < 10 * 2**20, f"RSS grew {(rss - rss0) / 2**20:.1f} MiB"
    assert _welcome(d)["seqs"]  # and a new client connects at once

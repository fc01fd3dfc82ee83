"""The real daemon as a subprocess, driven through the client library."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from rawsock import raw_socket

from infernod.client import Client, Event
from infernod.protocol import codec
from infernod.protocol.errors import DaemonUnavailable, InfernoError


def test_hello_ping_status_config(daemon):
    with daemon.client() as c:
        hello = c.hello()
        assert hello["protocol"] == 1
        assert hello["role"] == "operator"
        assert "generate" in hello["capabilities"]
        assert len(hello["boot_id"]) == 32
        assert c.ping()["pong"] is True
        st = c.status()
        assert st["boot_id"] == hello["boot_id"]
        assert st["pid"] == daemon.pid
        assert st["models_loaded"] == []
        assert st["queue"]["level"] == "healthy"
        assert c.config_get("models.slots")["value"] == 4
        whole = c.config_get()
        assert whole["config"]["daemon"]["runtime_dir"] == str(daemon.runtime)
        with pytest.raises(InfernoError) as e:
            c.config_get("models.nope")
        assert e.value.code == "bad_request"


def test_cpu_wait_sets_openmp_policy_before_llama_cpp_loads(daemon_factory):
    d = daemon_factory({"models": {"cpu_wait": "sleep"}})
    with d.client() as c:
        assert c.status()["omp_wait_policy"] == "PASSIVE"
        c.load("gemma3-270m")  # OpenMP is loaded now, and read the policy as it loaded
        runner = psutil.Process(c.status()["models_loaded"][0]["runner_pid"])
    # OpenMP reads the policy once, as it loads: it was not loaded when the policy was set
    # (or the daemon warns), and it is loaded now, in the model's runner, which inherited it.
    assert any("libgomp" in m.path for m in runner.memory_maps())
    assert runner.environ().get("OMP_WAIT_POLICY") == "PASSIVE"
    log = d.log()
    assert "CPU threads wait by PASSIVE (models.cpu_wait = sleep)" in log, log
    assert "OpenMP was loaded before" not in log, log


def test_cpu_wait_says_when_it_came_too_late():
    code = ("import logging, llama_cpp.llama_cpp; logging.basicConfig(); "
            "from infernod.__main__ import set_cpu_wait; set_cpu_wait('spin')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "OpenMP was loaded before models.cpu_wait could apply" in out.stderr, out.stderr


def test_runtime_dir_is_private(daemon):
    assert (daemon.runtime.stat().st_mode & 0o777) == 0o700


def test_models_list_show_and_unknown(daemon):
    with daemon.client() as c:
        names = {m["name"]: m for m in c.models()}
        assert names["gemma3-270m"]["architecture"] == "gemma3"
        assert names["gemma3-270m"]["state"] == "available"
        show = c.show("gemma3-270m")
        assert show["chat_template_name"] != ""
        with pytest.raises(InfernoError) as e:
            c.show("no-such-model")
        assert e.value.code == "unknown_model"
        with pytest.raises(InfernoError) as e:
            c.generate("no-such-model", "hi")
        assert e.value.code == "unknown_model"


@pytest.mark.model
def test_load_generate_unload_round_trip(daemon):
    with daemon.client() as c:
        shown = c.show("gemma3-270m")  # the figure checked against the budget at load
        assert shown["memory_estimate_bytes"] > shown["weights_bytes"] + (256 << 20)
        r = c.load("gemma3-270m")
        assert r["state"] == "loaded" and r["memory_bytes"] > 100 * 2**20
        assert [m["name"] for m in c.status()["models_loaded"]] == ["gemma3-270m"]
        stream = c.generate("gemma3-270m", "The capital of France is", max_tokens=12,
                            temperature=0)
        pieces = list(stream)
        assert "".join(pieces) == stream.text and "France" in stream.text
        s = stream.stats
        assert s["finish_reason"] == "length"
        assert s["completion_tokens"] == 12
        assert s["prompt_tokens"] > 3
        for key in ("ttft_ms", "queue_wait_ms", "total_ms", "tokens_per_s"):
            assert s[key] >= 0, key
        chat = c.generate("gemma3-270m", messages=[{"role": "user", "content": "Say hi"}],
                          max_tokens=4, temperature=0)
        assert chat.reply["chat_template"]
        list(chat)
        assert chat.stats["completion_tokens"] <= 4
        assert c.unload("gemma3-270m")["state"] == "unloaded"
        assert c.status()["models_loaded"] == []
        with pytest.raises(InfernoError) as e:
            c.unload("gemma3-270m")
        assert e.value.code == "model_not_loaded"


@pytest.mark.model
def test_next_chat_turn_reuses_the_previous_turns_cells(daemon):
    """Between turns the idle engine moves the conversation's cells to the host cache; the
    next turn restores them instead of evaluating the whole conversation again."""
    ask = "Write one sentence about the sea, the lighthouse and the old fisherman."
    with daemon.client() as c:
        c.load("gemma3-270m")
        turn = [{"role": "user", "content": ask}]
        first = c.generate("gemma3-270m", messages=turn, max_tokens=8, temperature=0)
        list(first)
        turn += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And one about the storm."}]
        second = c.generate("gemma3-270m", messages=turn, max_tokens=4, temperature=0)
        list(second)
        assert second.stats["prompt_cached_tokens"] >= 16, second.stats
        cache = c.show("gemma3-270m")["host_cache"]
        assert cache["saved"] >= 1 and cache["restored"] == 1, cache


@pytest.mark.model
def test_cancel_stops_stream(daemon):
    with daemon.client() as c:
        c.load("gemma3-270m")
        stream = c.generate("gemma3-270m", "Once upon a time", max_tokens=400, temperature=0)
        it = iter(stream)
        next(it)
        assert c.cancel(stream.request_id)["state"] in ("cancelling", "cancelled")
        rest = list(it)
        assert stream.stats["finish_reason"] == "cancelled"
        assert stream.stats["completion_tokens"] < 400
        assert len(rest) < 400
        with pytest.raises(InfernoError) as e:
            c.cancel(stream.request_id)
        assert e.value.code == "unknown_request"


@pytest.mark.model
def test_subscriber_receives_every_token_from_seq_0(daemon):
    """A brand-new client that sends generate at once receives seq 0, 1, 2, ... live (no
    slow-joiner loss: no gap had to be fetched), and stream.fetch returns the same events."""
    with daemon.client() as warm:
        warm.load("gemma3-270m")
    for _ in range(3):
        with daemon.client() as c:
            stream = c.generate("gemma3-270m", "Hello", max_tokens=8, temperature=0)
            text = "".join(stream)
            assert stream.fetches == 0
            assert stream.state.start is not None  # the seq-0 'start' event arrived live
            fetched = c.request("stream.fetch", {"request_id": stream.request_id})
            events = fetched["events"]
            assert [e["seq"] for e in events] == list(range(stream.state.next_seq))
            types = [e["type"] for e in events]
            assert set(types[:types.index("start")]) <= {"queued"} and types[-1] == "done"
            assert "".join(e["body"].get("text", "") for e in events) == text
            assert fetched["finished"] is True


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[models]\nslots = 0\n")
    r = subprocess.run([sys.executable, "-m", "infernod", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "models.slots" in r.stderr and "0" in r.stderr and "1 .. 256" in r.stderr
    cfg.write_text("[models]\nslots = 'eight'\n")
    r = subprocess.run([sys.executable, "-m", "infernod", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "models.slots" in r.stderr
    cfg.write_text("[scheduler]\nagin_interval_s = 3\n")
    r = subprocess.run([sys.executable, "-m", "infernod", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "scheduler.agin_interval_s" in r.stderr
    cfg.write_text("[daemon\n")
    r = subprocess.run([sys.executable, "-m", "infernod", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "syntax" in r.stderr


def test_second_daemon_refuses_and_first_keeps_serving(daemon, daemon_factory):
    from daemon_harness import DaemonProcess

    with daemon.client() as c:
        boot = c.hello()["boot_id"]
        second = DaemonProcess(base=daemon.base)
        second.start(wait=False)
        assert second.proc.wait(30) == 1
        assert "another infernod" in second.log()
        assert c.ping()["pong"]
        assert c.hello()["boot_id"] == boot


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _ping_ms(c: Client) -> float:
    t0 = time.perf_counter()
    c.ping()
    return (time.perf_counter() - t0) * 1000


def test_garbage_leaves_daemon_serving(daemon_factory):
    # Rate limits off: this test is about the parsers; 1,000 messages from one session
    # would otherwise (rightly) be answered rate_limited once the burst is spent.
    daemon = daemon_factory({"security": {"rate_limit_per_s": 0.0,
                                          "rate_limit_peer_per_s": 0.0}})
    raw = raw_socket(daemon.endpoint)
    hdr = codec.packb({"id": "1", "type": "ping", "session": "raw"})
    huge_map = b"\xdf\xff\xff\xff\xff"  # map32 claiming 2^32-1 entries
    cases = [
        [b"garbage"],
        [codec.MAGIC, b"\xc1", b"\x80"],  # 0xc1 is never valid msgpack
        [codec.MAGIC, hdr[:-3], b"\x80"],  # truncated header
        [codec.MAGIC, huge_map, b"\x80"],
        [codec.MAGIC, hdr, huge_map],
        [codec.MAGIC, hdr, b"\x91" * 2000 + b"\x80"],  # nesting 2,000 deep
        [codec.MAGIC, hdr, b"\xc7\x01\x05a"],  # ext type
        [codec.MAGIC, hdr, codec.packb({1: 2})],  # non-string key
        [codec.MAGIC, codec.packb({"id": "1", "type": "nope", "session": "raw"}), b"\x80"],
        [b"XXXX", hdr, b"\x80"],
        [codec.MAGIC, hdr, b"\x80", b"extra"],
    ]
    def flood() -> tuple[int, set]:
        for i in range(1000):
            raw.send_multipart(cases[i % len(cases)])
        replies, codes = 0, set()
        while raw.poll(1000):  # every case that has a parseable header gets an error reply
            frames = raw.recv_multipart()
            body = codec.unpackb(frames[2], max_bytes=1 << 20)
            codes.add(body.get("code"))
            replies += 1
        return replies, codes

    with daemon.client() as c:
        # Round 1 warms the allocators (zmq buffers, malloc arenas: 2-10 MiB here, varying
        # run to run); a leak would grow again in round 2, which must stay flat.
        flood()
        rss1 = _rss(daemon.pid)
        replies, codes = flood()
        assert replies >= 500
        for _ in range(5):  # oversized: MAXMSGSIZE drops the connection before parsing
            raw.send_multipart([codec.MAGIC, hdr, b"\x00" * (5 * 1024 * 1024)])
        assert codes <= {"bad_request", "unknown_type"} and "bad_request" in codes
        samples = sorted(_ping_ms(c) for _ in range(20))
        assert samples[len(samples) // 2] < 50, samples
        assert c.ping()["pong"]
        grown = _rss(daemon.pid) - rss1
        assert grown < 2 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB in the second round"
    raw.close(0)


def test_oversized_frame_drops_connection_not_daemon(daemon):
    raw = raw_socket(daemon.endpoint)
    raw.send_multipart([codec.MAGIC, b"\x80", b"\x00" * (8 * 1024 * 1024)])
    with daemon.client() as c:
        assert _ping_ms(c) < 1000
        assert c.ping()["pong"]
    raw.close(0)


def test_notify_socket_ready_and_stopping(daemon_factory, tmp_path):
    path = f"/tmp/inf-notify-{os.getpid()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        d = daemon_factory(start=False, env={"NOTIFY_SOCKET": path})
        d.start(wait=False)
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg
        # READY is only sent once the sockets are bound: the socket file exists already.
        assert (d.runtime / "control.sock").exists()
        with d.client() as c:
            assert c.ping()["pong"]
        d.proc.send_signal(signal.SIGTERM)
        msgs = []
        while not any("STOPPING=1" in m for m in msgs):
            msgs.append(sock.recv(4096).decode())
        assert d.proc.wait(30) == 0
    finally:
        sock.close()
        os.unlink(path)


# The real daemon, with one fault injected: its heartbeat raises once the trigger file exists.
_CRASHING_HEARTBEAT = """
import os, sys
from infernod.daemon import server
trigger, healthy = sys.argv.pop(1), server.Daemon.heartbeat_body
def heartbeat_body(self):
    if os.path.exists(trigger):
        raise RuntimeError("injected heartbeat fault")
    return healthy(self)
server.Daemon.heartbeat_body = heartbeat_body
from infernod.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_background_task_that_dies_exits_non_zero(daemon_factory, tmp_path):
    # systemd's Restart=on-failure restarts only on a non-zero exit: a daemon that stops
    # because its heartbeat (or control, events, zap...) loop crashed must not exit 0.
    trigger = tmp_path / "crash-now"
    d = daemon_factory(start=False)
    d._log = open(d.log_path, "ab")
    d.proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_HEARTBEAT, str(trigger), "--config",
         str(d.config_path)], stdout=d._log, stderr=subprocess.STDOUT, env=d.env)
    d.wait_ready()
    with d.client() as c:
        assert c.ping()["pong"]
    trigger.touch()
    rc = d.proc.wait(30)
    assert rc == 70, (rc, d.log())
    log_text = d.log()
    assert "background task heartbeat died" in log_text, log_text
    assert "injected heartbeat fault" in log_text and "exit status 70" in log_text, log_text


def test_abstract_notify_socket(daemon_factory):
    name = f"inferno-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(30)
    try:
        d = daemon_factory(start=False, env={"NOTIFY_SOCKET": "@" + name})
        d.start(wait=False)
        assert "READY=1" in sock.recv(4096).decode()
    finally:
        sock.close()


def test_unavailable_is_fast_when_nothing_listens(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        Client(f"ipc://{tmp_path}/control.sock", timeout=5).ping()
    assert time.monotonic() - t0 < 1.0


@pytest.mark.model
def test_kill_9_mid_stream_raises_within_3s(daemon):
    with daemon.client() as c:
        c.load("gemma3-270m")
        stream = c.generate("gemma3-270m", "Once upon a time", max_tokens=2000,
                            temperature=0.7, seed=1)
        it = iter(stream)
        next(it)
        os.kill(daemon.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 3.2
        daemon.proc.wait(5)
        old_boot = c.boot_id
        # Restart on the same directory: the same client reconnects by itself.
        daemon.start()
        end = time.monotonic() + 10
        while True:
            try:
                hello = c.hello()
                break
            except DaemonUnavailable:
                assert time.monotonic() < end
        assert hello["boot_id"] != old_boot
        assert c.restarted
        # ... and streams again on the new daemon, with the same client object.
        again = c.generate("gemma3-270m", "Hello", max_tokens=4, temperature=0)
        assert len("".join(again)) > 0 and again.stats["completion_tokens"] == 4


def test_sighup_reloads_runtime_keys_and_reports_restart_keys(daemon):
    import tomllib

    import tomli_w

    cfg = tomllib.loads(daemon.config_path.read_text())
    cfg.setdefault("scheduler", {})["aging_interval_s"] = 2.5
    cfg["models"]["slots"] = 2  # needs a restart
    daemon.config_path.write_text(tomli_w.dumps(cfg))
    with daemon.client(topics=("models",)) as c:
        c.wait_welcome()
        os.kill(daemon.pid, signal.SIGHUP)
        end = time.monotonic() + 10
        reloaded = None
        while reloaded is None and time.monotonic() < end:
            reloaded = next((e for e in c.event_batch(0.2)
                             if isinstance(e, Event) and e.type == "config_reloaded"), None)
        assert reloaded is not None
        assert reloaded.body["applied"] == ["scheduler.aging_interval_s"]
        assert reloaded.body["restart_required"] == ["models.slots"]
        assert c.config_get("scheduler.aging_interval_s")["value"] == 2.5
        assert c.config_get("models.slots")["value"] == 4


def test_sighup_with_bad_config_keeps_running(daemon):
    daemon.config_path.write_text("[models]\nslots = -3\n")
    os.kill(daemon.pid, signal.SIGHUP)
    time.sleep(0.5)
    with daemon.client() as c:
        assert c.config_get("models.slots")["value"] == 4
    assert "config not reloaded" in daemon.log() and "models.slots" in daemon.log()


@pytest.mark.model
def test_second_client_reattaches_mid_stream_and_gets_the_whole_text(daemon):
    """Reattachable streams: a client that joins late (or reconnects) fetches what it
    missed by seq and then follows live, ending with exactly the owner's text."""
    with daemon.client() as owner, daemon.client() as late:
        owner.load("gemma3-270m")
        stream = owner.generate("gemma3-270m", "Once upon a time", max_tokens=48,
                                temperature=0)
        it = iter(stream)
        for _ in range(5):
            next(it)
        follower = late.attach(stream.request_id)
        late_text = "".join(follower)
        rest = "".join(it)
        assert stream.text and late_text == stream.text
        assert follower.fetches >= 1  # it missed the beginning and fetched it
        assert follower.stats["completion_tokens"] == 48
        assert rest

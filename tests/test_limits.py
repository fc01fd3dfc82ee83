"""Limits that keep one caller from costing everyone else: bounded input (stop strings,
finite numbers), bytes held per principal and in total, quotas, cheap monitor requests and
a job store that survives a full disk. Each test runs against a real daemon over ipc://.
"""

from __future__ import annotations

import errno
import os
import shutil
import statistics
import subprocess
import time

import psutil
import pytest
import zmq
from daemon_harness import wait_for
from test_security import NOBODY, _open_for_group, needs_root, run_as

from infernod.client import Client
from infernod.protocol import codec
from infernod.protocol.errors import InfernoError


def _raw(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 3000)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.connect(endpoint)
    return s


def _answer(sock: zmq.Socket, header: dict, body: dict, timeout_ms: int = 5000) -> dict:
    sock.send_multipart([codec.MAGIC, codec.packb(header), codec.packb(body)])
    assert sock.poll(timeout_ms), "no answer"
    reply = sock.recv_multipart()
    return {"kind": codec.unpackb(reply[1], max_bytes=4096, what="header")["type"],
            **codec.unpackb(reply[2], max_bytes=1 << 24)}


# -- input bounds -----------------------------------------------------------------------------
def test_job_stop_strings_and_infinite_times_are_refused(daemon):
    """jobs.submit bounds each stop string like generate does (1-256 chars), and the header's
    ts/deadline refuse inf: neither reaches a handler."""
    raw = _raw(daemon.endpoint)
    try:
        hdr = {"id": "1", "type": "ping", "session": "limits"}
        for field in ("ts", "deadline"):
            for value in (float("inf"), float("-inf")):
                r = _answer(raw, {**hdr, field: value}, {})
                assert r["kind"] == "error" and r["code"] == "bad_request", (field, r)
                assert f"header.{field}" in r["message"] and "finite" in r["message"], r
        assert _answer(raw, {**hdr, "ts": time.time()}, {})["kind"] == "reply"
        with daemon.client() as c:
            for stop in (["x" * 257], [""], ["ok", "y" * 100_000]):
                with pytest.raises(InfernoError) as ei:
                    c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["hi"],
                                              "stop": stop})
                assert ei.value.code == "bad_request", ei.value
                assert "jobs.submit.stop[" in ei.value.message, ei.value
            assert c.request("jobs.list", {})["jobs"] == []  # nothing was stored
            assert c.ping()["pong"]
    finally:
        raw.close(0)


# -- a full disk under the job store ---------------------------------------------------------
def _mount_tmpfs(path, size: str) -> bool:
    """A small filesystem of its own for the state dir (needs root); False if not allowed."""
    if os.getuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], capture_output=True, timeout=10)
    return r.returncode == 0


def _fill(path) -> None:
    """Write zeros until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 512:
                    return
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)




@pytest.mark.model
def test_job_store_survives_a_full_disk(daemon_factory, tmp_path):
    """The state dir on its own 16 MiB tmpfs. With the disk full, jobs.submit is refused with
    storage_full (nothing stored) and the items of a running job finish anyway: their results
    wait in memory and land, in order, once space returns; then the store works as before."""
    d = daemon_factory(start=False)
    if not _mount_tmpfs(d.state, "16m"):
        pytest.skip("needs root and mount -t tmpfs")
    filler = d.state / "filler"
    try:
        d.start()
        with d.client(timeout=30) as c:
            c.load("gemma3-270m")
            job = c.request("jobs.submit", {"model": "gemma3-270m", "max_tokens": 3,
                                            "temperature": 0, "prompts": [
                                                f"Count to {i}:" for i in range(6)]})
            _fill(filler)
            with pytest.raises(InfernoError) as ei:
                c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["x" * 4096] * 64})
            assert ei.value.code == "storage_full", ei.value
            assert ei.value.hint and "free space" in ei.value.hint
            # Every item runs to its end while nothing can be written.
            wait_for(lambda: c.status()["held"]["unwritten_job_writes"] > 0
                  and c.status()["queue"]["queued"] + c.status()["queue"]["running"] == 0,
                  60, "the items to finish on a full disk", step=0.3)
            assert c.ping()["pong"]
            filler.unlink()
            got = wait_for(lambda: (lambda j: j if j["state"] == "done" else None)(
                c.request("jobs.get", {"job_id": job["job_id"]})), 30, "the results to land")
            assert [it["state"] for it in got["items"]] == ["done"] * 6
            assert all(it["text"] is not None for it in got["items"]), got["items"]
            assert c.status()["held"]["unwritten_job_writes"] == 0
            again = c.request("jobs.submit", {"model": "gemma3-270m", "max_tokens": 1,
                                              "prompts": ["Hi"]})
            assert again["created"]
            wait_for(lambda: c.request("jobs.get", {"job_id": again["job_id"]})["state"] == "done",
                  30, "a job after the disk-full episode")
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(d.state)], capture_output=True, timeout=10)


# -- monitors cost little ---------------------------------------------------------------------
def _monitor_flood(endpoint: str, job_id: str) -> dict:
    """In the child (a monitor): many models.list / unknown models.show, then time
    forbidden jobs.get of another principal's big job."""
    out: dict = {"list": 0, "show": 0, "get": []}
    with Client(endpoint, timeout=20) as c:
        assert c.hello()["role"] == "monitor"
        for i in range(150):
            out["list"] += bool(c.request("models.list", {})["models"])
            try:
                c.request("models.show", {"model": f"no-such-model-{i}"})
            except InfernoError as e:
                out["show"] += e.code == "unknown_model"
        for _ in range(15):
            t0 = time.perf_counter()
            try:
                c.request("jobs.get", {"job_id": job_id, "limit": 10_000})
            except InfernoError as e:
                assert e.code == "forbidden", e
            out["get"].append(time.perf_counter() - t0)
    return out


@needs_root
def test_monitor_requests_trigger_no_rescans_or_job_loads(daemon_factory):
    """A monitor's models.list and models.show of unknown names reuse the newest registry scan
    instead of each rescanning the model directories; jobs.get of another principal's job is
    refused before the job store loads a page of it."""
    d = daemon_factory({"daemon": {"socket_group": "nogroup"}})
    _open_for_group(d)
    with d.client(timeout=30) as c:
        job = c.request("jobs.submit", {"model": "gemma3-270m", "max_tokens": 1,
                                        "prompts": [f"{i:05d} " + "p" * 300
                                                    for i in range(10_000)]})
        c.request("jobs.cancel", {"job_id": job["job_id"]})
        c.request("models.list", {})  # an operator's list rescans: the count moves
        scans0 = c.status()["model_scans"]
        mon = run_as(NOBODY, NOBODY, lambda: _monitor_flood(d.endpoint, job["job_id"]))
        assert mon["list"] == 150 and mon["show"] == 150, mon
        scans = c.status()["model_scans"] - scans0
        assert scans <= 1, f"300 monitor requests caused {scans} model directory scans"
        owner = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert len(c.request("jobs.get", {"job_id": job["job_id"],
                                              "limit": 10_000})["items"]) == 10_000
            owner.append(time.perf_counter() - t0)
        refused, full = statistics.median(mon["get"]), statistics.median(owner)
        print(f"jobs.get refused {refused * 1000:.1f} ms, owner's 10,000-item page "
              f"{full * 1000:.1f} ms")
        assert refused < full / 5, (refused, full)
        assert c.ping()["pong"]


# -- bytes held for requests ------------------------------------------------------------------
MiB = 2**20


def _rss_mib(proc: psutil.Process) -> float:
    return proc.memory_info().rss / MiB


@pytest.mark.model
def test_request_bytes_are_bounded_per_principal(daemon_factory):
    """A flood of max-size generate requests (4 x 40 of 4 MiB, 640 MiB) while the only slot
    is busy: each principal holds at most max_held_bytes_per_principal of queued requests,
    the rest is refused with busy (before decoding), and the daemon's RSS stays flat; a
    monitor-sized request type with a large body is too_large without being decoded."""
    d = daemon_factory({"models": {"slots": 1},
                        "daemon": {"max_held_bytes_per_principal": 32 * MiB,
                                   "max_held_bytes_total": 48 * MiB, "drain_timeout_s": 1.0}})
    proc = psutil.Process(d.pid)
    socks = [_raw(d.endpoint) for _ in range(4)]
    try:
        with d.client(timeout=60) as c:
            c.load("gemma3-270m")
            long = c.generate("gemma3-270m", "Once upon a time", max_tokens=900,
                              ignore_eos=True)
            next(iter(long))  # it runs: every other generation waits behind it
            r = _answer(socks[0], {"id": "big-ping", "type": "ping", "session": "flood0"},
                        {"x": "y" * (3 * MiB)})
            assert r["kind"] == "error" and r["code"] == "too_large", r
            rss0 = _rss_mib(proc)
            body = codec.packb({"model": "gemma3-270m", "prompt": "a" * (4 * MiB - 4096),
                                "max_tokens": 1, "priority": "low"})
            for i in range(40):
                for k, s in enumerate(socks):
                    s.send_multipart([codec.MAGIC, codec.packb(
                        {"id": f"g{i}", "type": "generate", "session": f"flood{k}"}), body])
            codes: dict[str, int] = {}
            peak = rss0
            end = time.monotonic() + 90
            while sum(codes.values()) < 160 and time.monotonic() < end:
                peak = max(peak, _rss_mib(proc))
                for s in socks:
                    while s.poll(0):
                        reply = s.recv_multipart()
                        kind = codec.unpackb(reply[1], max_bytes=4096)["type"]
                        code = "ok" if kind == "reply" else \
                            codec.unpackb(reply[2], max_bytes=MiB)["code"]
                        codes[code] = codes.get(code, 0) + 1
                time.sleep(0.02)
            peak = max(peak, _rss_mib(proc))
            print(f"RSS {rss0:.0f} MiB before, {peak:.0f} MiB peak under 640 MiB of "
                  f"requests; answers {codes}")
            assert sum(codes.values()) == 160, codes
            assert codes.get("ok", 0) <= 8 and codes.get("busy", 0) >= 150, codes
            held = c.status()["held"]["request_bytes"]
            assert 0 < held <= 32 * MiB, held
            assert peak - rss0 < 160, f"RSS grew {peak - rss0:.0f} MiB"
            assert c.ping()["pong"]
    finally:
        for s in socks:
            s.close(0)


# -- quotas per principal ---------------------------------------------------------------------
def _queue_one(endpoint: str) -> str:
    """In the child (another operator): one generate that waits in the queue."""
    with Client(endpoint, timeout=20) as c:
        try:
            return c.request("generate", {"model": "gemma3-270m", "prompt": "Hi",
                                          "max_tokens": 1})["request_id"]
        except InfernoError as e:
            return e.code


@needs_root
@pytest.mark.model
def test_quotas_per_principal(daemon_factory):
    """Queued requests, unfinished job items and job bytes are bounded per principal, the
    priority classes a role may use are configured per role, and finished jobs are deleted
    after job_retention_s."""
    d = daemon_factory({"models": {"slots": 1},
                        "daemon": {"socket_group": "nogroup", "drain_timeout_s": 1.0},
                        "scheduler": {"max_queued_per_principal": 2,
                                      "max_job_items_per_principal": 10,
                                      "max_job_bytes_per_principal": 1000,
                                      "job_retention_s": 2.0},
                        "security": {"operators": [NOBODY],
                                     "max_priority": {"operator": "high"}}})
    _open_for_group(d)
    gen = {"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 1}
    with d.client(timeout=30) as c:
        c.load("gemma3-270m")
        long = c.generate("gemma3-270m", "Once upon a time", max_tokens=900, ignore_eos=True)
        next(iter(long))  # the only slot is busy: what follows waits
        # queued requests
        c.request("generate", gen)
        c.request("generate", gen)
        with pytest.raises(InfernoError) as ei:
            c.request("generate", gen)
        e = ei.value
        assert e.code == "quota_exceeded" and e.extra["quota"] == \
            "scheduler.max_queued_per_principal" and e.extra["limit"] == 2, e
        assert e.hint and e.extra["retry_after_ms"] > 0
        other = run_as(NOBODY, NOBODY, lambda: _queue_one(d.endpoint))  # another principal: room
        assert "." in other, other  # a request id (session.id), not an error code
        # priority classes per role
        with pytest.raises(InfernoError) as ei:
            c.request("generate", {**gen, "priority": "vip"})
        assert ei.value.code == "forbidden" and "max_priority" in ei.value.hint, ei.value
        with pytest.raises(InfernoError) as ei:
            c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["a"],
                                      "priority": "vip"})
        assert ei.value.code == "forbidden", ei.value
        # job items and bytes
        job = c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["p"] * 8,
                                        "priority": "high"})
        for prompts, quota in ((["p"] * 3, "items"), (["x" * 600, "y" * 600], "bytes"),
                               (["p"] * 11, "items")):
            with pytest.raises(InfernoError) as ei:
                c.request("jobs.submit", {"model": "gemma3-270m", "prompts": prompts})
            assert ei.value.code == "quota_exceeded", ei.value
            assert ei.value.extra["quota"] == f"scheduler.max_job_{quota}_per_principal"
        assert c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["q", "r"]})[
            "created"]
        # retention: a finished (here cancelled) job is deleted after job_retention_s, and
        # its items no longer count
        c.request("jobs.cancel", {"job_id": job["job_id"]})
        c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["p"] * 8})
        wait_for(lambda: job["job_id"] not in {j["id"] for j in c.request("jobs.list", {})["jobs"]},
              15, "the cancelled job to be deleted")
        with pytest.raises(InfernoError) as ei:
            c.request("jobs.get", {"job_id": job["job_id"]})
        assert ei.value.code == "unknown_job"
        assert len(c.request("jobs.list", {})["jobs"]) == 2  # the unfinished ones stay
        c.cancel(long.request_id)

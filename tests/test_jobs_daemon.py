"""Persistent jobs on the real daemon: kill -9 recovery with idempotency, drain on SIGTERM."""

from __future__ import annotations

import signal
import time

import pytest

from infernod.protocol.errors import InfernoError

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"


def wait_until(fn, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_with_queued_and_running_jobs_completes_each_once(daemon_factory):
    cfg = {"models": {"slots": 2}}
    d = daemon_factory(cfg)
    keys = [f"key-{i}" for i in range(22)]
    with d.client(timeout=30) as c:
        c.load(MODEL)
        ids = [c.jobs_submit(MODEL, [f"Fact number {i}:"], idem=k, max_tokens=24,
                             temperature=0)["job_id"] for i, k in enumerate(keys)]
        q = wait_until(lambda: (q := c.queue_list())["running"] == 2 and q, 30,
                       "2 job items running")
        assert q["waiting"] == 20
    d.kill()

    d2 = daemon_factory(cfg, base=d.base)
    with d2.client(timeout=30, topics=("jobs",)) as c:
        retried = [c.jobs_submit(MODEL, [f"Fact number {i}:"], idem=k, max_tokens=24,
                                 temperature=0) for i, k in enumerate(keys)]
        assert [r["job_id"] for r in retried] == ids
        assert not any(r["created"] for r in retried)
        with pytest.raises(InfernoError) as e:  # same key, different content
            c.jobs_submit(MODEL, ["something else"], idem=keys[0])
        assert e.value.code == "conflict"
        wait_until(lambda: len(c.jobs_list(state="done")) == 22, 120, "22 jobs done")
        jobs = c.jobs_list(limit=1000)
        assert sorted(j["id"] for j in jobs) == sorted(ids)
        for job_id in ids:
            job = c.jobs_get(job_id)
            [item] = job["items"]
            assert item["state"] == "done" and item["text"]
            assert item["stats"]["completion_tokens"] > 0
            assert 1 <= item["attempts"] <= 2
        c._pump(0.1)
        assert any(ev.type == "progress" and ev.body["state"] == "done"
                   for ev in c.events if ev.topic == "jobs")


def test_sigterm_aborts_queued_interactive_checkpoints_jobs_and_exits_0(daemon_factory):
    cfg = {"models": {"slots": 1}}
    d = daemon_factory(cfg)
    with d.client(timeout=30) as c:
        c.load(MODEL)
        running = c.generate(MODEL, "Once upon a time", max_tokens=40, temperature=0)
        wait_until(lambda: c.queue_list()["running"] == 1, 30, "one request running")
        queued = [c.generate(MODEL, f"Question {i}", max_tokens=4) for i in range(2)]
        job = c.jobs_submit(MODEL, ["Alpha", "Beta"], max_tokens=4, priority="low")
        wait_until(lambda: c.queue_list()["waiting"] == 4, 10, "4 requests waiting")
        d.proc.send_signal(signal.SIGTERM)
        for stream in queued:
            with pytest.raises(InfernoError) as e:
                "".join(stream)
            assert e.value.code == "aborted" and "daemon stopping" in e.value.message
        assert "".join(running) and running.stats["completion_tokens"] == 40  # drained
        assert d.proc.wait(30) == 0

    d2 = daemon_factory(cfg, base=d.base)
    with d2.client(timeout=30) as c:
        done = wait_until(lambda: (j := c.jobs_get(job["job_id"]))["state"] == "done" and j,
                          60, "checkpointed job done after restart")
        assert [it["state"] for it in done["items"]] == ["done", "done"]

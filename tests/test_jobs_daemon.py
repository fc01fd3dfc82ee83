"""Persistent jobs on the real daemon: kill -9 recovery with idempotency, drain on SIGTERM,
and ownership: a job is the submitting principal's."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tomllib

import pytest
import tomli_w
from test_security import NOBODY, STRANGER, _open_for_group, needs_root, run_as

from infernod.client import AsyncClient, Event
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
        c.listen(0.1)
        assert any(ev.type == "progress" and ev.body["state"] == "done"
                   for ev in c.take_events() if isinstance(ev, Event) and ev.topic == "jobs")


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


def _jobs_calls(endpoint: str, calls: list[tuple[str, dict]], idem: str | None = None) -> dict:
    """In a forked child: each request in turn; its reply, or its error code."""
    from infernod.client import Client

    out: dict = {}
    with Client(endpoint, timeout=10) as c:
        for i, (type_, body) in enumerate(calls):
            try:
                out[f"{i}:{type_}"] = c.request(type_, body, idem=idem)
            except InfernoError as e:
                out[f"{i}:{type_}"] = e.code
    return out


@needs_root
def test_jobs_belong_to_the_submitting_principal(daemon_factory):
    """The owner is the uid the kernel reports, not the body's `client`: idempotency keys are
    per owner, and only the owner or an operator may read, list or cancel a job."""
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"operators": [NOBODY, STRANGER], "default_role": "none"}})
    _open_for_group(d)
    job = {"model": MODEL, "prompts": ["One"], "max_tokens": 1, "client": "shared"}
    sub = run_as(STRANGER, NOBODY, lambda: _jobs_calls(d.endpoint, [("jobs.submit", job)],
                                                       idem="k"))
    mine = sub["0:jobs.submit"]
    assert mine["created"] and mine["owner"] == f"uid:{STRANGER}", sub
    with d.client(timeout=30) as root:
        # the same key and label from another principal: its own job, not a conflict
        other = root.jobs_submit(MODEL, ["Two"], idem="k", max_tokens=1, client="shared")
        assert other["created"] and other["job_id"] != mine["job_id"]
        assert other["owner"] == f"uid:{os.getuid()}"
        got = root.jobs_get(mine["job_id"])  # an operator reads anyone's
        assert got["owner"] == f"uid:{STRANGER}" and got["client"] == "shared"
        assert {j["id"] for j in root.jobs_list(client="shared")} == \
            {mine["job_id"], other["job_id"]}

        # STRANGER becomes a monitor (SIGHUP): its own jobs only, whatever it names
        cfg = tomllib.loads(d.config_path.read_text())
        cfg["security"].update(operators=[NOBODY], monitors=[STRANGER])
        d.config_path.write_bytes(tomli_w.dumps(cfg).encode())
        os.kill(d.pid, signal.SIGHUP)
        time.sleep(1.0)
        mon = run_as(STRANGER, NOBODY, lambda: _jobs_calls(d.endpoint, [
            ("hello", {}),
            ("jobs.list", {}), ("jobs.list", {"client": "shared"}),
            ("jobs.list", {"owner": other["owner"]}),
            ("jobs.get", {"job_id": other["job_id"]}),
            ("jobs.cancel", {"job_id": other["job_id"]}),
            ("jobs.get", {"job_id": mine["job_id"]}),
            ("jobs.cancel", {"job_id": mine["job_id"]}),
        ]))
        assert mon["0:hello"]["role"] == "monitor", mon
        assert [j["id"] for j in mon["1:jobs.list"]["jobs"]] == [mine["job_id"]], mon
        assert [j["id"] for j in mon["2:jobs.list"]["jobs"]] == [mine["job_id"]], mon
        assert mon["3:jobs.list"] == "forbidden"
        assert mon["4:jobs.get"] == mon["5:jobs.cancel"] == "forbidden"
        assert mon["6:jobs.get"]["id"] == mine["job_id"]
        assert mon["7:jobs.cancel"]["job_id"] == mine["job_id"]
        assert root.jobs_get(other["job_id"])["state"] != "cancelled"
        # NOBODY, an operator, may cancel another principal's job
        op = run_as(NOBODY, NOBODY, lambda: _jobs_calls(d.endpoint, [
            ("jobs.cancel", {"job_id": other["job_id"]})]))
        assert op["0:jobs.cancel"]["job_id"] == other["job_id"], op


def test_jobs_get_pages_its_items(daemon):
    """A big job's results come a page per reply; the CLI follows next_offset to the end."""
    from infernod.cli.jobs import all_items

    with daemon.client(timeout=60) as c:
        job = c.jobs_submit(MODEL, [f"Word {i}:" for i in range(5)], max_tokens=1)
        wait_until(lambda: c.jobs_get(job["job_id"])["state"] == "done", 120, "the job")
        first = c.jobs_get(job["job_id"], limit=2)
        assert [it["index"] for it in first["items"]] == [0, 1]
        assert (first["items_total"], first["next_offset"]) == (5, 2)
        last = c.jobs_get(job["job_id"], offset=4, limit=2)
        assert [it["index"] for it in last["items"]] == [4] and last["next_offset"] is None
        whole = all_items(c, job["job_id"], page=2)
        assert [it["index"] for it in whole["items"]] == [0, 1, 2, 3, 4]
        assert all(it["state"] == "done" for it in whole["items"])
        assert whole["next_offset"] is None
        # The client library's iterator: a page per request, from any offset.
        assert [it["index"] for it in c.job_items(job["job_id"], page=2)] == [0, 1, 2, 3, 4]
        assert [it["index"] for it in c.job_items(job["job_id"], offset=3)] == [3, 4]

    async def pages_async() -> list[int]:
        async with AsyncClient(daemon.endpoint, timeout=60) as ac:
            return [it["index"] async for it in ac.job_items(job["job_id"], page=2)]

    assert asyncio.run(pages_async()) == [0, 1, 2, 3, 4]
    with daemon.client(timeout=60) as c:
        with pytest.raises(InfernoError) as e:
            c.jobs_get(job["job_id"], limit=0)
        assert e.value.code == "bad_request"

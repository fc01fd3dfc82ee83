"""The persistent job store on real SQLite files, including a writer killed with SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infernod.daemon.jobstore import _SCHEMA_V1, SCHEMA_VERSION, JobStore
from infernod.protocol.errors import InfernoError

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    s = JobStore(tmp_path / "jobs.db", clock=clock)
    yield s
    s.close()


def test_wal_mode_and_schema_version(tmp_path: Path, store: JobStore) -> None:
    store.submit("alice", "gemma", ["hi"], {}, "normal", None, 1.0)
    other = sqlite3.connect(tmp_path / "jobs.db")  # the mode is persistent, seen by anyone
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    finally:
        other.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert (tmp_path / "jobs.db-wal").exists()


def test_v1_database_migrates_to_owned_jobs(tmp_path: Path) -> None:
    """v1 scoped jobs by a client-chosen name; v2 by the submitting principal. Old jobs keep
    the name as a label and get an owner no principal has (only operators see them)."""
    db = sqlite3.connect(tmp_path / "jobs.db")
    for stmt in _SCHEMA_V1.split(";"):
        if stmt.strip():
            db.execute(stmt)
    db.execute("INSERT INTO jobs (id, client, model, priority, params, idempotency_key,"
               " request_hash, state, created_at, updated_at)"
               " VALUES ('job-old', 'local', 'gemma', 'low', '{}', 'k1', 'h', 'queued', 1, 1)")
    db.execute("INSERT INTO job_items (job_id, idx, prompt, state) VALUES ('job-old', 0, 'p',"
               " 'queued')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    s = JobStore(tmp_path / "jobs.db")
    try:
        old = s.get("job-old")
        assert (old.owner, old.client, old.idempotency_key) == ("legacy:local", "local", "k1")
        assert [it.prompt for it in old.items] == ["p"]
        assert [j.id for j in s.list(owner="legacy:local")] == ["job-old"]
        assert [j.id for j in s.list(client="local")] == ["job-old"]
        new, created = s.submit("uid:0", "gemma", ["q"], {}, "low", "k1", 2.0, client="local")
        assert created and new.id != "job-old"  # the same key of another owner is no conflict
        assert (new.owner, new.client) == ("uid:0", "local")
        assert new.to_wire()["owner"] == "uid:0" and new.to_wire()["client"] == "local"
        again, created = s.submit("uid:0", "gemma", ["q"], {}, "low", "k1", 3.0, client="x")
        assert not created and again.id == new.id  # the label takes no part in the scope
    finally:
        s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(InfernoError) as ei:
        JobStore(tmp_path / "jobs.db")
    assert ei.value.code == "config_error"


def test_submit_creates_one_item_per_prompt(store: JobStore) -> None:
    job, created = store.submit(
        "alice", "gemma", ["a", "b", "c"], {"max_tokens": 8}, "low", None, 100.0
    )
    assert created and job.state == "queued" and job.priority == "low"
    assert job.params == {"max_tokens": 8} and job.created_at == 100.0
    assert [(it.index, it.prompt, it.state) for it in job.items] == [
        (0, "a", "queued"),
        (1, "b", "queued"),
        (2, "c", "queued"),
    ]
    assert job.counts == {"queued": 3}
    assert store.get(job.id) == job
    assert job.to_wire()["items"][1]["prompt"] == "b"


def test_bad_submissions(store: JobStore) -> None:
    for prompts, priority in (([], "normal"), (["x", 3], "normal"), (["x"], "urgent")):
        with pytest.raises(InfernoError) as ei:
            store.submit("alice", "gemma", prompts, {}, priority, None, 1.0)  # type: ignore[arg-type]
        assert ei.value.code == "bad_request"
    assert store.list() == []


def test_idempotency_key_returns_the_same_job(store: JobStore) -> None:
    first, created = store.submit("alice", "gemma", ["a", "b"], {"t": 1}, "normal", "k1", 1.0)
    again, created_again = store.submit("alice", "gemma", ["a", "b"], {"t": 1}, "normal", "k1", 2.0)
    assert created and not created_again
    assert again.id == first.id and len(store.list()) == 1
    other_client, created = store.submit("bob", "gemma", ["a", "b"], {"t": 1}, "normal", "k1", 3.0)
    assert created and other_client.id != first.id  # keys are per owner
    no_key_1, _ = store.submit("alice", "gemma", ["a"], {}, "normal", None, 4.0)
    no_key_2, _ = store.submit("alice", "gemma", ["a"], {}, "normal", None, 5.0)
    assert no_key_1.id != no_key_2.id
    with pytest.raises(InfernoError) as ei:  # same key, different work: refuse, don't merge
        store.submit("alice", "gemma", ["other"], {"t": 1}, "normal", "k1", 6.0)
    assert ei.value.code == "conflict"


def test_item_lifecycle_results_and_job_state(store: JobStore, clock: Clock) -> None:
    job, _ = store.submit("alice", "gemma", ["a", "b", "c"], {}, "normal", None, 1.0)
    clock.t = 10.0
    assert store.mark_running(job.id, 0)
    assert not store.mark_running(job.id, 0)  # already running
    assert store.get(job.id).state == "running"
    clock.t = 12.0
    assert store.complete_item(job.id, 0, "hello", {"tokens": 5, "tokens_per_s": 40.0})
    assert not store.complete_item(job.id, 0, "again", {})  # the first result wins
    store.mark_running(job.id, 1)
    assert store.fail_item(job.id, 1, "context_exceeded", "prompt too long")
    assert store.get(job.id).state == "running"  # item 2 still queued
    store.mark_running(job.id, 2)
    store.complete_item(job.id, 2, "bye", {"tokens": 2})
    got = store.get(job.id)
    assert got.state == "failed" and got.counts == {"done": 2, "failed": 1}
    it0, it1, it2 = got.items
    assert (it0.text, it0.stats, it0.attempts) == ("hello", {"tokens": 5, "tokens_per_s": 40.0}, 1)
    assert (it0.started_at, it0.finished_at) == (10.0, 12.0)
    assert (it1.state, it1.error_code, it1.error_message) == (
        "failed",
        "context_exceeded",
        "prompt too long",
    )
    assert it2.text == "bye"
    ok, _ = store.submit("alice", "gemma", ["x"], {}, "normal", None, 1.0)
    store.mark_running(ok.id, 0)
    store.complete_item(ok.id, 0, "y", {})
    assert store.get(ok.id).state == "done"


def test_cancel(store: JobStore) -> None:
    job, _ = store.submit("alice", "gemma", ["a", "b", "c"], {}, "normal", None, 1.0)
    store.mark_running(job.id, 0)
    store.mark_running(job.id, 1)
    store.complete_item(job.id, 1, "kept", {})
    assert store.cancel(job.id) == [0, 2]
    got = store.get(job.id)
    assert got.state == "cancelled"
    assert [it.state for it in got.items] == ["cancelled", "done", "cancelled"]
    assert got.items[1].text == "kept"
    assert not store.complete_item(job.id, 0, "late", {})  # a late result does not revive it
    assert not store.mark_running(job.id, 2)
    assert store.cancel(job.id) == []
    assert store.recover() == []


def test_unknown_job(store: JobStore) -> None:
    for call in (
        lambda: store.get("job-nope"),
        lambda: store.cancel("job-nope"),
        lambda: store.mark_running("job-nope", 0),
        lambda: store.complete_item("job-nope", 0, "x", {}),
        lambda: store.fail_item("job-nope", 0, "internal", "x"),
    ):
        with pytest.raises(InfernoError) as ei:
            call()
        assert ei.value.code == "unknown_job"
    job, _ = store.submit("alice", "gemma", ["a"], {}, "normal", None, 1.0)
    with pytest.raises(InfernoError) as ei:
        store.mark_running(job.id, 5)
    assert ei.value.code == "bad_request"


def test_list_filters(store: JobStore) -> None:
    a, _ = store.submit("alice", "gemma", ["1"], {}, "normal", None, 100.0)
    b, _ = store.submit("bob", "qwen", ["2"], {}, "normal", None, 200.0)
    c, _ = store.submit("alice", "qwen", ["3"], {}, "normal", None, 300.0)
    store.mark_running(b.id, 0)
    store.complete_item(b.id, 0, "x", {})
    ids = lambda jobs: [j.id for j in jobs]  # noqa: E731
    assert ids(store.list()) == [c.id, b.id, a.id]  # newest first
    assert ids(store.list(state="done")) == [b.id]
    assert ids(store.list(state="queued")) == [c.id, a.id]
    assert ids(store.list(model="qwen")) == [c.id, b.id]
    assert ids(store.list(owner="alice")) == [c.id, a.id]
    assert ids(store.list(since=200.0)) == [c.id, b.id]
    assert ids(store.list(owner="alice", model="qwen", since=150.0)) == [c.id]
    assert ids(store.list(limit=1)) == [c.id]
    listed = store.list(state="done")[0]
    assert listed.items == () and listed.counts == {"done": 1}
    with pytest.raises(InfernoError) as ei:
        store.list(state="finished")
    assert ei.value.code == "bad_request"


def test_recover_after_close_without_finishing(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "jobs.db"
    s = JobStore(path, clock=clock)
    first, _ = s.submit("alice", "gemma", ["a", "b", "c"], {}, "normal", None, 1.0)
    second, _ = s.submit("bob", "gemma", ["d", "e"], {}, "low", None, 2.0)
    s.mark_running(first.id, 0)
    s.mark_running(first.id, 1)
    s.complete_item(first.id, 1, "done", {})
    s.mark_running(second.id, 1)
    # a write that never committed must not survive the "crash"
    s._db.execute("BEGIN IMMEDIATE")
    s._db.execute("UPDATE job_items SET state = 'done' WHERE job_id = ?", (first.id,))
    s._db.close()

    s2 = JobStore(path, clock=clock)
    try:
        assert s2.recover() == [(first.id, 0), (first.id, 2), (second.id, 0), (second.id, 1)]
        got = s2.get(first.id)
        assert [it.state for it in got.items] == ["queued", "done", "queued"]
        assert got.items[0].attempts == 1 and got.state == "running"
        assert s2.get(second.id).state == "queued"
        assert s2.mark_running(first.id, 0)  # runnable again, at least once
        assert s2.get(first.id).items[0].attempts == 2
    finally:
        s2.close()


_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from infernod.daemon.jobstore import JobStore
s = JobStore(Path(sys.argv[1]))
job, _ = s.submit("alice", "gemma", ["p0", "p1"], {}, "normal", "key-1", 1.0)
s.mark_running(job.id, 0)
print("READY", job.id, flush=True)
n = 0
while True:  # write until killed: every kill lands in or between transactions
    j, _ = s.submit("bulk", "gemma", ["x"] * 50, {"n": n}, "low", None, 2.0)
    s.mark_running(j.id, 0)
    n += 1
    print("W", n, flush=True)
"""


def test_recover_after_sigkill_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(REPO)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY", ready
        job_id = ready[1]
        for _ in range(5):  # the writer is demonstrably in its write loop
            assert proc.stdout.readline().startswith("W")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    s = JobStore(path)
    try:
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recovered = s.recover()
        assert recovered[:2] == [(job_id, 0), (job_id, 1)]  # submission order, running first
        assert len(recovered) == len(set(recovered))
        # each transaction is all-or-nothing: every bulk job has all 50 items
        sizes = {
            r[0]
            for r in s._db.execute(
                "SELECT COUNT(*) FROM job_items GROUP BY job_id HAVING job_id != ?", (job_id,)
            )
        }
        assert sizes <= {50}
        assert not s._db.execute("SELECT 1 FROM job_items WHERE state = 'running'").fetchall()
        again, created = s.submit("alice", "gemma", ["p0", "p1"], {}, "normal", "key-1", 3.0)
        assert not created and again.id == job_id  # a client's retry finds the job
    finally:
        s.close()


def test_store_belongs_to_one_thread(store: JobStore) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            store.list()
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], sqlite3.ProgrammingError)

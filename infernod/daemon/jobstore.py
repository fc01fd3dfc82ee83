"""Persistent jobs: non-interactive prompts that survive a restart and ``kill -9``.

Stored with stdlib ``sqlite3`` in WAL mode in the state directory. A job is one or more prompts
with shared parameters; each prompt is an *item* with its own state and result.

Threading: a :class:`JobStore` belongs to ONE thread, the daemon's job-store worker. Create it
in that thread and call every method from it (``sqlite3``'s default ``check_same_thread``
enforces this). The event loop hands work to that thread and gets answers back with
``loop.call_soon_threadsafe``; no write ever runs on the event loop.

Durability choices:

* ``journal_mode=WAL``: readers (``jobs.list`` from an operator's CLI, a backup) never block
  the writer, and a crash leaves either the old or the new state of each transaction.
* ``synchronous=FULL``: every commit is fsynced, so a job the daemon acknowledged survives a
  power cut, not only a process crash (NORMAL would survive ``kill -9`` but could lose the
  last commits on power loss). Writes are one short transaction per item transition, off the
  event loop, so the extra fsync costs nothing a user sees.
* ``busy_timeout=5000``: another process reading the file (sqlite3 shell, backup) makes a write
  wait briefly instead of failing with SQLITE_BUSY.

Delivery is at-least-once: :meth:`JobStore.recover` puts back every item that was queued or
running when the daemon stopped. The first stored result of an item wins, so an item that runs
twice still has exactly one result.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infernod.paths import private_sqlite
from infernod.protocol.errors import InfernoError
from infernod.protocol.vocabulary import JOB_STATES, PRIORITIES

SCHEMA_VERSION = 2
TERMINAL = frozenset({"done", "failed", "cancelled"})
MAX_LIST = 1000
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL (the constant exists from Python 3.11 on)

_SCHEMA_V1 = """
CREATE TABLE jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    id              TEXT NOT NULL UNIQUE,
    client          TEXT NOT NULL,
    model           TEXT NOT NULL,
    priority        TEXT NOT NULL,
    params          TEXT NOT NULL,                      -- JSON object
    idempotency_key TEXT,
    request_hash    TEXT NOT NULL,                      -- detects a reused key with new content
    state           TEXT NOT NULL,
    created_at      REAL NOT NULL,                      -- wall clock, seconds since the epoch
    updated_at      REAL NOT NULL,
    UNIQUE (client, idempotency_key)
);
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE TABLE job_items (
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    prompt        TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    text          TEXT,
    stats         TEXT,                                 -- JSON object
    error_code    TEXT,
    error_message TEXT,
    started_at    REAL,
    finished_at   REAL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE INDEX job_items_state ON job_items (state);
"""

# v2: a job belongs to the principal that submitted it (``owner``: uid:N or key:NAME, from the
# security layer), which also scopes idempotency keys; ``client`` is only a label now. Jobs
# stored before keep their label; their owner becomes ``legacy:<client>``, which names no
# principal, so only operators see them.
_SCHEMA_V2 = """
ALTER TABLE jobs RENAME COLUMN client TO owner;
ALTER TABLE jobs ADD COLUMN client TEXT;
UPDATE jobs SET client = owner, owner = 'legacy:' || owner
"""

# version reached -> script that brings the previous version there. Append, never edit.
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}


@dataclass(frozen=True, slots=True)
class JobItem:
    """One prompt of a job and, once finished, its result or error."""

    index: int
    prompt: str
    state: str
    attempts: int = 0
    text: str | None = None
    stats: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A job; ``items`` is filled by :meth:`JobStore.get`, empty in :meth:`JobStore.list`
    (which would otherwise load every result of every batch). ``counts`` is always filled."""

    id: str
    client: str | None  # the submitter's label (jobs.submit ``client``), not an identity
    model: str
    priority: str
    params: dict[str, Any]
    idempotency_key: str | None
    state: str
    created_at: float
    updated_at: float
    counts: dict[str, int] = field(default_factory=dict)  # item state -> number of items
    items: tuple[JobItem, ...] = ()
    owner: str = ""  # the principal that submitted it (uid:N, key:NAME)

    def to_wire(self) -> dict[str, Any]:
        """Plain dict for a reply (msgpack-friendly)."""
        body = {
            k: getattr(self, k)
            for k in (
                "id",
                "owner",
                "client",
                "model",
                "priority",
                "params",
                "idempotency_key",
                "state",
                "created_at",
                "updated_at",
                "counts",
            )
        }
        body["items"] = [asdict(it) for it in self.items]
        return body


def job_state(counts: dict[str, int], cancelled: bool = False) -> str:
    """A job's state from its items': done only if every item is done; failed once all are
    finished and any failed; running once any has started; cancelled if an operator said so."""
    if cancelled:
        return "cancelled"
    total = sum(counts.values())
    finished = sum(counts.get(s, 0) for s in TERMINAL)
    if total and finished == total:
        if counts.get("done", 0) == total:
            return "done"
        return "failed" if counts.get("failed", 0) else "cancelled"
    if counts.get("running", 0) or finished:
        return "running"
    return "queued"


class JobStore:
    """The jobs database. Not thread-safe by design: one owner thread (see module docstring)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_sqlite(self.path)  # prompts and outputs: the owner's only (0600, -wal too)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so every transaction takes
        # the write lock up front and a read-then-write (idempotency check) cannot race.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 5000")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise InfernoError(
                "config_error",
                f"{self.path}: cannot enable WAL (got {mode})",
                "put the state directory on a local filesystem",
            )
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise InfernoError(
                "config_error",
                f"{self.path} has schema {version}; this infernod knows up to {SCHEMA_VERSION}",
                "run the newer infernod, or move the jobs database aside",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx():
                # executescript would COMMIT our transaction; run statements one by one.
                for stmt in _MIGRATIONS[target].split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Whatever fails in it, the body or the COMMIT itself (a full
        disk fails at COMMIT, when WAL mode writes the pages), ends in a ROLLBACK: the
        connection is never left inside a transaction, so the next write works as soon as
        there is space again. A full disk is ``storage_full``, nothing of it was written."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(e):
                raise InfernoError(
                    "storage_full",
                    f"{self.path}: the disk is full; nothing of this change was written",
                    "free space on the state directory's filesystem, then retry",
                ) from e
            raise

    def _rollback(self) -> None:
        """SQLite may already have rolled back by itself (it does on SQLITE_FULL); then
        ROLLBACK is an error that changes nothing."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Close the connection (a checkpoint happens on the last close)."""
        self._db.close()

    # ------------------------------------------------------------------ writes
    def submit(
        self,
        owner: str,
        model: str,
        prompts: builtins.list[str],
        params: dict[str, Any],
        priority: str = "normal",
        idempotency_key: str | None = None,
        now_wall: float | None = None,
        client: str | None = None,
        max_items: int = 0,
        max_bytes: int = 0,
    ) -> tuple[Job, bool]:
        """Store a new job of ``owner`` (a principal), or return the owner's existing job with
        the same idempotency key (``created`` False). Reusing a key for different content is
        a ``conflict``. ``client`` is a label, stored and shown, never a scope.

        ``max_items`` / ``max_bytes`` (0 = no limit): the owner's unfinished (queued or
        running) items and their prompt bytes, this job included, may not exceed them
        (``quota_exceeded``); checked in the same transaction as the insert."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InfernoError("bad_request", "a job needs a non-empty list of string prompts")
        if priority not in PRIORITIES:
            raise InfernoError(
                "bad_request",
                f"unknown priority {priority!r}",
                f"use one of {', '.join(PRIORITIES)}",
            )
        try:
            params_json = json.dumps(params, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise InfernoError("bad_request", f"job params are not JSON-serialisable: {e}") from e
        digest = hashlib.sha256(
            json.dumps([model, prompts, params_json, priority]).encode()
        ).hexdigest()
        now = self._clock() if now_wall is None else now_wall
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT id, request_hash FROM jobs WHERE owner = ? AND idempotency_key = ?",
                    (owner, idempotency_key),
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != digest:
                        raise InfernoError(
                            "conflict",
                            f"idempotency key {idempotency_key!r} was used for a different job "
                            f"({row['id']})",
                            "use a new key for new work",
                        )
                    return self._load(row["id"], items=True), False
            if max_items or max_bytes:
                self._check_quota(owner, prompts, max_items, max_bytes)
            job_id = "job-" + secrets.token_hex(8)
            db.execute(
                "INSERT INTO jobs (id, owner, client, model, priority, params, idempotency_key,"
                " request_hash, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, owner, client, model, priority, params_json, idempotency_key, digest,
                 now, now),
            )
            db.executemany(
                "INSERT INTO job_items (job_id, idx, prompt, state) VALUES (?, ?, ?, 'queued')",
                [(job_id, i, p) for i, p in enumerate(prompts)],
            )
            return self._load(job_id, items=True), True

    def _check_quota(self, owner: str, prompts: builtins.list[str], max_items: int,
                     max_bytes: int) -> None:
        n, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(i.prompt AS BLOB))), 0)"
            " FROM job_items i JOIN jobs j ON j.id = i.job_id"
            " WHERE j.owner = ? AND i.state IN ('queued', 'running')",
            (owner,),
        ).fetchone()
        add_items, add_bytes = len(prompts), sum(len(p.encode()) for p in prompts)
        for quota, limit, used, add, unit in (
            ("scheduler.max_job_items_per_principal", max_items, n, add_items, "items"),
            ("scheduler.max_job_bytes_per_principal", max_bytes, size, add_bytes, "bytes"),
        ):
            if limit and used + add > limit:
                hint = ("split the work into smaller jobs" if add > limit else
                        "wait for your unfinished jobs to finish, or cancel some")
                raise InfernoError(
                    "quota_exceeded",
                    f"{owner} has {used} {unit} in unfinished jobs; this job's {add} would "
                    f"pass the limit of {limit} ({quota})",
                    f"{hint}; an operator can raise {quota}",
                    quota=quota, limit=limit, used=used, requested=add,
                )

    def purge_finished(self, before: float, batch: int = 500) -> int:
        """Delete up to ``batch`` finished jobs (done, failed, cancelled) with their items
        whose last change was before ``before`` (wall clock); return how many."""
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled')"
                    " AND updated_at < ? ORDER BY seq LIMIT ?",
                    (before, batch),
                )
            ]
            for job_id in ids:
                db.execute("DELETE FROM job_items WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return len(ids)

    def mark_running(self, job_id: str, index: int) -> bool:
        """A queued item got a slot. False (nothing changed) if it is not queued any more,
        e.g. the job was cancelled while the item waited: the server should not run it."""
        return self._transition(
            job_id,
            index,
            ("queued",),
            "state = 'running', attempts = attempts + 1, started_at = ?",
            (self._clock(),),
        )

    def requeue_item(self, job_id: str, index: int) -> bool:
        """A running item goes back to queued (its runner died): it runs again, and its next
        start is a ``mark_running`` like the first. False if it is not running any more."""
        return self._transition(job_id, index, ("running",), "state = 'queued'", ())

    def complete_item(self, job_id: str, index: int, text: str, stats: dict[str, Any]) -> bool:
        """Store an item's result with its stats. The first result wins: a duplicate run after
        recovery, or a result for a cancelled item, changes nothing and returns False."""
        return self._transition(
            job_id,
            index,
            ("queued", "running"),
            "state = 'done', text = ?, stats = ?, finished_at = ?",
            (text, json.dumps(stats, default=str), self._clock()),
        )

    def fail_item(self, job_id: str, index: int, code: str, message: str) -> bool:
        """Record an item's error (an InfernoError code). Same first-outcome-wins rule."""
        return self._transition(
            job_id,
            index,
            ("queued", "running"),
            "state = 'failed', error_code = ?, error_message = ?, finished_at = ?",
            (code, message, self._clock()),
        )

    def cancel(self, job_id: str) -> builtins.list[int]:
        """Cancel a job. Returns the indexes that were queued or running, which the server
        must remove from the scheduler or stop in the engine. Finished items keep results."""
        now = self._clock()
        with self._tx() as db:
            self._require(job_id)
            active = [
                r[0]
                for r in db.execute(
                    "SELECT idx FROM job_items WHERE job_id = ? AND state IN ('queued', 'running')"
                    " ORDER BY idx",
                    (job_id,),
                )
            ]
            db.execute(
                "UPDATE job_items SET state = 'cancelled', finished_at = ?"
                " WHERE job_id = ? AND state IN ('queued', 'running')",
                (now, job_id),
            )
            state = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if state not in TERMINAL:
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
            return active

    def recover(self) -> builtins.list[tuple[str, int]]:
        """On start: every item that was running goes back to queued (at-least-once), and all
        queued items of live jobs are returned in submission order for the scheduler."""
        now = self._clock()
        with self._tx() as db:
            stale = [
                r[0]
                for r in db.execute("SELECT DISTINCT job_id FROM job_items WHERE state = 'running'")
            ]
            db.execute("UPDATE job_items SET state = 'queued' WHERE state = 'running'")
            for job_id in stale:
                self._refresh_state(job_id, now)
            rows = db.execute(
                "SELECT i.job_id, i.idx FROM job_items i JOIN jobs j ON j.id = i.job_id"
                " WHERE i.state = 'queued' AND j.state != 'cancelled' ORDER BY j.seq, i.idx"
            ).fetchall()
            return [(r[0], r[1]) for r in rows]

    def _transition(
        self,
        job_id: str,
        index: int,
        from_states: tuple[str, ...],
        assignments: str,
        args: tuple[Any, ...],
    ) -> bool:
        now = self._clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT i.state, j.state FROM job_items i JOIN jobs j ON j.id = i.job_id"
                " WHERE i.job_id = ? AND i.idx = ?",
                (job_id, index),
            ).fetchone()
            if row is None:
                self._require(job_id)
                raise InfernoError("bad_request", f"job {job_id} has no item {index}")
            if row[0] not in from_states or row[1] == "cancelled":
                return False
            db.execute(
                f"UPDATE job_items SET {assignments} WHERE job_id = ? AND idx = ?",
                (*args, job_id, index),
            )
            self._refresh_state(job_id, now)
            return True

    def _refresh_state(self, job_id: str, now: float) -> None:
        counts = self._counts(job_id)
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        state = job_state(counts, cancelled=row[0] == "cancelled")
        self._db.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?", (state, now, job_id)
        )

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str, offset: int = 0, limit: int = -1) -> Job:
        """A job with its items (all, or ``limit`` from index ``offset``) and their results.
        ``unknown_job`` if there is no such id."""
        return self._load(job_id, items=True, offset=offset, limit=limit)

    def summary(self, job_id: str) -> Job:
        """A job with its item counts but without items (cheap for progress events)."""
        return self._load(job_id, items=False)

    def _require(self, job_id: str) -> None:
        if self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise InfernoError("unknown_job", f"no job {job_id!r}")

    def _counts(self, job_id: str) -> dict[str, int]:
        return {
            r[0]: r[1]
            for r in self._db.execute(
                "SELECT state, COUNT(*) FROM job_items WHERE job_id = ? GROUP BY state", (job_id,)
            )
        }

    def _load(self, job_id: str, *, items: bool, offset: int = 0, limit: int = -1) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise InfernoError("unknown_job", f"no job {job_id!r}")
        loaded: tuple[JobItem, ...] = ()
        if items:
            loaded = tuple(
                JobItem(
                    index=r["idx"],
                    prompt=r["prompt"],
                    state=r["state"],
                    attempts=r["attempts"],
                    text=r["text"],
                    stats=json.loads(r["stats"]) if r["stats"] else None,
                    error_code=r["error_code"],
                    error_message=r["error_message"],
                    started_at=r["started_at"],
                    finished_at=r["finished_at"],
                )
                for r in self._db.execute(
                    "SELECT * FROM job_items WHERE job_id = ? ORDER BY idx LIMIT ? OFFSET ?",
                    (job_id, limit, offset),
                )
            )
        return Job(
            id=row["id"],
            owner=row["owner"],
            client=row["client"],
            model=row["model"],
            priority=row["priority"],
            params=json.loads(row["params"]),
            idempotency_key=row["idempotency_key"],
            state=row["state"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            counts=self._counts(job_id),
            items=loaded,
        )

    def list(
        self,
        state: str | None = None,
        model: str | None = None,
        client: str | None = None,
        since: float | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> builtins.list[Job]:
        """Jobs newest first, filtered by state, model, owner, client label and creation time
        (wall clock, ``created_at >= since``); at most ``limit`` (1..1000). Items are not
        loaded."""
        if state is not None and state not in JOB_STATES:
            raise InfernoError(
                "bad_request", f"unknown job state {state!r}", f"use one of {', '.join(JOB_STATES)}"
            )
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        for column, value in (("state", state), ("model", model), ("owner", owner),
                              ("client", client)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        sql = "SELECT id FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(max(1, min(MAX_LIST, int(limit))))
        ids = [r[0] for r in self._db.execute(sql, args)]
        return [self._load(job_id, items=False) for job_id in ids]

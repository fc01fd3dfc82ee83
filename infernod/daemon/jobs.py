"""JobService: persistent jobs (``jobs.*`` requests) wired to the scheduler and the engines.

The :class:`~infernod.daemon.jobstore.JobStore` lives in ONE dedicated thread, a single-worker
``ThreadPoolExecutor`` owned here: the store is created in it and every call runs in it, in
submission order, so an item's ``mark_running`` always lands before its ``complete_item``.
The event loop only awaits (or chains callbacks on) the futures.

Flow of one item (request id ``<job_id>:<index>``):

    jobs.submit -> store (thread) -> backlog of its model -> RequestService.submit (the same
    scheduler as interactive work, the job's own class, default ``low``) -> start: mark_running
    -> done: complete_item(text, stats) | fail_item(code, message) -> progress on ``jobs``

Only ``queue_share`` of a model's bounded queue is ever held by job items; the rest of a job
waits in the backlog (it is in SQLite anyway) and is fed as items finish, so a batch of 500
prompts neither bypasses the queue bound nor crowds out interactive requests.

A runner crash (``runner_crashed``: the model's runner process died under the item) sends the
item back to the queue, at most MAX_CRASH_RETRIES times per item; then it fails with that code.

Restart and crash: :meth:`JobService.start` calls ``recover()`` (running items go back to
queued: at-least-once; the first stored result wins, so each item has exactly one result).
On drain nothing more is fed; queued items stay queued in SQLite (the checkpoint) and items
the drain had to abort stay ``running`` there, so the next start requeues both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infernod.daemon.jobstore import Job, JobStore
from infernod.daemon.requests import Kind, Request, State
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.config import Config
    from infernod.daemon.lifecycle import RequestService
    from infernod.daemon.publisher import Publisher

log = logging.getLogger("infernod.daemon.jobstore")

MAX_BACKLOG_ITEMS = 100_000  # job items waiting outside the scheduler, over all models
WRITE_RETRY_S = 1.0  # a job store write refused by a full disk is tried again this often
MAX_CRASH_RETRIES = 3  # runs of one item a runner crash may end before it fails for good
_SUCCESS = ("length", "stop", "eos")
_CHECKPOINTED = ("aborted", "shutting_down")  # while stopping: left for recover()


@dataclass(frozen=True)
class _Pending:
    """A job item waiting in the backlog (not yet handed to the scheduler)."""

    job_id: str
    index: int
    owner: str  # the submitting principal: scheduler fairness, cancel rights
    model: str
    priority: str
    prompt: str
    params: dict[str, Any]

    @property
    def request_id(self) -> str:
        return f"{self.job_id}:{self.index}"


def _pending(job: Job, index: int, prompt: str) -> _Pending:
    return _Pending(job.id, index, job.owner, job.model, job.priority, prompt, job.params)


class JobService:
    """Owns the job-store thread and the job items in flight. Event-loop thread only."""

    def __init__(self, path: Path, gen: RequestService, publisher: Publisher, cfg: Config,
                 render_chat: Callable[[str, str], str]) -> None:
        self.path = path
        self.gen = gen
        self.publisher = publisher
        self.cfg = cfg
        self.render_chat = render_chat  # (model, user text) -> prompt in the chat template
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")
        self._store: JobStore | None = None
        self.ready = asyncio.Event()
        self.backlog: dict[str, deque[_Pending]] = {}
        self.active: dict[str, Request] = {}  # request id -> job items handed to generation
        self._launched: dict[str, _Pending] = {}  # request id -> what it was launched from
        self._crash_retries: dict[str, int] = {}  # request id -> runs a runner crash ended
        self._started: set[str] = set()
        self._pending_writes: set[asyncio.Future] = set()
        # item writes refused by a full disk, retried in order (see _durable)
        self._unwritten: deque[tuple[str, Callable[[], Any], Callable[[Any], None]]] = deque()
        self._unwritten_since: float | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self.stopping = False
        self.closed = False
        self._purger: asyncio.Task | None = None

    # -- the store thread -------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) in the store thread; submitted now, so calls keep their order."""
        fut: Future = self._pool.submit(fn, *args)
        afut = asyncio.wrap_future(fut)
        self._pending_writes.add(afut)
        afut.add_done_callback(self._pending_writes.discard)
        return afut

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise InfernoError("unavailable", "the job store is not open yet", "retry shortly")
        return self._store

    async def start(self) -> None:
        """Open the store (in its thread), requeue what had not finished, start feeding."""
        self._store = await self._call(JobStore, self.path)
        pending = await self._call(self._recover)
        for p in pending:
            self._to_backlog(p)
        self.ready.set()
        self._purger = asyncio.get_running_loop().create_task(self._purge_loop(),
                                                              name="jobs-purge")
        if pending:
            log.info("jobs: recovered %d unfinished items", len(pending))
            self.publisher.publish("jobs", "recovered", {"items": len(pending)})
        self.feed()

    def _recover(self) -> list[_Pending]:  # store thread
        store = self.store
        jobs: dict[str, Job] = {}
        out = []
        for job_id, index in store.recover():
            job = jobs.get(job_id) or jobs.setdefault(job_id, store.get(job_id))
            prompt = next(it.prompt for it in job.items if it.index == index)
            out.append(_pending(job, index, prompt))
        return out

    async def _purge_loop(self) -> None:
        """Delete finished jobs older than ``scheduler.job_retention_s`` (0: keep them)."""
        while True:
            retention = self.cfg.scheduler.job_retention_s
            await asyncio.sleep(min(60.0, max(0.5, retention / 4)) if retention else 60.0)
            if not retention or self.stopping:
                continue
            try:
                await self.purge(time.time() - retention)
            except InfernoError as e:  # storage_full, ...: try again next round
                log.warning("jobs: purging finished jobs failed: %s", e)

    async def purge(self, before: float) -> int:
        """Delete every finished job last changed before ``before``, a batch at a time."""
        total = 0
        while True:
            n = await self._call(self.store.purge_finished, before)
            total += n
            if n < 500:
                break
        if total:
            log.info("jobs: deleted %d finished jobs past their retention", total)
            self.publisher.publish("jobs", "purged", {"jobs": total, "before": before})
        return total

    async def close(self) -> None:
        """After the drain: let pending writes land, close the database, end the thread."""
        self.stopping = True
        if self._purger is not None:
            self._purger.cancel()
        if self._pending_writes:
            await asyncio.gather(*list(self._pending_writes), return_exceptions=True)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._unwritten:  # one last try; what still fails runs again after the restart
            self._retry_unwritten()
            await asyncio.gather(*list(self._pending_writes), return_exceptions=True)
            if self._retry_handle is not None:
                self._retry_handle.cancel()
                self._retry_handle = None
        self.closed = True
        if self._unwritten:
            log.error("jobs: %d item writes could not be recorded (disk full); those items "
                      "run again after the restart", len(self._unwritten))
        if self._store is not None:
            await self._call(self._store.close)
            self._store = None
        self._pool.shutdown(wait=False)

    # -- requests ---------------------------------------------------------------------------
    async def submit(self, owner: str, model: str, prompts: list[str], params: dict[str, Any],
                     priority: str, idem: str | None, client: str | None = None
                     ) -> tuple[Job, bool]:
        """Store a job of principal ``owner`` (idempotency keys are scoped to it);
        ``client`` is the submitter's label only."""
        await asyncio.wait_for(self.ready.wait(), 60)
        if self.stopping:
            raise InfernoError("shutting_down", "the daemon is stopping and admits no new jobs")
        if self.backlog_size() + len(prompts) > MAX_BACKLOG_ITEMS:
            raise InfernoError("overloaded", f"more than {MAX_BACKLOG_ITEMS} job items wait",
                               retry_after_ms=60_000)
        s = self.cfg.scheduler
        job, created = await self._call(self.store.submit, owner, model, prompts, params,
                                        priority, idem, None, client,
                                        s.max_job_items_per_principal,
                                        s.max_job_bytes_per_principal)
        if created:
            for it in job.items:
                self._to_backlog(_pending(job, it.index, it.prompt))
            self.publisher.publish("jobs", "submitted", {
                "job_id": job.id, "owner": owner, "client": client, "model": model,
                "priority": priority, "items": len(job.items)})
            self.feed()
        return job, created

    async def get(self, job_id: str, offset: int = 0, limit: int = -1) -> Job:
        await asyncio.wait_for(self.ready.wait(), 60)
        return await self._call(self.store.get, job_id, offset, limit)

    async def summary(self, job_id: str) -> Job:
        """The job without its items (``unknown_job`` if there is none)."""
        await asyncio.wait_for(self.ready.wait(), 60)
        return await self._call(self.store.summary, job_id)

    async def list(self, **filters: Any) -> list[Job]:
        await asyncio.wait_for(self.ready.wait(), 60)
        return await self._call(lambda: self.store.list(**filters))

    async def cancel(self, job_id: str) -> tuple[Job, int]:
        await asyncio.wait_for(self.ready.wait(), 60)
        active = await self._call(self.store.cancel, job_id)
        for model, q in self.backlog.items():
            self.backlog[model] = deque(p for p in q if p.job_id != job_id)
        for index in active:
            rid = f"{job_id}:{index}"
            if rid in self.gen.requests:
                self.gen.cancel(rid)
        job = await self._call(self.store.summary, job_id)
        self.publisher.publish("jobs", "cancelled", {"job_id": job_id, "state": job.state,
                                                     "counts": job.counts})
        self.feed()
        return job, len(active)

    # -- feeding the scheduler --------------------------------------------------------------
    def backlog_size(self) -> int:
        return sum(len(q) for q in self.backlog.values())

    def _to_backlog(self, p: _Pending) -> None:
        self.backlog.setdefault(p.model, deque()).append(p)

    def queue_share(self) -> int:
        """Most job items one model's queue may hold: half of the tighter bound."""
        s = self.cfg.scheduler
        return max(1, min(s.max_queue_per_model, s.max_queue_total) // 2)

    def feed(self) -> None:
        """Hand backlog items to the scheduler while their model's job share has room."""
        if self.stopping or not self.ready.is_set():
            return
        share = self.queue_share()
        for model, q in self.backlog.items():
            queued = sum(1 for g in self.active.values() if g.model == model
                         and g.state is State.QUEUED)
            while q and queued < share:
                p = q.popleft()
                try:
                    self._launch(p)
                except InfernoError as e:
                    if e.code in ("overloaded", "shutting_down"):
                        q.appendleft(p)  # stays in SQLite as queued; retried on the next feed
                        break
                    log.warning("job item %s not started: %s", p.request_id, e)
                    self._write(p.job_id, p.index, "failed", self.store.fail_item,
                                p.job_id, p.index, e.code, e.message)
                    continue
                queued += 1

    def _launch(self, p: _Pending) -> None:
        rid = p.request_id
        if rid in self.gen.requests:
            return
        params = dict(p.params)
        chat = bool(params.pop("chat", False))
        prompt = self.render_chat(p.model, p.prompt) if chat else p.prompt
        s = self.cfg.scheduler
        now = time.monotonic()
        gen = Request(kind=Kind.JOB_ITEM, request_id=rid, session=p.owner, client=p.owner,
                      principal=p.owner, model=p.model, prompt=prompt, body=params,
                      priority=p.priority, submitted=now, deadline=None,
                      timeout_s=min(params.get("timeout_s") or s.timeout_s, s.max_timeout_s),
                      stall_timeout_s=min(params.get("stall_timeout_s") or s.stall_timeout_s,
                                          s.max_stall_timeout_s),
                      topic=f"tokens.{rid}", job=(p.job_id, p.index), text=[],
                      on_start=self._on_start, on_done=self._on_done)
        self.gen.submit(gen)
        self.active[rid] = gen
        self._launched[rid] = p

    # -- item events (from RequestService, on the loop) -------------------------------------
    def _on_start(self, gen: Request) -> None:
        if gen.request_id in self._started:  # resumed after a preemption
            return
        self._started.add(gen.request_id)
        job_id, index = gen.job or ("", 0)
        store = self.store

        def started(ran: bool) -> None:
            if not ran and gen.request_id in self.gen.requests:
                self.gen.cancel(gen.request_id)  # the job was cancelled while it waited

        self._durable(f"job {job_id} item {index}: start",
                      lambda: store.mark_running(job_id, index), started)

    def _on_done(self, gen: Request, reason: str, final: dict[str, Any]) -> None:
        rid = gen.request_id
        self.active.pop(rid, None)
        self._started.discard(rid)
        pending = self._launched.pop(rid, None)
        job_id, index = gen.job or ("", 0)
        if reason == "runner_crashed" and pending is not None and not self.stopping:
            retries = self._crash_retries.get(rid, 0) + 1
            if retries <= MAX_CRASH_RETRIES:
                self._crash_retries[rid] = retries
                self._requeue(pending, retries)
                return
        self._crash_retries.pop(rid, None)
        if reason in _SUCCESS:
            self._write(job_id, index, "done", self.store.complete_item, job_id, index,
                        "".join(gen.text or []), final)
        elif reason == "cancelled" or (self.stopping and reason in _CHECKPOINTED):
            pass  # cancelled: the store knows already; stopping: recover() requeues it
        else:
            message = gen.abort[1] if gen.abort else reason
            self._write(job_id, index, "failed", self.store.fail_item, job_id, index, reason,
                        message)
        self.feed()

    def _requeue(self, p: _Pending, retries: int) -> None:
        """The item's runner died under it: back to queued in the store, then to the front of
        its model's backlog (the store thread runs the write before the next mark_running)."""
        log.warning("job item %s: its runner crashed; running it again (retry %d of %d)",
                    p.request_id, retries, MAX_CRASH_RETRIES)
        store = self.store

        def requeue_and_summarise() -> tuple[bool, Job]:  # store thread
            return store.requeue_item(p.job_id, p.index), store.summary(p.job_id)

        def requeued(result: tuple[bool, Job]) -> None:
            changed, job = result
            self.publisher.publish("jobs", "progress", {
                "job_id": p.job_id, "index": p.index, "item_state": "queued",
                "recorded": changed, "state": job.state, "counts": job.counts,
                "retry": retries, "reason": "runner_crashed"})

        self._durable(f"job {p.job_id} item {p.index}: requeue", requeue_and_summarise,
                      requeued)
        self.backlog.setdefault(p.model, deque()).appendleft(p)
        self.feed()

    def _write(self, job_id: str, index: int, item_state: str, fn: Callable[..., bool],
               *args: Any) -> None:
        store = self.store

        def write_and_summarise() -> tuple[bool, Job]:  # store thread
            changed = fn(*args)
            return changed, store.summary(job_id)

        def written(result: tuple[bool, Job]) -> None:
            changed, job = result
            self.publisher.publish("jobs", "progress", {
                "job_id": job_id, "index": index, "item_state": item_state,
                "recorded": changed, "state": job.state, "counts": job.counts})

        self._durable(f"job {job_id} item {index}: {item_state}", write_and_summarise,
                      written)

    def _durable(self, what: str, work: Callable[[], Any],
                 landed: Callable[[Any], None]) -> None:
        """Run an item's state write in the store thread. When the disk is full the write
        (a finished item's result, too) is kept in memory, in order, and tried again every
        WRITE_RETRY_S until there is space: a full disk delays results, it does not lose
        them. Other failures are logged; recover() requeues the item at the next start."""
        fut = self._call(work)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            e = f.exception()
            if e is None:
                if self._unwritten_since is not None and not self._unwritten:
                    log.warning("jobs: the job store is writable again; every kept result "
                                "is recorded")
                    self._unwritten_since = None
                landed(f.result())
                return
            if isinstance(e, InfernoError) and e.code == "storage_full" and not self.closed:
                if self._unwritten_since is None:
                    self._unwritten_since = time.monotonic()
                    log.warning("jobs: %s; results are kept in memory and written when "
                                "there is space again", e.message)
                self._unwritten.append((what, work, landed))
                self._schedule_retry()
                return
            log.error("%s: store write failed: %r", what, e)

        fut.add_done_callback(done)

    def _schedule_retry(self) -> None:
        if self._retry_handle is None:
            self._retry_handle = asyncio.get_running_loop().call_later(
                WRITE_RETRY_S, self._retry_unwritten)

    def _retry_unwritten(self) -> None:
        self._retry_handle = None
        batch, self._unwritten = self._unwritten, deque()
        for what, work, landed in batch:  # the store thread runs them in this order
            self._durable(what, work, landed)

    def unwritten(self) -> int:
        """Item writes waiting for disk space (``inferno status``: held.unwritten_job_writes)."""
        return len(self._unwritten)

"""`inferno jobs ...`, `inferno queue` and `inferno reprioritize`: the scheduler and the
persistent jobs from the command line. Registered into :mod:`infernod.cli`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infernod.cli.common import EXIT_OK, EXIT_USAGE, _client, _err, _print_json, command
from infernod.protocol.bodies import QueueSnapshot
from infernod.protocol.vocabulary import JOB_STATES, PRIORITIES


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


@command("jobs")
def cmd_jobs(args: argparse.Namespace) -> int:
    return _ACTIONS[args.action](args)


def jobs_submit(args: argparse.Namespace) -> int:
    prompts = list(args.prompt or [])
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        _err("jobs submit needs at least one PROMPT or --file")
        return EXIT_USAGE
    params = {"priority": args.priority, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "chat": args.chat or None}
    with _client(args) as c:
        r = c.jobs_submit(args.model, prompts, idem=args.idem, **params)
    if args.json:
        _print_json(r)
    else:
        note = "" if r["created"] else " (already submitted with this key)"
        print(f"{r['job_id']}: {r['items']} item(s), {r['priority']}, {r['state']}{note}")
    return EXIT_OK


def jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        jobs = c.jobs_list(state=args.state, model=args.model, limit=args.limit)
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    if not jobs:
        print("no jobs")
    now = time.time()
    for j in jobs:
        print(f"{j['id']}  {j['state']:9} {j['priority']:6} {j['model']:16} "
              f"{_age(now - j['created_at']):>5} ago  {_counts(j['counts'])}")
    return EXIT_OK


def all_items(c: Any, job_id: str, page: int | None = None) -> dict[str, Any]:
    """A job with every item, fetched a page per request (``jobs.get`` pages its items)."""
    job = c.jobs_get(job_id, limit=page)
    if job.get("next_offset") is not None:
        job["items"] += c.job_items(job_id, offset=job["next_offset"], page=page)
        job["next_offset"] = None
    return job


def jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = all_items(c, args.job_id)
    if args.json:
        _print_json(job)
        return EXIT_OK
    print(f"{job['id']}: {job['state']} ({_counts(job['counts'])}), model {job['model']}, "
          f"{job['priority']}, owner {job.get('owner')}, client {job['client']}")
    for it in job["items"]:
        head = f"[{it['index']}] {it['state']}"
        if it["state"] == "done":
            print(f"{head}: {it['text']}")
        elif it["error_code"]:
            print(f"{head}: {it['error_code']}: {it['error_message']}")
        else:
            print(head)
    return EXIT_OK


def jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.jobs_cancel(args.job_id)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['job_id']}: {r['state']} ({r['cancelled_items']} item(s) stopped)")
    return EXIT_OK


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": jobs_submit, "list": jobs_list, "get": jobs_get, "cancel": jobs_cancel}


@command("queue")
def cmd_queue(args: argparse.Namespace) -> int:
    with _client(args) as c:
        q: QueueSnapshot = c.queue_list(args.model)
    if args.json:
        _print_json(q)
        return EXIT_OK
    print(f"{q['running']} running, {q['waiting']} waiting ({q['level']})")
    for r in q["items"]:
        cls = r["class"] if r["class"] == r["effective_class"] else \
            f"{r['class']}->{r['effective_class']}"
        dl = "-" if r["deadline_in_s"] is None else f"{r['deadline_in_s']:.0f}s"
        pos = "" if r["position"] is None else f"#{r['position']}"
        print(f"{r['id']:28} {r['kind']:8} {r['state']:10} {pos:>5} {cls:12} "
              f"{r['model']:16} age {_age(r['age_s']):>5} deadline {dl:>5} "
              f"tokens {r['tokens']:>5} {r['client']}")
    return EXIT_OK


@command("reprioritize")
def cmd_reprioritize(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.reprioritize(args.request_id, args.priority)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['request_id']}: now {r['priority']} ({r['state']})")
    return EXIT_OK


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Called by cli.build_parser with its ``add(name, help, json_flag)`` helper."""
    jp = add("jobs", "persistent jobs (survive restarts)", json_flag=False)
    jsub = jp.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = jsub.add_parser("submit", help="store a job: one item per prompt")
    sp.add_argument("model")
    sp.add_argument("prompt", nargs="*")
    sp.add_argument("--file", help="one prompt per line ('-' reads stdin)")
    sp.add_argument("--priority", choices=PRIORITIES, help="default low")
    sp.add_argument("--idem", help="idempotency key: a retried submit returns the same job")
    sp.add_argument("--max-tokens", type=int)
    sp.add_argument("--temperature", type=float)
    sp.add_argument("--chat", action="store_true", help="use the model's chat template")
    sp = jsub.add_parser("list", help="list jobs, newest first")
    sp.add_argument("--state", choices=JOB_STATES)
    sp.add_argument("--model")
    sp.add_argument("--limit", type=int, default=100)
    jsub.add_parser("get", help="one job with its results").add_argument("job_id")
    jsub.add_parser("cancel", help="cancel a job").add_argument("job_id")
    for p in jsub.choices.values():
        p.add_argument("--json", action="store_true", help="machine-readable output")
    add("queue", "running and waiting requests").add_argument("--model")
    sp = add("reprioritize", "change a request's class (operator)")
    sp.add_argument("request_id")
    sp.add_argument("priority", choices=PRIORITIES)

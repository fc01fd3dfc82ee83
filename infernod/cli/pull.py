"""``inferno pull SOURCE [--name NAME] [--sha256 HEX]``, ``--cancel NAME|ID``, ``--list``.

The daemon downloads; this command asks it to, then follows the pull's ``progress`` events
on the ``models`` topic with a progress bar (bytes, rate, ETA) until the ``pulled`` or
``pull_failed`` event. ``models.pulls`` is asked every couple of seconds as well, so a lost
event never leaves the command waiting. Ctrl-C stops following, not the download (that is
``--cancel``): a pull started from a laptop goes on on the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from infernod.cli.common import EXIT_OK, EXIT_USAGE, _bytes, _client, _err, command
from infernod.client import Client, Event
from infernod.protocol.errors import InfernoError

POLL_S = 2.0
DONE = ("done", "failed", "cancelled")


def add_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("pull", "download a model onto the daemon's host (URL, hf://org/repo/file.gguf "
                     "or org/repo:QUANT)")
    sp.add_argument("source", nargs="?", help="https://.../model.gguf, hf://org/repo/file.gguf"
                    " or org/repo:QUANT (e.g. ggml-org/gemma-3-270m-GGUF:Q8_0)")
    sp.add_argument("--name", help="model name (default from the file name)")
    sp.add_argument("--sha256", help="the file's hex sha256 (default: the hub's, if any)")
    sp.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                    help="fail when no byte arrives for this long (default 60)")
    sp.add_argument("--cancel", metavar="NAME|ID", help="cancel a pull in progress")
    sp.add_argument("--list", action="store_true", help="list pulls in progress and recent")
    sp.add_argument("--detach", action="store_true",
                    help="start the pull and return; progress is on the models topic")


@command("pull")
def cmd_pull(args: argparse.Namespace) -> int:
    if args.cancel or args.list:
        with _client(args) as c:
            if args.cancel:
                r = c.request("models.pull.cancel", {"pull": args.cancel})
                print(json.dumps(r) if args.json else f"{r['model']}: {r['state']}")
            else:
                pulls = c.request("models.pulls")["pulls"]
                print(json.dumps(pulls) if args.json else "\n".join(
                    _line(p) for p in pulls) or "no pulls")
        return EXIT_OK
    if not args.source:
        _err("pull: give SOURCE (or --cancel NAME|ID, or --list)")
        return EXIT_USAGE
    body: dict[str, Any] = {"source": args.source}
    for key, value in (("name", args.name), ("sha256", args.sha256),
                       ("stall_timeout_s", args.stall_timeout)):
        if value is not None:
            body[key] = value
    with _client(args, topics=("models",)) as c:
        c.wait_welcome()
        r = c.request("models.pull", body, timeout=max(args.timeout, 180.0))
        if args.detach:
            print(json.dumps(r) if args.json else
                  f"pulling {r['model']} ({r['pull_id']}): 'inferno pull --list' follows it")
            return EXIT_OK
        final = _follow(c, r, show=sys.stderr.isatty() and not args.json)
    if final.get("state") != "done":
        err = final.get("error") or {"code": "internal", "message": "the pull ended"}
        raise InfernoError.from_wire(err)
    print(json.dumps(final) if args.json else
          f"pulled {final['model']} ({final.get('path')}, {_bytes(final.get('total_bytes'))},"
          f" sha256 {final.get('sha256')})")
    return EXIT_OK


def _line(p: dict[str, Any]) -> str:
    done, total = p.get("done_bytes", 0), p.get("total_bytes")
    pct = f" {done * 100 // total}%" if total else ""
    return (f"{p['pull_id']}  {p['model']:<24} {p['state']:<11}{pct} {_bytes(done)} of "
            f"{_bytes(total)}  {p['source']}")


def _follow(c: Client, start: dict[str, Any], show: bool) -> dict[str, Any]:
    """Waits for the pull to end, drawing a progress bar from its events."""
    pull_id, state = start["pull_id"], dict(start)
    bar = _Bar(state) if show else None
    next_poll = time.monotonic() + POLL_S
    try:
        while state.get("state") not in DONE:
            for ev in c.event_batch(0.25):
                if isinstance(ev, Event) and ev.body.get("pull_id") == pull_id:
                    if ev.type == "progress":
                        state.update(ev.body)
                    elif ev.body.get("event") in ("pulled", "pull_failed"):
                        next_poll = 0.0  # the final state (path, sha256): ask for it
            if time.monotonic() >= next_poll:
                for p in c.request("models.pulls")["pulls"]:
                    if p["pull_id"] == pull_id:
                        state.update(p)
                next_poll = time.monotonic() + POLL_S
            if bar is not None:
                bar.update(state)
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
        _err(f"stopped following; the daemon goes on pulling {state.get('model')} "
             f"('inferno pull --cancel {pull_id}' stops it)")
        raise
    if bar is not None:
        bar.stop()
    return state


class _Bar:
    """A rich progress bar on stderr: bytes, rate, ETA."""

    def __init__(self, state: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=False)
        self.task = self.progress.add_task(f"pulling {state['model']}",
                                           total=state.get("total_bytes"))
        self.progress.start()

    def update(self, state: dict[str, Any]) -> None:
        desc = f"{state.get('state', 'pulling')} {state['model']}"
        self.progress.update(self.task, completed=state.get("done_bytes", 0),
                             total=state.get("total_bytes"), description=desc)

    def stop(self) -> None:
        self.progress.stop()

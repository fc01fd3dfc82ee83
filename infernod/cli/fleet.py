"""`inferno fleet`: every daemon client.toml names, side by side, in one short table.

Each daemon is asked at once (a thread each, every wait bounded by ``--timeout``, at most
3 s), so one that is down costs the table its timeout, not one per daemon. A daemon that
does not answer is a row with its state and the reason, never an error for the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

from infernod.client import Client
from infernod.client.config import DaemonEntry, fleet
from infernod.protocol.errors import DaemonUnavailable, InfernoError

PROBE_TIMEOUT_S = 3.0


def add_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    add("fleet", "every daemon in client.toml at a glance (state, models, queue, tok/s, GPU)")


def probe(entry: DaemonEntry, timeout: float) -> dict[str, Any]:
    """One daemon's row: ``name``, ``endpoint`` and ``state`` always; ``reason`` when it is
    not connected; the figures when it is."""
    row: dict[str, Any] = {"name": entry.name, "endpoint": entry.endpoint or "local"}
    try:
        curve = entry.curve()
        with Client(entry.endpoint, timeout=timeout, name="inferno-fleet", curve=curve) as c:
            st = c.status()
            try:
                sample: dict[str, Any] | None = c.metrics().get("sample")
            except InfernoError:  # telemetry off or not allowed: the rest still stands
                sample = None
    except DaemonUnavailable as e:
        return {**row, "state": "unreachable", "reason": f"{e.message} ({e.hint})"
                if e.hint else e.message}
    except InfernoError as e:
        state = "refused" if e.code in ("forbidden", "unauthenticated") else "error"
        return {**row, "state": state, "reason": f"{e.code}: {e.message}"}
    queue = st.get("queue") or {}
    gpus = ((sample or {}).get("gpu") or {}).get("gpus") or []
    return {**row, "state": "connected", "reason": None,
            "version": st.get("version"), "boot_id": st.get("boot_id"),
            "uptime_s": st.get("uptime_s"),
            "models_loaded": [m.get("name") for m in st.get("models_loaded") or []],
            "models_failed": [m.get("name") for m in st.get("models_failed") or []],
            "queued": queue.get("queued"), "running": queue.get("running"),
            "backpressure": queue.get("level"), "tokens_per_s": st.get("tokens_per_s"),
            "runner_crashes_1h": st.get("runner_crashes_1h"),
            "gpus": [{"index": g.get("index"), "name": g.get("name"),
                      "utilization_pct": g.get("utilization_gpu_pct"),
                      "memory_used_bytes": g.get("memory_used_bytes"),
                      "memory_total_bytes": g.get("memory_total_bytes")} for g in gpus]}


def probe_all(entries: list[DaemonEntry], timeout: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any] | None] = [None] * len(entries)

    def one(i: int, entry: DaemonEntry) -> None:
        try:
            rows[i] = probe(entry, timeout)
        except Exception as e:  # a row for every daemon, whatever went wrong in one
            rows[i] = {"name": entry.name, "endpoint": entry.endpoint or "local",
                       "state": "error", "reason": str(e) or type(e).__name__}

    threads = [threading.Thread(target=one, args=(i, e), daemon=True, name=f"fleet-{e.name}")
               for i, e in enumerate(entries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    return [r if r is not None else {"name": e.name, "endpoint": e.endpoint or "local",
                                     "state": "unreachable", "reason": "no answer in time"}
            for r, e in zip(rows, entries, strict=True)]


def cmd_fleet(args: argparse.Namespace) -> int:
    endpoints = [args.endpoint] if args.endpoint else None
    entries = [DaemonEntry(e.name, e.endpoint, args.server_key or e.server_key,
                           args.client_key or e.client_key) for e in fleet(endpoints)]
    rows = probe_all(entries, min(args.timeout, PROBE_TIMEOUT_S))
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _table(rows)
    return 0 if all(r["state"] == "connected" for r in rows) else 1


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    # the name and state are never cut; long model lists fold onto more lines
    for col in ("daemon", "state", "up", "models", "queue", "tok/s", "GPU", "crashes"):
        t.add_column(col, justify="right" if col in ("up", "queue", "tok/s",
                                                     "crashes") else "left",
                     no_wrap=col != "models", overflow="fold",
                     min_width=16 if col == "models" else None)
    notes: list[str] = []
    for r in rows:
        if r["state"] != "connected":
            t.add_row(r["name"], f"[red]{r['state']}[/]", *[""] * 6)
            notes.append(f"{r['name']} ({r['endpoint']}): {r['reason']}")
            continue
        queue = f"{r['running']}+{r['queued']}" + (
            f" {r['backpressure']}" if r["backpressure"] not in (None, "normal") else "")
        gpu = " ".join(f"{g['utilization_pct'] or 0:.0f}% {_gib(g['memory_used_bytes'])}/"
                       f"{_gib(g['memory_total_bytes'])}G" for g in r["gpus"]) or "-"
        for name in r["models_failed"]:
            notes.append(f"{r['name']}: {name} failed (inferno --daemon {r['name']} models)")
        t.add_row(r["name"], "[green]connected[/]", _uptime(r["uptime_s"]),
                  "\n".join(r["models_loaded"]) or "-", queue,
                  f"{r['tokens_per_s'] or 0:.1f}", gpu, str(r["runner_crashes_1h"] or 0))
    console = Console(highlight=False)
    console.print(t)
    console.print("queue: running+waiting; crashes: runner crashes in the last hour",
                  style="dim")
    for n in notes:
        console.print(n, style="dim", markup=False)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.0f}"


def _uptime(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s"

"""`inferno stats`, `inferno metrics` and `inferno bench`: telemetry from the command line.
Registered into :mod:`infernod.cli`; the benchmark itself lives in :mod:`infernod.cli.bench`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infernod.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _bytes,
    _client,
    _err,
    _print_json,
    command,
)
from infernod.protocol.bodies import MetricsSample

WINDOWS = ("1m", "5m", "1h", "all")
KEY_METRICS = ("ttft_ms", "itl_ms", "e2e_ms", "queue_wait_ms", "tokens_per_s")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(highlight=False, stderr=stderr)


def _num(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"



# -- stats ----------------------------------------------------------------------------------
@command("stats")
def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        summary = c.stats()
    if args.json:
        _print_json(summary)
        return EXIT_OK
    con = _console()
    overall = summary.get("overall") or {}
    if not overall:
        con.print("no finished requests yet")
        return EXIT_OK
    con.print(_stats_table(f"all requests, window {args.window}", overall, args.window))
    for key, groups in sorted(summary.items()):
        if key.startswith("by_") and isinstance(groups, dict):
            for value, metrics in sorted(groups.items()):
                picked = {m: metrics[m] for m in KEY_METRICS if m in metrics}
                con.print(_stats_table(f"{key[3:]} = {value}, window {args.window}", picked,
                                       args.window))
    return EXIT_OK


def _stats_table(title: str, metrics: dict[str, Any], window: str) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for name in ("count", "mean", "p50", "p95", "p99", "max"):
        t.add_column(name, justify="right")
    t.add_column("trend")
    t.add_column("anomaly")
    for name, m in metrics.items():
        w = m.get(window) or {}
        flag = "[red]yes[/] " + _num(m.get("anomaly_ratio"), 2) + "x" if m.get("anomaly") else ""
        t.add_row(name, str(w.get("count", 0)), _num(w.get("mean")), _num(w.get("p50")),
                  _num(w.get("p95")), _num(w.get("p99")), _num(w.get("max")),
                  m.get("trend") or "-", flag)
    return t


# -- metrics --------------------------------------------------------------------------------
@command("metrics")
def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sample: MetricsSample | None = c.metrics()
    if args.json:
        _print_json(sample)
        return EXIT_OK
    con = _console()
    if sample is None:
        con.print("no sample yet")
        return EXIT_OK
    from rich.table import Table

    s = sample["system"]
    p = s["process"]
    t = Table("host", "", title="system", title_justify="left", show_header=False)
    load = s["load_avg"]
    t.add_row("CPU", f"{_num(s['cpu_pct'])} % of {s['cpu_count']} cores")
    t.add_row("load", " ".join(f"{x:.2f}" for x in load) if load else "-")
    t.add_row("RAM", f"{_bytes(s['memory_used_bytes'])} used of "
                     f"{_bytes(s['memory_total_bytes'])} ({_num(s['memory_pct'])} %)")
    t.add_row("swap", f"{_bytes(s['swap_used_bytes'])} of {_bytes(s['swap_total_bytes'])}")
    t.add_row("infernod", f"pid {p['pid']}, RSS {_bytes(p['rss_bytes'])}, "
                          f"CPU {_num(p['cpu_pct'])} %, {p['threads']} threads, "
                          f"{p['open_fds']} fds")
    con.print(t)
    gpu = sample["gpu"]
    if not gpu["available"]:
        con.print(f"GPU: none ({gpu['reason']})")
        return EXIT_OK
    g_t = Table("gpu", "name", "util %", "memory", "temp C", "power W", "SM MHz", "P", "fan %",
                title=f"GPUs (driver {gpu.get('driver_version')})", title_justify="left")
    energy = sample["energy_j"]
    for g in gpu["gpus"]:
        power = _num(g["power_w"])
        if g["power_limit_w"] is not None:
            power += f" / {_num(g['power_limit_w'], 0)}"
        if str(g["index"]) in energy:
            power += f" ({energy[str(g['index'])] / 3600:,.2f} Wh)"
        g_t.add_row(str(g["index"]), str(g["name"]), _num(g["utilization_gpu_pct"], 0),
                    f"{_bytes(g['memory_used_bytes'])} / {_bytes(g['memory_total_bytes'])}",
                    _num(g["temperature_c"], 0), power, _num(g["clock_sm_mhz"], 0),
                    "-" if g["performance_state"] is None else f"P{g['performance_state']}",
                    _num(g["fan_pct"], 0))
    con.print(g_t)
    return EXIT_OK


# -- bench ----------------------------------------------------------------------------------
@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from infernod.cli import bench

    try:
        clients = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        clients = []
    if not clients or min(clients) < 1 or args.max_tokens < 1 or args.requests_per_client < 1:
        _err("bench: --clients needs positive integers (e.g. 1,2,4,8); --max-tokens and "
             "--requests-per-client must be >= 1")
        return EXIT_USAGE
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())
        except (OSError, ValueError) as e:
            _err(f"bench: cannot read baseline {args.baseline}: {e}")
            return EXIT_USAGE
    from rich import progress as rp

    with rp.Progress(rp.TextColumn("bench {task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                     console=_console(stderr=True), transient=True) as prog:
        def progress(total: int) -> Callable[[], None]:
            task = prog.add_task(args.model, total=total)
            return lambda: prog.advance(task)

        report = bench.run_bench(lambda: _client(args), model=args.model, clients=clients,
                                 requests_per_client=args.requests_per_client,
                                 max_tokens=args.max_tokens, progress=progress)
    regressions = bench.compare(report, baseline, args.threshold) if baseline else []
    if baseline is not None:
        report["baseline"] = {"file": args.baseline, "date": baseline.get("date"),
                              "threshold_pct": args.threshold, "regressions": regressions}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.html:
        bench.write_html(report, args.html, baseline, regressions)
    con = _console()
    con.print(bench.table(report))
    for r in report["runs"]:
        if r.get("error_example"):
            con.print(f"[yellow]{r['clients']} clients: {r['errors']} errors, e.g. "
                      f"{r['error_example']}[/]")
    if baseline is not None:
        if not regressions:
            con.print(f"no regression against {args.baseline} (threshold {args.threshold:g} %)")
        for g in regressions:
            con.print(f"[red]REGRESSION[/] {g['clients']} clients: {g['metric']} "
                      f"{g['current']:,.2f} vs baseline {g['baseline']:,.2f} "
                      f"({g['change_pct']:+.1f} %)")
    failed = any(r["errors"] for r in report["runs"])
    return EXIT_FAILED if regressions or failed else EXIT_OK


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Called by cli.build_parser with its ``add(name, help, json_flag)`` helper."""
    sp = add("stats", "latency percentiles computed in the daemon")
    sp.add_argument("--window", choices=WINDOWS, default="5m", help="window shown (default 5m)")
    add("metrics", "the latest system and GPU sample")
    from infernod.cli.bench import DEFAULT_CLIENTS, DEFAULT_MODEL

    sp = add("bench", "measure latency and throughput with concurrent clients",
             json_flag=False)
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                    help="concurrency levels, comma-separated (default 1,2,4,8)")
    sp.add_argument("--max-tokens", type=int, default=64, help="tokens per request (fixed)")
    sp.add_argument("--requests-per-client", type=int, default=4)
    sp.add_argument("--json", metavar="FILE", help="write the JSON report here")
    sp.add_argument("--baseline", metavar="FILE", help="earlier JSON report to compare with")
    sp.add_argument("--threshold", type=float, default=10.0, metavar="PCT",
                    help="regression threshold in percent (default 10)")
    sp.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")


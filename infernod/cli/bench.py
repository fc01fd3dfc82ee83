"""`inferno bench`: load the daemon with 1, 2, 4, ... concurrent clients and report latencies.

Each level starts N threads, each with its own :class:`~infernod.client.Client` (clients are
not thread-safe), released together by a barrier. Every client sends the same fixed prompts
(greedy, ``ignore_eos``, a fixed ``max_tokens``), so two runs on one machine do the same work.
Latencies are measured where a user feels them, in the client:

* TTFT: ``generate`` sent to the first text received;
* ITL: gap between consecutive text deltas as received;
* E2E: ``generate`` sent to the stream's end.

Throughput: ``aggregate_tokens_per_s`` = completion tokens of the level / its wall time;
``per_client_tokens_per_s`` = the mean over clients of their tokens / their own wall time.

The JSON report is a contract for scripts (``SCHEMA_VERSION``); ``--baseline`` compares a
run with an earlier report, ``--html`` writes a self-contained page with inline SVG charts.
Only the client library is used: no backend import, like any user's script.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infernod.client import Client
from infernod.protocol.errors import DaemonUnavailable, InfernoError

SCHEMA_VERSION = 1
DEFAULT_MODEL = "gemma3-270m"
DEFAULT_CLIENTS = (1, 2, 4, 8)

# Fixed prompt set: short, varied openings so prefix reuse does not make every request free.
PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village,",
    "The most important rule of software engineering is",
    "Translate to German: Good morning, how are you?",
    "def fibonacci(n):",
)

# metric key in a run -> (higher is worse?, label)
REGRESSION_CHECKS: tuple[tuple[str, str | None, bool], ...] = (
    ("aggregate_tokens_per_s", None, False),
    ("ttft_ms", "p50", True),
    ("itl_ms", "p50", True),
)


@dataclass
class _ClientResult:
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    span_s: float = 0.0
    last_error: str | None = None


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 with linear interpolation between closest ranks (numpy's default)."""
    out: dict[str, float | None] = {}
    data = sorted(values)
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        if not data:
            out[name] = None
            continue
        pos = q * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out[name] = round(data[lo] + (data[hi] - data[lo]) * (pos - lo), 3)
    return out


def _one_request(c: Client, model: str, prompt: str, max_tokens: int,
                 res: _ClientResult) -> None:
    t0 = time.perf_counter()
    stream = c.generate(model, prompt, max_tokens=max_tokens, temperature=0.0, seed=1,
                        ignore_eos=True)
    first: float | None = None
    last = t0
    for _ in stream:
        t = time.perf_counter()
        if first is None:
            first = t
        else:
            res.itl_ms.append((t - last) * 1000)
        last = t
    end = time.perf_counter()
    if first is not None:
        res.ttft_ms.append((first - t0) * 1000)
    res.e2e_ms.append((end - t0) * 1000)
    res.tokens += int((stream.stats or {}).get("completion_tokens") or 0)


def run_level(make_client: Callable[[], Client], model: str, clients: int,
              requests_per_client: int, max_tokens: int,
              on_request_done: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """One concurrency level: ``clients`` threads, ``requests_per_client`` requests each."""
    barrier = threading.Barrier(clients + 1)
    results = [_ClientResult() for _ in range(clients)]

    def worker(i: int) -> None:
        res = results[i]
        try:
            with make_client() as c:
                c.wait_welcome()
                barrier.wait(timeout=120)
                t_start = time.perf_counter()
                for k in range(requests_per_client):
                    prompt = PROMPTS[(i * requests_per_client + k) % len(PROMPTS)]
                    res.requests += 1
                    try:
                        _one_request(c, model, prompt, max_tokens, res)
                    except (InfernoError, DaemonUnavailable) as e:
                        res.errors += 1
                        res.last_error = f"{e.code}: {e.message}"
                    on_request_done()
                res.span_s = time.perf_counter() - t_start
        except threading.BrokenBarrierError:
            res.last_error = "another client failed to connect"
        except (InfernoError, DaemonUnavailable) as e:  # could not connect at all
            res.last_error = f"{e.code}: {e.message}"
            res.errors += requests_per_client
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), name=f"bench-client-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    return summarize_level(clients, results, wall_s)


def summarize_level(clients: int, results: Sequence[_ClientResult],
                    wall_s: float) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    per_client = [r.tokens / r.span_s for r in results if r.span_s > 0]
    errors = [r.last_error for r in results if r.last_error]
    return {
        "clients": clients,
        "requests": sum(r.requests for r in results),
        "tokens": tokens,
        "errors": sum(r.errors for r in results),
        "wall_s": round(wall_s, 3),
        "aggregate_tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "per_client_tokens_per_s": round(sum(per_client) / len(per_client), 3)
        if per_client else None,
        "ttft_ms": percentiles([v for r in results for v in r.ttft_ms]),
        "itl_ms": percentiles([v for r in results for v in r.itl_ms]),
        "e2e_ms": percentiles([v for r in results for v in r.e2e_ms]),
        **({"error_example": errors[0]} if errors else {}),
    }


# -- the machine and the report -------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(sample: dict[str, Any] | None) -> dict[str, Any]:
    """The daemon's host as its latest metrics sample describes it (CPU name from here)."""
    system = (sample or {}).get("system") or {}
    gpus = ((sample or {}).get("gpu") or {}).get("gpus") or []
    ram = system.get("memory_total_bytes")
    if ram is None:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = None
    return {
        "cpu": cpu_name(),
        "cores": system.get("cpu_count") or os.cpu_count(),
        "ram": ram,
        "gpu": ", ".join(str(g.get("name")) for g in gpus) or None,
    }


def run_bench(make_client: Callable[[], Client], *, model: str, clients: Sequence[int],
              requests_per_client: int, max_tokens: int,
              progress: Callable[[int], Callable[[], None]] | None = None) -> dict[str, Any]:
    """Warm the model up, run every level, return the JSON report.

    ``progress(total)`` may return a callback called once per finished request."""
    with make_client() as c:
        hello = c.hello()
        c.load(model)
        c.wait_welcome()
        for _ in c.generate(model, PROMPTS[0], max_tokens=2, temperature=0.0):
            pass  # warm-up, not measured
        sample = c.metrics()
    total = sum(n * requests_per_client for n in clients)
    tick = progress(total) if progress is not None else (lambda: None)
    runs = [run_level(make_client, model, n, requests_per_client, max_tokens, tick)
            for n in clients]
    return {
        "schema": SCHEMA_VERSION,
        "runs": runs,
        "model": model,
        "max_tokens": max_tokens,
        "requests_per_client": requests_per_client,
        "machine": machine_info(sample),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "version": hello.get("version"),
    }


def compare(report: dict[str, Any], baseline: dict[str, Any],
            threshold_pct: float) -> list[dict[str, Any]]:
    """Regressions of ``report`` against ``baseline``, level by level (same client count):
    lower aggregate tok/s, or higher p50 TTFT/ITL, by more than ``threshold_pct``."""
    base_runs = {r.get("clients"): r for r in baseline.get("runs", [])}
    found = []
    for run in report.get("runs", []):
        base = base_runs.get(run["clients"])
        if base is None:
            continue
        for key, stat, higher_is_worse in REGRESSION_CHECKS:
            cur = run.get(key) if stat is None else (run.get(key) or {}).get(stat)
            old = base.get(key) if stat is None else (base.get(key) or {}).get(stat)
            if not isinstance(cur, (int, float)) or not isinstance(old, (int, float)) or old <= 0:
                continue
            change = (cur - old) / old * 100
            worse = change if higher_is_worse else -change
            if worse > threshold_pct:
                found.append({"clients": run["clients"],
                              "metric": key if stat is None else f"{key}.{stat}",
                              "current": cur, "baseline": old, "change_pct": round(change, 1)})
    return found


# -- rendering ------------------------------------------------------------------------------
def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _trio_s(p: dict[str, Any] | None) -> str:
    """The same in seconds with one decimal (end-to-end latencies run to seconds)."""
    p = p or {}
    return "/".join(_f(None if p.get(k) is None else p[k] / 1000, 1)
                    for k in ("p50", "p95", "p99")).replace(",", "")


def _trio(p: dict[str, Any] | None) -> str:
    """p50/p95/p99 in one narrow cell, whole milliseconds (the JSON keeps the decimals), so
    the table fits 80 columns over SSH or in a pipe."""
    p = p or {}
    return "/".join(_f(p.get(k), 0) for k in ("p50", "p95", "p99")).replace(",", "")


def table(report: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    m = report.get("machine") or {}
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1),
              title=f"inferno bench: {report.get('model')}, max_tokens "
                    f"{report.get('max_tokens')}, {m.get('cores')} cores, GPU "
                    f"{m.get('gpu') or 'none'}",
              caption="p50/p95/p99 measured in the client; TTFT and ITL in ms")
    rows = [(str(r["clients"]), str(r["requests"]), str(r["errors"]),
             _f(r["aggregate_tokens_per_s"]), _f(r["per_client_tokens_per_s"]),
             _trio(r["ttft_ms"]), _trio(r["itl_ms"]), _trio_s(r["e2e_ms"]))
            for r in report["runs"]]
    heads = ("clients", "reqs", "errs", "tok/s", "per client", "TTFT", "ITL", "E2E s")
    for i, col in enumerate(heads):
        width = max([len(col), *(len(row[i]) for row in rows)])
        t.add_column(col, justify="right", no_wrap=True, min_width=width)
    for row in rows:
        t.add_row(*row)
    return t


_COLORS = ("#d9480f", "#1971c2", "#2f9e44", "#7048e8")


def svg_chart(title: str, xs: Sequence[Any], series: Sequence[tuple[str, Sequence[Any], bool]],
              unit: str) -> str:
    """A line chart as inline SVG. ``series``: (name, values aligned with xs, dashed)."""
    w, h, left, right, top, bottom = 620, 300, 64, 150, 36, 44
    pw, ph = w - left - right, h - top - bottom
    values = [v for _, vs, _ in series for v in vs if isinstance(v, (int, float))]
    ymax = max(values) * 1.1 if values and max(values) > 0 else 1.0
    n = max(len(xs), 1)

    def px(i: int) -> float:
        return left + (pw * (i + 0.5) / n)

    def py(v: float) -> float:
        return top + ph - ph * v / ymax

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="{e(title)}">',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{e(title)}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>']
    for k in range(5):
        v = ymax * k / 4
        y = py(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{v:,.3g}</text>')
    for i, x in enumerate(xs):
        out.append(f'<text x="{px(i):.1f}" y="{top + ph + 16}" font-size="11" '
                   f'text-anchor="middle">{e(str(x))}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" font-size="11" '
               f'text-anchor="middle">concurrent clients</text>')
    out.append(f'<text x="14" y="{top + ph / 2:.1f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">{e(unit)}</text>')
    for s_i, (name, vs, dashed) in enumerate(series):
        color = _COLORS[s_i % len(_COLORS)]
        pts = [(px(i), py(v)) for i, v in enumerate(vs) if isinstance(v, (int, float))]
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       f'stroke-width="2"{dash}/>')
        for (x, y), v in zip(pts, [v for v in vs if isinstance(v, (int, float))], strict=True):
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">'
                       f'<title>{e(name)}: {v:,.2f} {e(unit)}</title></circle>')
        ly = top + 14 + 18 * s_i
        out.append(f'<line x1="{left + pw + 14}" y1="{ly - 4}" x2="{left + pw + 34}" '
                   f'y2="{ly - 4}" stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{left + pw + 40}" y="{ly}" font-size="11">{e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def write_html(report: dict[str, Any], path: str | Path, baseline: dict[str, Any] | None = None,
               regressions: Sequence[dict[str, Any]] = ()) -> None:
    """A self-contained report: inline CSS and SVG, no scripts, nothing fetched."""
    e = html.escape
    runs = report["runs"]
    xs = [r["clients"] for r in runs]
    base = {r.get("clients"): r for r in (baseline or {}).get("runs", [])}

    def col(key: str, stat: str | None, source: dict[Any, dict] | None = None) -> list[Any]:
        rows = [source.get(x) or {} for x in xs] if source is not None else runs
        return [r.get(key) if stat is None else (r.get(key) or {}).get(stat) for r in rows]

    charts = []
    thr = [("aggregate", col("aggregate_tokens_per_s", None), False),
           ("per client", col("per_client_tokens_per_s", None), False)]
    if baseline:
        thr.append(("baseline", col("aggregate_tokens_per_s", None, base), True))
    charts.append(svg_chart("Throughput", xs, thr, "tokens/s"))
    for key, title in (("ttft_ms", "Time to first token"), ("itl_ms", "Inter-token latency"),
                       ("e2e_ms", "End-to-end latency")):
        series = [(stat, col(key, stat), False) for stat in ("p50", "p95", "p99")]
        if baseline:
            series.append(("baseline p50", col(key, "p50", base), True))
        charts.append(svg_chart(title, xs, series, "ms"))
    m = report.get("machine") or {}
    ram = m.get("ram")
    rows = "".join(
        f"<tr><td>{r['clients']}</td><td>{r['requests']}</td><td>{r['errors']}</td>"
        f"<td>{_f(r['aggregate_tokens_per_s'])}</td><td>{_f(r['per_client_tokens_per_s'])}</td>"
        f"<td>{_trio(r['ttft_ms'])}</td><td>{_trio(r['itl_ms'])}</td>"
        f"<td>{_trio(r['e2e_ms'])}</td></tr>" for r in runs)
    reg = ""
    if baseline is not None:
        items = "".join(
            f"<li>{g['clients']} clients: {e(g['metric'])} {g['current']:,.2f} vs "
            f"{g['baseline']:,.2f} ({g['change_pct']:+.1f} %)</li>" for g in regressions)
        reg = (f'<h2>Against the baseline ({e(str(baseline.get("date")))})</h2>'
               + (f'<ul class="bad">{items}</ul>' if items else "<p>No regression.</p>"))
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>inferno bench: {e(str(report.get('model')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
.bad {{ color: #c92a2a; }}
svg {{ margin: 1em 1em 0 0; background: #fafafa; }}
</style></head><body>
<h1>inferno bench: {e(str(report.get('model')))}</h1>
<p>{e(str(report.get('date')))} &middot; infernod {e(str(report.get('version')))} &middot;
max_tokens {report.get('max_tokens')} &middot; {report.get('requests_per_client')} requests per
client &middot; CPU {e(str(m.get('cpu')))} ({m.get('cores')} cores) &middot; RAM
{f"{ram / 2**30:.1f} GiB" if isinstance(ram, (int, float)) else "?"} &middot; GPU
{e(str(m.get('gpu') or 'none'))}</p>
{reg}
<table><tr><th>clients</th><th>requests</th><th>errors</th><th>tok/s</th><th>tok/s/client</th>
<th>TTFT ms p50/p95/p99</th><th>ITL ms p50/p95/p99</th><th>E2E ms p50/p95/p99</th></tr>
{rows}</table>
<div>{''.join(charts)}</div>
<p>Latencies measured in the client: TTFT from sending <code>generate</code> to the first
text, ITL between text deltas, E2E to the end of the stream.</p>
</body></html>
"""
    Path(path).write_text(doc)

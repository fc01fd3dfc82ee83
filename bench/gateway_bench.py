"""The HTTP gateway's cost, and Inferno over HTTP against llama.cpp's own server, in one run.

Sides, all on this machine, all with the default model (Gemma 3 270M Q4_K_M):

* ``zmq``: infernod through the client library (``AsyncClient``), 8 slots;
* ``gateway``: the same daemon through ``inferno-gateway`` (``POST /v1/completions``,
  streamed);
* ``llama-server``: llama.cpp's server built from the llama.cpp that llama-cpp-python vendors
  (``bench/compare.py --build-llama`` builds it; ``--llama-bin DIR`` points elsewhere), with
  ``-np 8`` and the same context per slot, same ``/v1/completions`` request;
* ``llama-cpp-python``: its OpenAI-compatible server (``python -m llama_cpp.server``, which
  serves one request at a time), with the same model, threads and context, from the bench's
  own venv (bench/lcp_venv.py makes it once: the same portable wheel plus
  ``llama-cpp-python[server]``'s dependencies, never the product's) or ``--python-server``;
  skipped with the reason when neither can run it.

The HTTP sides share one load generator (aiohttp, one kept-alive connection per client, SSE
parsed as it arrives); the ZeroMQ side runs in the same process and event loop. Work: 64-token
greedy completions (``ignore_eos``, a distinct prompt per request so no side reuses a cached
prefix), one client, then 8 concurrent clients. Every round measures every side, the order
rotating from round to round, so a busy machine's drift hits all sides. One-client requests
go in turns (``--singles`` per side and round: every side one request, then every side the
next, who goes first rotating), and the one-stream ratios (gateway / ZeroMQ, gateway /
llama-server) are the median of the request-by-request ratios: a slow moment of a shared
machine then moves one pair, not the result. The 8-client ratios are taken within a round
and the table shows their median. TTFT is request sent to first text received (the first
SSE chunk with text, the first text the client library yields); the gateway's TTFT overhead
comes from ``--ttft-pairs`` short completions per round sent in turns through the gateway
and the ZeroMQ client, the median of the pairwise differences; single-stream tok/s is the
decode rate after the first token; the 8-client figure is all tokens over the wall time of
the round. The load average is recorded before and after.

    .venv/bin/python bench/gateway_bench.py [--rounds 3] [--json out.json]

``--vip REPS`` measures instead the goal "with all slots busy, a vip request's TTFT stays
within 2x its idle TTFT" through the gateway: a 4-token ``priority: vip`` completion alone,
then again while 8 ``normal`` streams hold all 8 slots (each already streaming), the order
alternating, REPS times; it prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import DaemonProcess  # noqa: E402
from gateway_harness import GatewayProcess  # noqa: E402

from infernod.client import AsyncClient  # noqa: E402

MODEL = "gemma3-270m"
TOKENS = 64  # per completion (--max-tokens)
TTFT_TOKENS = 2  # the short completions the TTFT overhead is measured with
CLIENTS = 8
N_CTX = 512  # per slot, on every server: prompt + 64 tokens fit with room
THREADS = os.cpu_count() or 2
WORDS = ["Apples", "Rivers", "Engines", "Castles", "Planets", "Forests", "Cities", "Songs"]
CACHE = Path.home() / ".cache" / "inferno" / "bench"

Run = dict[str, float]  # one request: ttft_ms, tokens, start, first, end


def prompt(i: int) -> str:
    """Distinct prompts with hardly a shared prefix (bench/compare.py's)."""
    return (f"{str(i).zfill(4)[::-1]} {WORDS[i % len(WORDS)]}: here is a short story about a "
            "traveller who")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(proc: subprocess.Popen[bytes], url: str, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not answering {url} after {timeout}s")


# -- one request per side -------------------------------------------------------------------
async def http_stream(session: aiohttp.ClientSession, url: str, i: int,
                      extra: dict[str, Any], n: int) -> Run:
    """One streamed completion from an OpenAI-compatible ``/v1/completions``. A kept-alive
    connection the server closed while idle is retried once on a new one, as SDKs do."""
    try:
        return await _http_stream(session, url, i, extra, n)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        return await _http_stream(session, url, i, extra, n)


async def _http_stream(session: aiohttp.ClientSession, url: str, i: int,
                       extra: dict[str, Any], n: int) -> Run:
    body = {"model": MODEL, "prompt": prompt(i), "max_tokens": n, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage: int | None = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue  # read on to the body's end, as SDKs do: the connection is kept
            ev = json.loads(data)
            if ev.get("usage"):
                usage = int(ev["usage"].get("completion_tokens") or 0) or usage
            if any(c.get("text") for c in ev.get("choices") or []):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    if not first:
        raise RuntimeError(f"{url}: no text streamed")
    return {"ttft_ms": (first - t0) * 1000, "tokens": usage or chunks, "chunks": chunks,
            "start": t0, "first": first, "end": last}


async def zmq_stream(client: AsyncClient, i: int, n: int) -> Run:
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    stream = await client.generate(MODEL, prompt(i), max_tokens=n, temperature=0,
                                   ignore_eos=True)
    async for text in stream:
        if text:
            last = time.perf_counter()
            first = first or last
            chunks += 1
    n = int((stream.stats or {}).get("completion_tokens") or chunks)
    return {"ttft_ms": (first - t0) * 1000, "tokens": n, "chunks": chunks, "start": t0,
            "first": first, "end": last}


class Side:
    """A server under test: ``one(client_index, request_index, max_tokens)`` streams one completion on
    that client's own connection."""

    def __init__(self, name: str, one: Callable[[int, int, int], Awaitable[Run]],
                 close: Callable[[], Awaitable[None]]) -> None:
        self.name, self.one, self.close = name, one, close
        self.single: list[Run] = []
        self.single_rate: list[float] = []
        self.multi: list[Run] = []
        self.multi_rate: list[float] = []
        self.ttft: list[list[float]] = []  # per round: the short requests' TTFTs (ms)


async def http_side(name: str, url: str, extra: dict[str, Any]) -> Side:
    timeout = aiohttp.ClientTimeout(total=600)
    sessions = [aiohttp.ClientSession(timeout=timeout,
                                      connector=aiohttp.TCPConnector(limit=1))
                for _ in range(CLIENTS)]

    async def one(c: int, i: int, n: int = 0) -> Run:
        return await http_stream(sessions[c], url, i, extra, n or TOKENS)

    async def close() -> None:
        for s in sessions:
            await s.close()
    return Side(name, one, close)


async def zmq_side(endpoint: str) -> Side:
    clients = [AsyncClient(endpoint, timeout=600, name="gateway-bench")
               for _ in range(CLIENTS)]
    for c in clients:
        await c.wait_welcome(timeout=30)

    async def one(c: int, i: int, n: int = 0) -> Run:
        return await zmq_stream(clients[c], i, n or TOKENS)

    async def close() -> None:
        for c in clients:
            c.close()
    return Side("zmq", one, close)


# -- measuring ------------------------------------------------------------------------------
def decode_rate(r: Run) -> float:
    return (r["tokens"] - 1) / (r["end"] - r["first"]) if r["end"] > r["first"] else 0.0


async def measure_singles(sides: list[Side], base: int, singles: int) -> None:
    """``singles`` one-client requests per side, in turns (who goes first rotates), so the
    k-th request of every side meets the same moment of a busy machine: their decode rates
    are compared pairwise (:func:`pair_ratios`)."""
    rates: dict[str, list[float]] = {s.name: [] for s in sides}
    for k in range(singles):
        for i, side in enumerate(sides[k % len(sides):] + sides[:k % len(sides)]):
            r = await side.one(0, base + k * len(sides) + i, 0)
            side.single.append(r)
            rates[side.name].append(decode_rate(r))
    for side in sides:
        side.single_rate.append(statistics.median(rates[side.name]))


async def measure_clients(side: Side, base: int) -> None:
    runs = await asyncio.gather(*(side.one(c, base + c, 0) for c in range(CLIENTS)))
    side.multi.extend(runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    side.multi_rate.append(sum(r["tokens"] for r in runs) / wall)


def pair_ratios(a: Side, b: Side, singles: int) -> tuple[float, list[float]]:
    """``a``'s single-stream decode rate over ``b``'s, request by request (measured in
    turns): the median over every pair, and each round's median."""
    pairs = [decode_rate(x) / decode_rate(y) for x, y in zip(a.single, b.single, strict=True)]
    rounds = [statistics.median(pairs[k:k + singles]) for k in range(0, len(pairs), singles)]
    return statistics.median(pairs), [round(x, 3) for x in rounds]


async def measure_ttft(pair: list[Side], base: int, n: int) -> None:
    """``n`` short completions on each side of ``pair``, one after the other and in turns
    (who goes first alternates), so the two sides' k-th requests meet the same moment of
    a busy machine: their TTFTs are compared pairwise."""
    for side in pair:
        side.ttft.append([])
    for k in range(n):
        for side in (pair if k % 2 == 0 else pair[::-1]):
            r = await side.one(0, base + 2 * k + (side is pair[1]), TTFT_TOKENS)
            side.ttft[-1].append(r["ttft_ms"])


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary(side: Side) -> dict[str, Any]:
    return {"single_tokens_per_s": statistics.median(side.single_rate),
            "single_ttft_ms_p50": pct([r["ttft_ms"] for r in side.single], 50),
            "single_ttft_ms_p99": pct([r["ttft_ms"] for r in side.single], 99),
            "clients8_tokens_per_s": statistics.median(side.multi_rate),
            "clients8_ttft_ms_p50": pct([r["ttft_ms"] for r in side.multi], 50),
            "clients8_ttft_ms_p99": pct([r["ttft_ms"] for r in side.multi], 99),
            "tokens_per_request": sorted({int(r["tokens"]) for r in side.single + side.multi}),
            "rounds_single_tokens_per_s": [round(x, 1) for x in side.single_rate],
            "rounds_clients8_tokens_per_s": [round(x, 1) for x in side.multi_rate]}


def ratios(gw: Side, zmq: Side, singles: int) -> dict[str, Any]:
    """gateway / zmq: one stream request by request (pairs measured in turns), 8 clients
    within each round; the medians."""
    single_median, single = pair_ratios(gw, zmq, singles)
    multi = [g / z for g, z in zip(gw.multi_rate, zmq.multi_rate, strict=True)]
    # TTFT overhead: the gateway's TTFT minus the ZeroMQ client's, for each pair of short
    # requests sent back to back (measure_ttft); the median over every pair of every round,
    # and each round's median beside it
    pairs = [[g - z for g, z in zip(gr, zr, strict=True)]
             for gr, zr in zip(gw.ttft, zmq.ttft, strict=True)]
    over = [statistics.median(p) for p in pairs]
    # the earlier estimate, kept to compare: per round, the median TTFT of the few 64-token
    # single-stream requests through the gateway minus the ZeroMQ client's
    singles_over = [
        statistics.median(r["ttft_ms"] for r in gw.single[k * singles:(k + 1) * singles])
        - statistics.median(r["ttft_ms"] for r in zmq.single[k * singles:(k + 1) * singles])
        for k in range(len(gw.single_rate))]
    return {"single_tokens_per_s": single_median,
            "clients8_tokens_per_s": statistics.median(multi),
            "ttft_overhead_ms_p50": statistics.median(d for p in pairs for d in p),
            "ttft_pairs": sum(len(p) for p in pairs),
            "gateway_ttft_ms_p50": statistics.median(t for r in gw.ttft for t in r),
            "zmq_ttft_ms_p50": statistics.median(t for r in zmq.ttft for t in r),
            "rounds_single": single,
            "rounds_clients8": [round(x, 3) for x in multi],
            "rounds_ttft_overhead_ms": [round(x, 2) for x in over],
            "ttft_overhead_ms_from_singles": statistics.median(singles_over),
            "rounds_ttft_overhead_ms_from_singles": [round(x, 2) for x in singles_over]}


# -- starting the servers -------------------------------------------------------------------
def model_path() -> Path:
    from conftest import _default_model_path

    return _default_model_path()


def llama_bin(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    import llama_cpp

    return CACHE / f"build-{llama_cpp.__version__}-portable" / "bin"


def start_llama_server(binary: Path, model: Path, log: Path) -> tuple[subprocess.Popen[bytes],
                                                                       str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-m", str(model), "-c", str(N_CTX * CLIENTS), "-np", str(CLIENTS),
         "-t", str(THREADS), "-tb", str(THREADS), "--host", "127.0.0.1", "--port", str(port),
         "--alias", MODEL],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/health", "llama-server")
    return proc, url


def start_python_server(python: str, model: Path, log: Path) -> tuple[subprocess.Popen[bytes],
                                                                       str]:
    port = free_port()
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
         "--n_ctx", str(N_CTX), "--n_threads", str(THREADS), "--n_threads_batch",
         str(THREADS), "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/v1/models", "llama-cpp-python's server")
    return proc, url


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the run --------------------------------------------------------------------------------
async def run(args: argparse.Namespace, urls: dict[str, str], endpoint: str) -> dict[str, Any]:
    sides = [await zmq_side(endpoint),
             await http_side("gateway", urls["gateway"], {"ignore_eos": True})]
    if "llama-server" in urls:
        sides.append(await http_side("llama-server", urls["llama-server"],
                                     {"ignore_eos": True}))
    if "llama-cpp-python" in urls:
        sides.append(await http_side("llama-cpp-python", urls["llama-cpp-python"], {}))
    try:
        for s in sides:  # warm: the first request's allocations, each client's connection
            await s.one(0, 9000, 8)
            await asyncio.gather(*(s.one(c, 9001 + c, 8) for c in range(CLIENTS)))
        base = 0
        for rnd in range(args.rounds):
            order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
            if rnd % 2:
                order.reverse()
            await measure_singles(order, base, args.singles)
            base += len(order) * args.singles
            for s in order:
                await measure_clients(s, base)
                base += CLIENTS
            await measure_ttft(sides[:2] if rnd % 2 == 0 else sides[1::-1], base,
                               args.ttft_pairs)
            base += 2 * args.ttft_pairs
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{s.name} {s.single_rate[-1]:.0f}/{s.multi_rate[-1]:.0f} tok/s"
                for s in sides), flush=True)
    finally:
        for s in sides:
            await s.close()
    by = {s.name: s for s in sides}
    result = {"sides": {s.name: summary(s) for s in sides},
              "gateway_vs_zmq": ratios(by["gateway"], by["zmq"], args.singles)}
    if "llama-server" in by:
        gw, ls = by["gateway"], by["llama-server"]
        single, rounds = pair_ratios(gw, ls, args.singles)
        multi = [g / x for g, x in zip(gw.multi_rate, ls.multi_rate, strict=True)]
        result["gateway_vs_llama_server"] = {
            "single_tokens_per_s": single, "rounds_single": rounds,
            "clients8_tokens_per_s": statistics.median(multi),
            "rounds_clients8": [round(x, 3) for x in multi]}
        single, rounds = pair_ratios(by["zmq"], ls, args.singles)
        result["zmq_vs_llama_server"] = {"single_tokens_per_s": single, "rounds_single": rounds}
    return result


# -- a vip's TTFT with every slot busy (--vip) ------------------------------------------------
VIP_BUSY_TOKENS = 2000  # the normal streams that fill the slots outlast any measurement


async def _queue_empty(client: AsyncClient, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while (await client.queue_list())["items"]:
        if time.monotonic() > end:
            raise RuntimeError("the daemon still runs requests the bench left")
        await asyncio.sleep(0.05)


async def vip_run(reps: int, url: str, endpoint: str) -> dict[str, Any]:
    """A ``vip`` request's TTFT through the gateway, idle and with all slots busy with
    ``normal`` streams (each already streaming), alternating idle and busy ``reps`` times;
    the busy streams are dropped after each busy measurement (the gateway cancels them).
    The vip's prompt is as long as the others' and distinct each time."""
    timeout = aiohttp.ClientTimeout(total=600)
    watcher = AsyncClient(endpoint, timeout=60, name="gateway-bench")
    await watcher.wait_welcome(timeout=30)
    vip_session = aiohttp.ClientSession(timeout=timeout)
    idle: list[float] = []
    busy: list[float] = []
    base = 20000
    try:
        await http_stream(vip_session, url, base, {"priority": "vip"}, 4)  # warm
        for rep in range(reps):
            for state in (("idle", "busy") if rep % 2 == 0 else ("busy", "idle")):
                base += CLIENTS + 1
                if state == "idle":
                    r = await http_stream(vip_session, url, base, {"priority": "vip"}, 4)
                    idle.append(r["ttft_ms"])
                    continue
                started = [asyncio.get_running_loop().create_future() for _ in range(CLIENTS)]
                fillers = [asyncio.ensure_future(_filler(url, base + 1 + c, started[c], timeout))
                           for c in range(CLIENTS)]
                try:
                    await asyncio.wait_for(asyncio.gather(*started), 300)
                    r = await http_stream(vip_session, url, base, {"priority": "vip"}, 4)
                    busy.append(r["ttft_ms"])
                finally:
                    for f in fillers:
                        f.cancel()
                    await asyncio.gather(*fillers, return_exceptions=True)
                    await _queue_empty(watcher)
            print(f"vip rep {rep + 1}/{reps}: idle {idle[-1]:.1f} ms, busy {busy[-1]:.1f} ms",
                  flush=True)
    finally:
        await vip_session.close()
        watcher.close()
    return {"reps": reps, "busy_slots": CLIENTS,
            "idle_ttft_ms_p50": statistics.median(idle),
            "busy_ttft_ms_p50": statistics.median(busy),
            "busy_over_idle": statistics.median(busy) / statistics.median(idle),
            "idle_ttft_ms": [round(x, 1) for x in idle],
            "busy_ttft_ms": [round(x, 1) for x in busy]}


async def _filler(url: str, i: int, started: asyncio.Future[None],
                  timeout: aiohttp.ClientTimeout) -> None:
    """A long ``normal`` stream on its own connection; ``started`` once its first text came."""
    body = {"model": MODEL, "prompt": prompt(i), "max_tokens": VIP_BUSY_TOKENS,
            "temperature": 0, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=timeout) as s, \
            s.post(url + "/v1/completions", json=body) as resp:
        async for raw in resp.content:
            if b'"text":"' in raw and b'"text":""' not in raw and not started.done():
                started.set_result(None)


def table(result: dict[str, Any]) -> str:
    rows = ["| side | 1 client tok/s | TTFT p50 / p99 ms | 8 clients tok/s | "
            "TTFT p50 / p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in result["sides"].items():
        rows.append(f"| {name} | {s['single_tokens_per_s']:.1f} | "
                    f"{s['single_ttft_ms_p50']:.1f} / {s['single_ttft_ms_p99']:.1f} | "
                    f"{s['clients8_tokens_per_s']:.1f} | {s['clients8_ttft_ms_p50']:.1f} / "
                    f"{s['clients8_ttft_ms_p99']:.1f} |")
    r = result["gateway_vs_zmq"]
    rows.append("")
    rows.append(f"gateway / ZeroMQ client (median of rounds): single stream "
                f"{r['single_tokens_per_s']:.3f}, 8 clients {r['clients8_tokens_per_s']:.3f}, "
                f"TTFT overhead p50 {r['ttft_overhead_ms_p50']:+.2f} ms (over "
                f"{r['ttft_pairs']} pairs of {TTFT_TOKENS}-token requests: gateway "
                f"{r['gateway_ttft_ms_p50']:.1f} ms, ZeroMQ {r['zmq_ttft_ms_p50']:.1f} ms)")
    v = result.get("gateway_vs_llama_server")
    if v:
        rows.append(f"gateway / llama-server: single stream {v['single_tokens_per_s']:.3f} "
                    f"(rounds {v['rounds_single']}), 8 clients "
                    f"{v['clients8_tokens_per_s']:.3f} (rounds {v['rounds_clients8']})")
    z = result.get("zmq_vs_llama_server")
    if z:
        rows.append(f"ZeroMQ client / llama-server: single stream "
                    f"{z['single_tokens_per_s']:.3f} (rounds {z['rounds_single']})")
    rows.append(f"gateway / ZeroMQ rounds: single stream {r['rounds_single']}, 8 clients "
                f"{r['rounds_clients8']}")
    return "\n".join(rows)


def main() -> int:
    global TOKENS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--max-tokens", type=int, default=TOKENS,
                    help=f"tokens per completion (default {TOKENS})")
    ap.add_argument("--singles", type=int, default=4,
                    help="single-stream requests per side per round, in turns (default 4)")
    ap.add_argument("--llama-bin", help="folder with llama-server (default: the portable "
                    "build bench/compare.py --build-llama makes under ~/.cache/inferno/bench)")
    ap.add_argument("--python-server", metavar="PYTHON",
                    help="python to run llama_cpp.server with (default: the bench's own venv, "
                         "made once by bench/lcp_venv.py)")
    ap.add_argument("--ttft-pairs", type=int, default=10,
                    help="per round, short requests through the gateway and the ZeroMQ "
                    "client in turns, for the TTFT overhead (default 10 of each)")
    ap.add_argument("--vip", type=int, default=0, metavar="REPS",
                    help="only measure a vip request's TTFT through the gateway, idle and "
                    "with all 8 slots busy, alternating REPS times (no other side)")
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args()
    TOKENS = args.max_tokens

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a SIGTERM (timeout, kill) still stops every server below

    signal.signal(signal.SIGTERM, interrupted)

    model = model_path()
    work = Path(tempfile.mkdtemp(prefix="gwbench-"))
    skipped: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    daemon: DaemonProcess | None = None
    gateway: GatewayProcess | None = None
    load_before = os.getloadavg()
    t_start = time.monotonic()
    try:
        from daemon_harness import test_models_dir

        daemon = DaemonProcess({"models": {"dirs": [str(test_models_dir(model))],
                                           "n_ctx": N_CTX, "slots": CLIENTS,
                                           "preload": [MODEL]}})
        daemon.start()
        with daemon.client(timeout=300) as c:
            c.load(MODEL)
        gateway = GatewayProcess(daemon.endpoint, work / "gateway.log").start()
        if args.vip:
            return vip_main(args, gateway.url, daemon.endpoint, load_before, t_start)
        urls = {"gateway": gateway.url}
        binary = llama_bin(args.llama_bin) / "llama-server"
        if binary.is_file():
            proc, urls["llama-server"] = start_llama_server(binary, model,
                                                            work / "llama-server.log")
            procs.append(proc)
        else:
            skipped["llama-server"] = f"no {binary} (build it with bench/compare.py " \
                                      "--build-llama, or pass --llama-bin)"
        from lcp_venv import runs_server, server_python

        if args.python_server:
            python, missing = args.python_server, runs_server(Path(args.python_server))
        else:
            venv_python, missing = server_python()
            python = str(venv_python)
        if missing:
            skipped["llama-cpp-python"] = missing
        else:
            proc, urls["llama-cpp-python"] = start_python_server(
                python, model, work / "llama-cpp-python.log")
            procs.append(proc)
        for name, why in skipped.items():
            print(f"skipped {name}: {why}", flush=True)
        result = asyncio.run(run(args, urls, daemon.endpoint))
    finally:
        for p in procs:
            stop(p)
        if gateway is not None:
            gateway.stop()
        if daemon is not None:
            daemon.cleanup()
    shutil.rmtree(work, ignore_errors=True)
    result.update({
        "skipped": skipped, "rounds": args.rounds, "singles_per_round": args.singles,
        "max_tokens": TOKENS, "clients": CLIENTS, "threads": THREADS,
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - t_start, 1)})
    print()
    print(table(result))
    print(f"\nload average (1/5/15 min) before {result['load_average_before']}, after "
          f"{result['load_average_after']} on {os.cpu_count()} CPUs; {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def vip_main(args: argparse.Namespace, url: str, endpoint: str,
             load_before: tuple[float, float, float], t_start: float) -> int:
    result = asyncio.run(vip_run(args.vip, url, endpoint))
    result.update({"load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in os.getloadavg()],
                   "wall_s": round(time.monotonic() - t_start, 1), "cpus": os.cpu_count()})
    print(f"\nvip TTFT through the gateway (median of {args.vip}): idle "
          f"{result['idle_ttft_ms_p50']:.1f} ms, all {CLIENTS} slots busy "
          f"{result['busy_ttft_ms_p50']:.1f} ms: {result['busy_over_idle']:.2f}x (goal <= 2x)")
    print(f"load average (1/5/15 min) before {result['load_average_before']}, after "
          f"{result['load_average_after']} on {os.cpu_count()} CPUs; {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP gateway against the ZeroMQ client library, side by side on one daemon.

One daemon (8 slots) with the default model, one `inferno-gateway` in front of it. Each round
runs both sides in turn, the order alternating, so drift hits both: one stream (``--singles``
requests one after the other) and then 8 concurrent clients, each request a 64-token greedy
completion with EOS ignored and a distinct prompt (no side reuses a cached prefix).

* single-stream tok/s: completion tokens over the time from the first to the last token;
* 8-client aggregate tok/s: all tokens over the wall time of the 8 requests;
* TTFT: request sent to first text (HTTP: first SSE chunk with text), p50 over the singles.

The HTTP side is plain ``http.client`` reading the SSE lines (no SDK overhead measured); the
ZeroMQ side is ``infernod.client.Client``, one per thread.

    .venv/bin/python bench/gateway_bench.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import _default_model_path  # noqa: E402
from daemon_harness import DaemonProcess, test_models_dir  # noqa: E402
from gateway_harness import GatewayProcess  # noqa: E402

from infernod.client import Client  # noqa: E402

MODEL = "gemma3-270m"
N_TOKENS = 64
CLIENTS = 8
_counter = itertools.count()


def _prompt() -> str:
    return f"Request {next(_counter)}: write a long story about a lighthouse keeper."


# One request -> (ttft_s, decode_s, tokens)
Run = tuple[float, float, int]


def zmq_request(c: Client) -> Run:
    t0 = time.monotonic()
    stream = c.generate(MODEL, _prompt(), max_tokens=N_TOKENS, temperature=0,
                        ignore_eos=True)
    first = last = 0.0
    for _ in stream:
        last = time.monotonic()
        first = first or last
    tokens = int((stream.stats or {}).get("completion_tokens") or 0)
    return first - t0, last - first, tokens


def http_request(conn: http.client.HTTPConnection) -> Run:
    """One streamed completion on a kept-alive connection (as SDKs keep a pool)."""
    body = json.dumps({"model": MODEL, "prompt": _prompt(), "max_tokens": N_TOKENS,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = 0.0
    tokens = 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            last = time.monotonic()
            first = first or last
    return first - t0, last - first, tokens


def concurrent(fn: Callable[[int], Run], n: int) -> tuple[float, int]:
    """(wall seconds, tokens) of ``n`` requests at once, request k on connection k."""
    results: list[Run] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        r = fn(k)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.monotonic() - t0
    assert len(results) == n, "a request did not finish"
    return wall, sum(r[2] for r in results)


def measure(fn: Callable[[int], Run], singles: int) -> dict[str, Any]:
    runs = [fn(0) for _ in range(singles)]
    wall, tokens = concurrent(fn, CLIENTS)
    return {"ttft_ms": [r[0] * 1000 for r in runs],
            "single_tokens_per_s": statistics.median(
                (r[2] - 1) / r[1] for r in runs if r[1] > 0),
            "aggregate_tokens_per_s": tokens / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--singles", type=int, default=5, help="single-stream requests per round")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    models = test_models_dir(_default_model_path())
    daemon = DaemonProcess({"models": {"dirs": [str(models)], "n_ctx": 1024,
                                       "slots": CLIENTS, "preload": [MODEL]}})
    gw: GatewayProcess | None = None
    clients: list[Client] = []
    conns: list[http.client.HTTPConnection] = []
    try:
        daemon.start()
        gw = GatewayProcess(daemon.endpoint,
                            Path(tempfile.mkdtemp(prefix="gwbench-")) / "gateway.log",
                            "--log-level", "WARNING").start()
        # Connections made once and kept, on both sides: a request's time is its own.
        clients = [Client(daemon.endpoint, timeout=60) for _ in range(CLIENTS)]
        conns = [http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
                 for _ in range(CLIENTS)]
        sides: dict[str, Callable[[int], Run]] = {
            "zmq": lambda k: zmq_request(clients[k]), "http": lambda k: http_request(conns[k])}
        for k in range(CLIENTS):  # warm-up: every connection open, the model loaded
            sides["zmq"](k)
            sides["http"](k)
        rounds: list[dict[str, dict[str, Any]]] = []
        for i in range(args.rounds):
            order = ["zmq", "http"] if i % 2 == 0 else ["http", "zmq"]
            rounds.append({side: measure(sides[side], args.singles) for side in order})
            r = rounds[-1]
            print(f"round {i + 1}: single {r['zmq']['single_tokens_per_s']:.1f} vs "
                  f"{r['http']['single_tokens_per_s']:.1f} tok/s, 8 clients "
                  f"{r['zmq']['aggregate_tokens_per_s']:.1f} vs "
                  f"{r['http']['aggregate_tokens_per_s']:.1f} tok/s (zmq vs http)", flush=True)
    finally:
        for c in clients:
            c.close()
        for conn in conns:
            conn.close()
        if gw is not None:
            gw.stop()
        daemon.cleanup()

    def ratio(key: str) -> list[float]:
        return [r["http"][key] / r["zmq"][key] for r in rounds]

    ttft = {side: statistics.median(t for r in rounds for t in r[side]["ttft_ms"])
            for side in ("zmq", "http")}
    summary = {
        "single_ratio_median": statistics.median(ratio("single_tokens_per_s")),
        "single_ratio_range": [min(ratio("single_tokens_per_s")),
                               max(ratio("single_tokens_per_s"))],
        "aggregate_ratio_median": statistics.median(ratio("aggregate_tokens_per_s")),
        "aggregate_ratio_range": [min(ratio("aggregate_tokens_per_s")),
                                  max(ratio("aggregate_tokens_per_s"))],
        "ttft_p50_ms": ttft, "ttft_overhead_p50_ms": ttft["http"] - ttft["zmq"]}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "summary": summary},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inferno vs the servers people use today, side by side in one run on one machine.

Measures 64-token greedy completions of the default model (EOS ignored, a distinct prompt
per request so no side reuses a cached prefix):

* llama-cpp-python in process (``Llama``, streaming): single-stream TTFT and decode tok/s;
* infernod through the client library: the same single stream, then aggregate tok/s with
  1, 2, 4 and 8 concurrent clients;
* optionally llama-cpp-python's own OpenAI-compatible server (``--llama-server-python``, a
  Python that has ``llama-cpp-python[server]``): aggregate tok/s with 1 and 8 clients.

Every figure is the median of ``--reps`` repetitions, interleaved so drift hits all sides.
Compare ratios: absolute numbers move with whatever else runs on the machine.

    .venv/bin/python bench/compare.py [--reps 3] [--clients 1,2,4,8] [--json out.json]
        [--llama-server-python /tmp/lcps/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import DaemonProcess  # noqa: E402

from infernod.client import Client  # noqa: E402

N_TOKENS = 64
THREADS = os.cpu_count() or 2
WORDS = ["Apples", "Rivers", "Engines", "Castles", "Planets", "Forests", "Cities", "Songs"]


def prompt(i: int) -> str:
    """Distinct prompts that share at most BOS and 2 tokens with any of the first 1,000
    others (see engine_bench.prompt), so neither side reuses a cached prefix."""
    return f"{str(i).zfill(4)[::-1]} {WORDS[i % len(WORDS)]}: here is a short story about a traveller who"


def model_path() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _default_model_path

    return _default_model_path()


# -- llama-cpp-python in process ------------------------------------------------------------
def direct_single(llm: Any, i: int) -> dict[str, float]:
    # Llama reuses the longest prefix it still holds from the previous call (here BOS and
    # the first words: a few tokens of 16, ~10 ms of TTFT); start clean, like a new prompt.
    llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm.create_completion(prompt(i), max_tokens=N_TOKENS, temperature=0.0,
                                   stream=True, logit_bias=None):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return {"ttft_ms": (first - t0) * 1000, "tokens_per_s": (n - 1) / (end - first),
            "tokens": n}


# -- infernod -------------------------------------------------------------------------------
def daemon_one(endpoint: str, i: int, results: list, barrier: threading.Barrier | None) -> None:
    with Client(endpoint, timeout=120) as c:
        c.wait_welcome()
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        first = None
        stream = c.generate("gemma3-270m", prompt(i), max_tokens=N_TOKENS, temperature=0,
                            ignore_eos=True)
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        n = stream.stats["completion_tokens"]
        results.append({"ttft_ms": (first - t0) * 1000, "tokens": n, "start": t0, "end": end,
                        "tokens_per_s": (n - 1) / (end - first)})


def daemon_concurrent(endpoint: str, clients: int, base: int) -> dict[str, float]:
    results: list[dict] = []
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=daemon_one, args=(endpoint, base + k, results, barrier))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": statistics.median(r["ttft_ms"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results)}


# -- llama-cpp-python's server --------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(python: str, model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(model),
                             "--n_ctx", "2048", "--n_threads", str(THREADS),
                             "--n_threads_batch", str(THREADS), "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-cpp-python server did not start")


def server_one(url: str, i: int, out: list, barrier: threading.Barrier) -> None:
    body = json.dumps({"prompt": prompt(i), "max_tokens": N_TOKENS, "temperature": 0,
                       "stream": False}).encode()
    barrier.wait()
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
    out.append({"tokens": reply["usage"]["completion_tokens"], "start": t0,
                "end": time.perf_counter()})


def server_concurrent(url: str, clients: int, base: int) -> dict[str, float]:
    out: list[dict] = []
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=server_one, args=(url, base + k, out, barrier))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in out) - min(r["start"] for r in out)
    return {"aggregate_tokens_per_s": sum(r["tokens"] for r in out) / wall}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--llama-server-python", help="python with llama-cpp-python[server]")
    ap.add_argument("--daemon-threads", type=int, default=0,
                    help="infernod models.threads (decode threads; 0 = its default)")
    ap.add_argument("--host-cache-mib", type=int, default=256,
                    help="infernod models.host_cache_mib (0 = idle cells stay in the KV cache)")
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    model = model_path()

    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                verbose=False, seed=1)
    models_dir = model.parent / "models"
    d = DaemonProcess({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 8,
                                  "install_default": False, "threads": args.daemon_threads,
                                  "host_cache_mib": args.host_cache_mib}})
    d.start()
    server = None
    try:
        with d.client(timeout=300) as c:
            c.load("gemma3-270m")
        if args.llama_server_python:
            server = start_llama_server(args.llama_server_python, model)
        direct, single, conc, srv = [], [], {n: [] for n in clients}, {1: [], 8: []}
        base = 0
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
            direct_single(llm, 10_000 + rep)  # warm
            direct.append(direct_single(llm, base))
            base += 1
            single.append(daemon_concurrent(d.endpoint, 1, base))
            base += 1
            for n in clients:
                conc[n].append(daemon_concurrent(d.endpoint, n, base))
                base += n
            if server is not None:
                for n in (1, 8):
                    srv[n].append(server_concurrent(server[1], n, base))
                    base += n
    finally:
        d.cleanup()
        if server is not None:
            server[0].terminate()
            server[0].wait(10)

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "tokens": N_TOKENS, "reps": args.reps,
        "direct": {"ttft_ms": med([r["ttft_ms"] for r in direct]),
                   "tokens_per_s": med([r["tokens_per_s"] for r in direct])},
        "daemon_single": {"ttft_ms": med([r["ttft_ms"] for r in single]),
                          "tokens_per_s": med([r["tokens_per_s"] for r in single]),
                          # each rep's daemon/direct ratio: drift between reps cancels out
                          "paired_ratio": med([s["tokens_per_s"] / d["tokens_per_s"]
                                               for s, d in zip(single, direct, strict=True)]),
                          "paired_ratios": [round(s["tokens_per_s"] / d["tokens_per_s"], 3)
                                            for s, d in zip(single, direct, strict=True)]},
        "daemon_clients": {n: med([r["aggregate_tokens_per_s"] for r in conc[n]])
                           for n in clients},
    }
    if server is not None:
        result["llama_cpp_python_server"] = {
            n: med([r["aggregate_tokens_per_s"] for r in srv[n]]) for n in (1, 8)}
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def print_table(r: dict[str, Any]) -> None:
    d, s = r["direct"], r["daemon_single"]
    print(f"\n{r['date']}, {r['machine']['cores']} cores, {r['tokens']}-token greedy "
          f"completions, median of {r['reps']}\n")
    print("| single stream | TTFT ms | decode tok/s | vs llama-cpp-python (paired) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| llama-cpp-python in process | {d['ttft_ms']:.0f} | {d['tokens_per_s']:.1f} | "
          "1.00 |")
    print(f"| infernod (client library) | {s['ttft_ms']:.0f} | {s['tokens_per_s']:.1f} | "
          f"{s['paired_ratio']:.2f} |")
    print("\n| concurrent clients | infernod aggregate tok/s | vs 1 client |"
          + (" llama-cpp-python server tok/s |" if "llama_cpp_python_server" in r else ""))
    print("| ---: | ---: | ---: |" + (" ---: |" if "llama_cpp_python_server" in r else ""))
    one = r["daemon_clients"].get(1) or next(iter(r["daemon_clients"].values()))
    for n, v in r["daemon_clients"].items():
        extra = ""
        if "llama_cpp_python_server" in r:
            sv = r["llama_cpp_python_server"].get(n)
            extra = f" {sv:.1f} |" if sv is not None else " |"
        print(f"| {n} | {v:.1f} | {v / one:.2f} |{extra}")


if __name__ == "__main__":
    sys.exit(main())

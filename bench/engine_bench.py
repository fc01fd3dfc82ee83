"""Benchmark GgufEngine against llama-cpp-python's ``Llama`` in the same process, in one run.

Measures, with 64-token greedy completions (EOS ignored so every run makes the same number of
tokens) and a distinct prompt per run (so neither side reuses a cached prefix):

* single stream: decode tok/s and TTFT, engine vs ``Llama`` directly (interleaved reps);
* aggregate tok/s with 1, 2, 4 and 8 concurrent requests through the engine.

Prints a markdown table of medians. Absolute numbers depend on what else runs on the machine;
compare the ratios, which come from the same run.

    .venv/bin/python bench/engine_bench.py [--model PATH] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infernod.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from infernod.backends.gguf import GgufEngine  # noqa: E402

N_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0)
DEFAULT_MODEL = Path.home() / ".cache" / "inferno-test" / "gemma-3-270m-q4_k_m.gguf"


def prompt(i: int) -> str:
    """A different prompt per run that shares at most BOS and 2 tokens with any of the
    first 1,000 others: it opens with i's digits reversed (Gemma has one token per digit),
    so no side gets to reuse a cached prefix (the engine's host cache restores from 4)."""
    words = ["Apples", "Rivers", "Engines", "Castles", "Planets", "Forests", "Cities", "Songs"]
    return f"{str(i).zfill(4)[::-1]} {words[i % len(words)]}: here is a short story about a traveller who"


class TimingSink:
    """Records per-request token arrival times; finished requests are signalled."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self._cv = threading.Condition()

    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        pass

    def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None:
        now = time.perf_counter()
        self.first.setdefault(request_id, now)
        self.last[request_id] = now

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        with self._cv:
            self.stats[request_id] = stats
            self._cv.notify_all()

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        raise SystemExit(f"{request_id}: {code}: {message}")

    def wait(self, ids: list[str]) -> None:
        with self._cv:
            self._cv.wait_for(lambda: all(i in self.stats for i in ids), 600)


def direct_single(llm: Any, i: int) -> tuple[float, float]:
    """(ttft_s, decode tok/s) for one greedy completion through ``Llama.generate``."""
    tokens = llm.tokenize(prompt(i).encode())
    llm.reset()
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    for _ in llm.generate(tokens, temp=0.0, reset=True):
        last = time.perf_counter()
        if n == 0:
            first = last
        n += 1
        if n >= N_TOKENS:
            break
    return first - t0, (n - 1) / (last - first)


def engine_batch(engine: GgufEngine, sink: TimingSink, tag: str, n: int, base: int) -> dict:
    """Submit n requests at once; return timings of the batch."""
    ids = [f"{tag}-{j}" for j in range(n)]
    t0 = time.perf_counter()
    for j, rid in enumerate(ids):
        engine.submit(
            GenerationRequest(
                rid, prompt=prompt(base + j), max_tokens=N_TOKENS, sampling=GREEDY, ignore_eos=True
            )
        )
    sink.wait(ids)
    end = max(sink.last[r] for r in ids)
    total = sum(sink.stats[r]["completion_tokens"] for r in ids)
    first = ids[0]
    return {
        "ttft_s": sink.first[first] - t0,
        "decode_tps": (N_TOKENS - 1) / (sink.last[first] - sink.first[first]),
        "aggregate_tps": total / (end - t0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    args = ap.parse_args()

    from llama_cpp import Llama

    th = args.threads
    llm = Llama(str(args.model), n_ctx=512, n_threads=th, n_threads_batch=th, verbose=False, seed=1)
    sink = TimingSink()
    engine = GgufEngine(
        args.model,
        n_ctx=512,
        n_slots=8,
        n_threads=th,
        n_threads_batch=th,
        prefill_chunk=args.prefill_chunk,
        sink=sink,
    )
    engine.start()
    try:
        rows = run_all(llm, engine, sink, args.reps)
    finally:
        engine.close()
    print_table(rows, args)


def run_all(llm: Any, engine: GgufEngine, sink: TimingSink, reps: int) -> dict[str, list]:
    rows: dict[str, list] = {"direct": [], "engine": []}
    seq = 1000
    direct_single(llm, 0)  # warm up both paths
    engine_batch(engine, sink, "warm", 1, 1)
    for n in (1, 2, 4, 8):
        rows[f"agg{n}"] = []
    # every rep measures everything once, in the same order, so background load that comes
    # and goes hits all measurements alike; ratios are then taken within a rep
    for r in range(reps):
        rows["direct"].append(direct_single(llm, seq))
        seq += 1
        res = engine_batch(engine, sink, f"s{r}", 1, seq)
        rows["engine"].append((res["ttft_s"], res["decode_tps"]))
        seq += 1
        for n in (1, 2, 4, 8):
            rows[f"agg{n}"].append(engine_batch(engine, sink, f"a{n}-{r}", n, seq)["aggregate_tps"])
            seq += n
    return rows


def print_table(rows: dict[str, list], args: argparse.Namespace) -> None:
    med = statistics.median
    d_ttft, d_tps = med(x[0] for x in rows["direct"]), med(x[1] for x in rows["direct"])
    e_ttft, e_tps = med(x[0] for x in rows["engine"]), med(x[1] for x in rows["engine"])
    # each engine rep ran right after a direct rep: the median of the paired ratios cancels
    # most of the drift caused by whatever else the machine is doing
    pairs = list(zip(rows["direct"], rows["engine"], strict=True))
    tps_ratio = med(e[1] / d[1] for d, e in pairs)
    ttft_ratio = med(e[0] / d[0] for d, e in pairs)
    print(
        f"\n{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · "
        f"{args.model.name} · {N_TOKENS}-token greedy · threads={args.threads} · "
        f"medians of {args.reps} reps\n"
    )
    print("| measurement | median | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| single stream decode, Llama direct | {d_tps:.1f} tok/s | 1.00 |")
    print(f"| single stream decode, GgufEngine | {e_tps:.1f} tok/s | {tps_ratio:.2f} (paired) |")
    print(f"| TTFT, Llama direct | {d_ttft * 1000:.1f} ms | 1.00 |")
    print(f"| TTFT, GgufEngine | {e_ttft * 1000:.1f} ms | {ttft_ratio:.2f} (paired) |")
    for n in (1, 2, 4, 8):
        agg = med(rows[f"agg{n}"])
        ratio = med(a / b for a, b in zip(rows[f"agg{n}"], rows["agg1"], strict=True))
        print(f"| aggregate, {n} concurrent, GgufEngine | {agg:.1f} tok/s | {ratio:.2f} (paired) |")
    print(
        "\nratios are medians of per-rep ratios: decode vs direct (target >= 0.95); "
        "aggregate vs 1 concurrent in the same rep (target >= 1.8 at 8)."
    )


if __name__ == "__main__":
    main()

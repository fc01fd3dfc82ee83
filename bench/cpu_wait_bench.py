"""How llama.cpp's CPU threads should wait (``models.cpu_wait``), alone and beside busy programs.

llama.cpp runs its CPU threads with OpenMP, which reads ``OMP_WAIT_POLICY`` once, as it
loads: threads either spin (``ACTIVE``), sleep (``PASSIVE``) or spin a while then sleep
(the default) at every barrier, and a decode step has hundreds. This runs single-stream
greedy decodes in a fresh process per policy, with 0, 1 and 2 busy-looping processes beside
it, and prints a markdown table of median tok/s.

    .venv/bin/python bench/cpu_wait_bench.py [--model PATH] [--reps 5] [--loads 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "inferno-test" / "gemma-3-270m-q4_k_m.gguf"
POLICIES = (("auto", None), ("sleep", "PASSIVE"), ("spin", "ACTIVE"))  # models.cpu_wait


def child(model: Path, reps: int, tokens: int, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                verbose=False)
    rates = []
    for i in range(reps):
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(f"{i} Once upon a time", max_tokens=tokens, temperature=0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    print(json.dumps({"median": statistics.median(rates), "all": rates}))


def run(model: Path, reps: int, tokens: int, threads: int, policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", "--model", str(model),
                          "--reps", str(reps), "--tokens", str(tokens),
                          "--threads", str(threads)],
                         env=env, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loads", default="0,1,2", help="busy processes beside the decode")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.reps, args.tokens, args.threads)
        return 0
    if not args.model.exists():
        print(f"no model at {args.model} (--model PATH)", file=sys.stderr)
        return 2
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, {args.tokens}-token greedy decodes, median of {args.reps}")
    print("\n| busy programs | " + " | ".join(f"cpu_wait = {n}" for n, _ in POLICIES) +
          " | sleep / auto |")
    print("| ---: |" + " ---: |" * (len(POLICIES) + 1))
    for load in [int(x) for x in args.loads.split(",")]:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(load)]
        try:
            tps = {n: run(args.model, args.reps, args.tokens, args.threads, p)["median"]
                   for n, p in POLICIES}
        finally:
            for b in busy:
                b.kill()
                b.wait()
        print(f"| {load} | " + " | ".join(f"{tps[n]:.1f}" for n, _ in POLICIES) +
              f" | {tps['sleep'] / tps['auto']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

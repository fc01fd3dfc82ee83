"""Where a GgufEngine decode step goes, and what picking greedy tokens by argmax gains.

One engine in this process (the daemon's defaults: 8 slots, threads = cores), 64-token
greedy completions with a distinct prompt each, 1 and 8 streams. Two modes, interleaved
round by round so drift hits both (A B, B A, ...):

* ``chain``: every sequence's token from ``llama_sampler_sample`` (the C greedy chain,
  which copies the 262,144-entry vocabulary into candidates per sequence and step);
* ``argmax``: the engine's plain-greedy path (numpy argmax over the logits row).

Per mode and stream count: aggregate tok/s (median), the ratio argmax/chain (median and range
of each round's own ratio), and a step's time split into ``llama_decode``, picking the
tokens, and the rest of the step (batch building, detokenizing, the sink), in ms.

    .venv/bin/python bench/decode_profile.py [--rounds 6] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import model_path  # noqa: E402
from engine_bench import TimingSink, engine_batch  # noqa: E402

from infernod.backends import llama_native as native  # noqa: E402
from infernod.backends.gguf import GgufEngine  # noqa: E402
from infernod.cli.bench import cpu_name  # noqa: E402

MODES = ("chain", "argmax")


class StepClock:
    """Wraps the native calls a step makes and the step itself; totals in ns."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.steps = 0

    def add(self, key: str, ns: int) -> None:
        self.totals[key] = self.totals.get(key, 0) + ns

    def reset(self) -> None:
        self.totals, self.steps = {}, 0

    def per_step_ms(self) -> dict[str, float]:
        n = max(1, self.steps)
        t = {k: v / n / 1e6 for k, v in self.totals.items()}
        pick = t.get("sample", 0.0) + t.get("argmax", 0.0)
        return {"decode": t.get("decode", 0.0), "pick": pick,
                "rest": t.get("step", 0.0) - t.get("decode", 0.0) - pick}


def instrument(clock: StepClock) -> None:
    llama = native.bindings()
    timed_native = {"llama_decode": "decode", "llama_sampler_sample": "sample"}
    for name, key in timed_native.items():
        fn = getattr(llama, name)

        def wrapped(*a: Any, _fn: Any = fn, _key: str = key) -> Any:
            t = time.perf_counter_ns()
            try:
                return _fn(*a)
            finally:
                clock.add(_key, time.perf_counter_ns() - t)

        setattr(llama, name, wrapped)
    argmax = native.argmax_token

    def timed_argmax(ctx: Any, idx: int, n_vocab: int) -> int:
        t = time.perf_counter_ns()
        try:
            return argmax(ctx, idx, n_vocab)
        finally:
            clock.add("argmax", time.perf_counter_ns() - t)

    native.argmax_token = timed_argmax
    step = GgufEngine.step

    def timed_step(self: GgufEngine) -> None:
        t = time.perf_counter_ns()
        step(self)
        clock.add("step", time.perf_counter_ns() - t)
        clock.steps += 1

    GgufEngine.step = timed_step  # type: ignore[method-assign]


def set_mode(mode: str, plain_greedy: Any) -> None:
    native.plain_greedy = plain_greedy if mode == "argmax" else (lambda sp: False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    model = args.model or model_path()
    cores = os.cpu_count() or 2
    clock = StepClock()
    instrument(clock)
    plain_greedy = native.plain_greedy
    sink = TimingSink()
    engine = GgufEngine(model, n_ctx=1024, n_slots=8, n_threads=cores, n_threads_batch=cores,
                        sink=sink)
    engine.start()
    tps: dict[tuple[str, int], list[float]] = {(m, n): [] for m in MODES for n in (1, 8)}
    split: dict[tuple[str, int], list[dict[str, float]]] = {k: [] for k in tps}
    base = 0
    try:
        engine_batch(engine, sink, "warm", 8, 5000)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
                set_mode(mode, plain_greedy)
                for n in (1, 8):
                    clock.reset()
                    res = engine_batch(engine, sink, f"{mode}{n}-{r}", n, base)
                    base += n
                    tps[(mode, n)].append(res["aggregate_tps"])
                    split[(mode, n)].append(clock.per_step_ms())
    finally:
        set_mode("argmax", plain_greedy)
        engine.close()
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_name()}, {cores} cores, {model.name}, "
          f"64-token greedy, {args.rounds} interleaved rounds (medians)\n")
    print("| streams | picking | tok/s | argmax / chain | step ms: llama_decode | pick tokens "
          "| rest |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in (1, 8):
        ratios = [a / c for a, c in zip(tps[("argmax", n)], tps[("chain", n)], strict=True)]
        for mode in MODES:
            s = {k: statistics.median(x[k] for x in split[(mode, n)])
                 for k in ("decode", "pick", "rest")}
            ratio = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                     if mode == "argmax" else "1.00")
            print(f"| {n} | {mode} | {statistics.median(tps[(mode, n)]):.1f} | {ratio} | "
                  f"{s['decode']:.2f} | {s['pick']:.2f} | {s['rest']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What logprobs and grammars cost GgufEngine's decode, single stream, in one run.

Interleaves reps of 64-token completions: plain greedy (the path every request without
logprobs takes), greedy with ``logprobs`` (0 and 20 alternatives: a log-softmax over the
whole vocabulary per token) and a JSON object schema, greedy and sampled, each two ways: the
grammar checking the chosen token and masking every candidate only when it refuses it
(``checked``, what the engine does, as llama-server does) and the grammar masking every
candidate at every step (``grammar-first``, the engine's old way). Prints the median decode
tok/s of each and its ratio to plain, the process's CPU time per generated token (prompt
included), which a busy machine disturbs less than wall-clock rates, and how often the
grammar refused the first choice, and the decode thread's CPU time inside the grammar
sampling per token (thread CPU time: what the grammar itself costs, apart from the matrix
work, whose OpenMP threads a busy machine slows far more). Absolute numbers depend on the
machine's load; the ratios come from the same run. ``--threads 1`` keeps OpenMP's spinning
out of a busy machine's numbers.

    .venv/bin/python bench/structured_bench.py [--model PATH] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infernod.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from infernod.backends.gguf import GgufEngine  # noqa: E402
from infernod.backends.grammar import schema_to_gbnf  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "inferno-test" / "gemma-3-270m-q4_k_m.gguf"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


class Sink:
    def __init__(self) -> None:
        self.done: dict[str, dict[str, Any]] = {}
        self.cv = threading.Condition()

    def on_started(self, request_id: str, info: dict[str, Any]) -> None: ...

    def on_tokens(self, request_id: str, text: str, n_tokens: int,
                  logprobs: list[dict[str, Any]] | None = None) -> None: ...

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        with self.cv:
            self.done[request_id] = stats
            self.cv.notify_all()

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        with self.cv:
            self.done[request_id] = {"error": code}
            self.cv.notify_all()


class SampleClock:
    """Wraps the engine's GrammarSampling.sample (called on the decode thread) and adds up
    the thread CPU time spent in it."""

    def __init__(self, eng: GgufEngine) -> None:
        self.ns = 0
        self._sample = eng.grammar_sampling.sample
        setattr(eng.grammar_sampling, "sample", self)  # noqa: B010 (an instance's method)

    def __call__(self, *args: Any) -> int:
        t0 = time.thread_time_ns()
        try:
            return self._sample(*args)
        finally:
            self.ns += time.thread_time_ns() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sink = Sink()
    eng = GgufEngine(args.model, n_ctx=512, n_slots=1, n_threads=args.threads,
                     n_threads_batch=args.threads, sink=sink)
    eng.start()
    clock = SampleClock(eng)
    grammar = schema_to_gbnf(SCHEMA)
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=0.8, seed=1)
    cases: dict[str, dict[str, Any]] = {
        "plain": {"sampling": greedy, "ignore_eos": True},
        "logprobs=0": {"sampling": greedy, "ignore_eos": True, "logprobs": 0},
        "logprobs=20": {"sampling": greedy, "ignore_eos": True, "logprobs": 20},
    }
    for mode in ("checked", "grammar-first"):
        cases[f"json_schema greedy {mode}"] = {"sampling": greedy, "grammar": grammar}
        cases[f"json_schema T=0.8 {mode}"] = {"sampling": sampled, "grammar": grammar}
    refused: dict[str, list[int]] = {k: [0, 0] for k in cases}
    grammar_us: dict[str, list[float]] = {k: [] for k in cases}
    rates: dict[str, list[float]] = {k: [] for k in cases}
    cpu_ms: dict[str, list[float]] = {k: [] for k in cases}
    n = 0
    try:
        for rep in range(args.reps):
            for name, kw in cases.items():
                n += 1
                rid = f"{name}-{rep}"
                gs = eng.grammar_sampling  # switched while the engine is idle
                gs.grammar_first = name.endswith("grammar-first")
                checked0, resampled0, clock0 = gs.checked, gs.resampled, clock.ns
                cpu0 = time.process_time()
                eng.submit(GenerationRequest(rid, prompt=f"{n} Once upon a time", max_tokens=64,
                                             **kw))
                with sink.cv:
                    sink.cv.wait_for(lambda rid=rid: rid in sink.done, 300)  # type: ignore[misc]
                stats = sink.done[rid]
                refused[name][0] += gs.resampled - resampled0
                refused[name][1] += gs.checked - checked0
                if stats.get("completion_tokens") and "grammar" in kw:
                    grammar_us[name].append((clock.ns - clock0) / 1000
                                            / stats["completion_tokens"])
                if stats.get("completion_tokens"):
                    cpu_ms[name].append((time.process_time() - cpu0) * 1000
                                        / stats["completion_tokens"])
                if stats.get("tokens_per_s"):
                    rates[name].append(stats["tokens_per_s"])
    finally:
        eng.close()
    base = statistics.median(rates["plain"])
    base_cpu = statistics.median(cpu_ms["plain"])
    print("| case | decode tok/s (median) | vs plain | CPU ms/token | vs plain "
          "| grammar CPU µs/token | refused |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rates.items():
        med = statistics.median(r) if r else float("nan")
        cpu = statistics.median(cpu_ms[name]) if cpu_ms[name] else float("nan")
        n_refused, n_checked = refused[name]
        share = f"{n_refused}/{n_checked}" if n_checked else "-"
        g_us = f"{statistics.median(grammar_us[name]):.0f}" if grammar_us[name] else "-"
        print(f"| {name} | {med:.1f} | {med / base:.3f} | {cpu:.1f} | {cpu / base_cpu:.3f} "
              f"| {g_us} | {share} |")


if __name__ == "__main__":
    main()

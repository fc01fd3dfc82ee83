"""A long shared prefix on a sliding-window model: cold vs warm time to first token.

The default model (Gemma 3 270M) keeps only a 512-position window in 15 of its 18 layers
when ``swa_full`` is off (the default), so reusing a cached prefix needs a window checkpoint
(infernod/backends/checkpoints.py). For each ``swa_full`` setting this runs one engine as the
daemon configures it by default (4,096 x 8 slots, prefill chunk 256, 256 MiB host cache) and,
per repetition, a fresh ~2.9k-token document (a distinct first line, so nothing is cached):

* cold: document + question A, nothing to reuse;
* same prompt: document + question A again;
* other question: document + question B, then document + question C.

It prints the median TTFT of each (ms, the engine's own stats, like the daemon's ``ttft_ms``),
warm / cold, tokens reused, the context's measured memory and what the host cache holds.

    .venv/bin/python bench/swa_prefix_bench.py [--reps 3] [--modes false,true] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from infernod.backends.base import GenerationRequest, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
WORDS = "lighthouse storm ship harbour keeper lantern rope tide gull anchor sail reef".split()
QUESTIONS = ("What was seen on day 3?", "Which entry mentions the reef first?",
             "How many entries talk about the storm?")
WAIT_S = 900.0


def document(rep: int, entries: int = 160) -> str:
    """About 2.9k tokens of log-like prose; ``rep`` changes its first line."""
    lines = [f"Logbook {rep * 7919 % 10007} of the northern coast station."]
    lines += [f"Entry {i}: the {WORDS[i % 12]} near the {WORDS[(i * 5) % 12]} was seen on "
              f"day {i * 7 % 31}." for i in range(entries)]
    return " ".join(lines)


class Sink:
    """Collects on_started/on_finished; ``wait`` blocks until a request ends (bounded)."""

    def __init__(self) -> None:
        self.done: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self._cv = threading.Condition()

    def on_started(self, request_id: str, info: dict[str, Any]) -> None: ...

    def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None: ...

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        with self._cv:
            self.done[request_id] = stats
            self._cv.notify_all()

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        with self._cv:
            self.errors[request_id] = f"{code}: {message}"
            self._cv.notify_all()

    def wait(self, rid: str) -> dict[str, Any]:
        with self._cv:
            ok = self._cv.wait_for(lambda: rid in self.done or rid in self.errors, WAIT_S)
        if not ok or rid in self.errors:
            raise RuntimeError(f"{rid}: {self.errors.get(rid, 'timed out')}")
        return self.done[rid]


def idle(engine: Any, timeout: float = 30.0) -> None:
    """Wait until the engine moved the finished sequence to the host cache."""
    deadline = time.monotonic() + timeout
    while any(s["kv_tokens"] for s in engine.slot_state()) and time.monotonic() < deadline:
        time.sleep(0.02)


def run_mode(swa_full: bool, reps: int) -> dict[str, Any]:
    from conftest import _default_model_path

    from infernod.backends.gguf import GgufEngine

    sink = Sink()
    eng = GgufEngine(_default_model_path(), n_ctx=4096, n_slots=8, swa_full=swa_full,
                     prefill_chunk=256, sink=sink)
    eng.start()
    rows: dict[str, list[float]] = {"cold": [], "same prompt": [], "other question": [],
                                    "third question": []}
    cached: dict[str, list[int]] = {k: [] for k in rows}
    n_prompt: dict[str, int] = {}
    try:
        for rep in range(reps):
            doc = document(rep)
            asked = (QUESTIONS[0], QUESTIONS[0], QUESTIONS[1], QUESTIONS[2])
            prompts = [(k, f"{doc}\nQuestion: {q}\nAnswer:")
                       for k, q in zip(rows, asked, strict=True)]
            for kind, text in prompts:
                rid = f"{swa_full}-{rep}-{kind}"
                eng.submit(GenerationRequest(rid, prompt=text, max_tokens=8, sampling=GREEDY,
                                             ignore_eos=True))
                st = sink.wait(rid)
                rows[kind].append(st["ttft_ms"])
                cached[kind].append(st["prompt_cached_tokens"])
                n_prompt[kind] = st["prompt_tokens"]
                idle(eng)
                print(f"swa_full={swa_full} rep {rep} {kind}: ttft {st['ttft_ms']:.0f} ms, "
                      f"cached {st['prompt_cached_tokens']} of {st['prompt_tokens']}",
                      file=sys.stderr)
        mem = eng.memory_bytes()
        host = eng.host_cache_stats()
    finally:
        eng.close()
    return {"swa_full": swa_full, "prompt_tokens": n_prompt,
            "ttft_ms": {k: statistics.median(v) for k, v in rows.items()},
            "cached": {k: min(v) for k, v in cached.items()},
            "context_mib": mem["context_bytes"] / 2**20,
            "host_cache_mib": host["bytes"] / 2**20, "checkpoints": host["checkpoints"]}


def table(results: list[dict[str, Any]]) -> str:
    out = ["| swa_full | case | TTFT ms (median) | / cold | tokens reused |",
           "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        cold = r["ttft_ms"]["cold"]
        for kind, ms in r["ttft_ms"].items():
            out.append(f"| {str(r['swa_full']).lower()} | {kind} | {ms:.0f} | "
                       f"{ms / cold:.3f} | {r['cached'][kind]} of {r['prompt_tokens'][kind]} |")
    out += ["", "| swa_full | context MiB (measured) | host cache MiB after | checkpoints held |",
            "| --- | ---: | ---: | ---: |"]
    for r in results:
        out.append(f"| {str(r['swa_full']).lower()} | {r['context_mib']:.0f} | "
                   f"{r['host_cache_mib']:.0f} | {r['checkpoints']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="false,true", help="swa_full settings to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [run_mode(m.strip() == "true", args.reps) for m in args.modes.split(",")]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Preemption: is it cheaper to keep a paused sequence's KV cells or to recompute them?

Runs GgufEngine directly on the default model (1 slot). A request is preempted after
GENERATED tokens and resumed with ``resume_tokens``:

* keep:      resumed at once; its cells are still in the slot (prefix reuse), only the last
             token is evaluated again.
* recompute: the daemon's situation without parking (``park_slots=0``): a short vip runs in
             the only slot first, overwriting the cells, so the resume re-evaluates prompt +
             generated tokens.
* parked:    the same with a park (``park_slots=1``): the victim's cells were kept on a spare
             sequence id while the vip ran, the resume copies them back.
* host:      the same with the host cache (no park): the victim's cells were saved to RAM
             when the vip took the slot, the resume restores them.

Reported: resume latency (resubmit -> first new token), cached tokens, the context memory of
each engine and the KV bytes a kept sequence occupies.
Usage: .venv/bin/python bench/preempt_bench.py [PROMPT_WORDS] [GENERATED]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from infernod.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from infernod.backends.gguf import GgufEngine  # noqa: E402


class Sink:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.first: dict[str, float] = {}
        self.started: dict[str, dict] = {}
        self.finished: dict[str, tuple[str, dict]] = {}
        self.tokens: dict[str, int] = {}

    def on_started(self, rid: str, info: dict[str, Any]) -> None:
        self.started[rid] = info

    def on_tokens(self, rid: str, text: str, n: int) -> None:
        with self.cond:
            self.first.setdefault(rid, time.perf_counter())
            self.tokens[rid] = self.tokens.get(rid, 0) + n
            self.cond.notify_all()

    def on_finished(self, rid: str, reason: str, stats: dict[str, Any]) -> None:
        with self.cond:
            self.finished[rid] = (reason, stats)
            self.cond.notify_all()

    def on_error(self, rid: str, code: str, message: str, hint: str | None) -> None:
        with self.cond:
            self.finished[rid] = (code, {"message": message})
            self.cond.notify_all()

    def wait(self, pred: Any) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, 120)


def measure(mode: str, prompt: str, generated: int, park_slots: int, host_bytes: int,
            reps: int = 3) -> dict:
    from conftest import _default_model_path

    sink = Sink()
    eng = GgufEngine(_default_model_path(), n_ctx=2048, n_slots=1, n_threads=2,
                     n_threads_batch=2, sink=sink, park_slots=park_slots,
                     host_cache_bytes=host_bytes)
    eng.start()
    greedy = SamplingParams(temperature=0)
    ms: list[float] = []
    try:
        for rep in range(reps):
            rid = f"{mode}-{rep}"
            eng.submit(GenerationRequest(rid, prompt=prompt, max_tokens=generated + 8,
                                         sampling=greedy, ignore_eos=True))
            sink.wait(lambda rid=rid: sink.tokens.get(rid, 0) >= generated)
            eng.preempt(rid)
            if mode != "keep":  # the vip takes the freed slot in the same step, as in the daemon
                vip = f"vip-{rep}"
                eng.submit(GenerationRequest(vip, prompt="Hi", max_tokens=2, sampling=greedy))
                sink.wait(lambda vip=vip: vip in sink.finished)
            sink.wait(lambda rid=rid: rid in sink.finished)
            toks = sink.finished[rid][1]["generated_tokens"]
            again = rid + "-resumed"
            t0 = time.perf_counter()
            eng.submit(GenerationRequest(again, prompt=prompt, max_tokens=len(toks) + 1,
                                         sampling=greedy, resume_tokens=toks, ignore_eos=True))
            sink.wait(lambda again=again: again in sink.finished)
            ms.append((sink.first[again] - t0) * 1000)
        info = sink.started[again]
        memory = eng.memory_bytes()
    finally:
        eng.close()
    return {"ms": ms, "cached": info["cached_tokens"], "context": info["prompt_tokens"],
            "context_bytes": memory["context_bytes"]}


def main() -> None:
    words = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    generated = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    prompt = "Summarise: " + " ".join(f"word{i % 97}" for i in range(words))
    modes = (("keep", 0, 0), ("recompute", 0, 0), ("parked", 1, 0), ("host", 0, 256 << 20))
    runs = {mode: measure(mode, prompt, generated, parks, host)
            for mode, parks, host in modes}
    print(f"context at resume: {runs['keep']['context']} tokens ({generated} generated)")
    for mode, r in runs.items():
        ms = r["ms"]
        print(f"{mode:9}: resume -> first new token median {statistics.median(ms):7.1f} ms "
              f"(runs {', '.join(f'{x:.0f}' for x in ms)}), cached tokens {r['cached']}, "
              f"context memory {r['context_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

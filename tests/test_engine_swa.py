"""Long shared prefixes on a sliding-window model (Gemma 3, ``swa_full`` off, the default).

The window layers keep only the last 512 positions of a sequence, so a cached prefix whose
window has been overwritten cannot be continued from the cells alone. Window checkpoints
(infernod/backends/checkpoints.py), taken during prefill and kept with the sequence in the
host cache, make it reusable: the same long prompt again, or the same document followed by
another question, evaluates only the new suffix and answers exactly as a cold engine does.
"""

from __future__ import annotations

import mmap
import time
from pathlib import Path
from typing import Any

import pytest
from test_engine import GREEDY, Recorder

from infernod.backends import checkpoints as ckpt
from infernod.backends.base import GenerationRequest
from infernod.backends.checkpoints import Checkpoint
from infernod.backends.hostcache import Entry, HostCache

WORDS = "lighthouse storm ship harbour keeper lantern rope tide gull anchor sail reef".split()


def document(entries: int) -> str:
    """Log-like prose, about 18 tokens per entry (160 entries: ~2.9k tokens)."""
    return " ".join(f"Entry {i}: the {WORDS[i % 12]} near the {WORDS[(i * 5) % 12]} was seen on "
                    f"day {i * 7 % 31}." for i in range(entries))


def question(q: str) -> str:
    return f"\nQuestion: {q}\nAnswer:"


def idle(eng: Any, timeout: float = 60.0) -> None:
    """Wait (bounded) until the idle engine moved every finished sequence to RAM."""
    deadline = time.monotonic() + timeout
    while any(s["kv_tokens"] for s in eng.slot_state()):
        assert time.monotonic() < deadline, "slots kept their cells"
        time.sleep(0.02)


def run(eng: Any, rec: Recorder, rid: str, tokens: list[int], n: int,
        timeout: float = 600.0) -> dict[str, Any]:
    """One greedy request, waited for (bounded: a cold 2.9k-token prompt takes 11 s on a
    quiet 2-core machine, minutes on a crowded one)."""
    eng.submit(GenerationRequest(rid, prompt_tokens=tokens, max_tokens=n, sampling=GREEDY,
                                 ignore_eos=True))
    deadline = time.monotonic() + timeout
    while rid not in rec.finished and rid not in rec.errors:
        assert time.monotonic() < deadline, f"{rid} did not finish"
        time.sleep(0.02)
    assert rid not in rec.errors, rec.errors[rid]
    return rec.finished[rid][1]


def engine(path: Path, rec: Recorder, **kw: Any) -> Any:
    from infernod.backends.gguf import GgufEngine

    kw.setdefault("park_slots", 0)
    eng = GgufEngine(path, n_ctx=4096, n_slots=2, prefill_chunk=256, sink=rec, **kw)
    eng.start()
    return eng


# ---- bookkeeping, no model -----------------------------------------------------------------


def fake(tokens: list[int], size: int = 1000, taken_ns: int = 0) -> Checkpoint:
    return Checkpoint(list(tokens), mmap.mmap(-1, size), size, taken_ns or time.perf_counter_ns())


def test_plan_checkpoints_before_the_end_and_where_the_prompt_left_a_known_one() -> None:
    # 2,900 tokens, nothing reused, 2,880 shared with an earlier sequence: before the last
    # token, 32/128/512 before the end and at the point of divergence
    assert ckpt.plan(2900, 0, 8, 512, 2880) == [2388, 2772, 2868, 2880, 2899]
    # a checkpoint saves at least MIN_GAIN tokens over what the request reused
    assert ckpt.plan(2900, 2840, 8, 512, 2880) == [2880, 2899]
    assert ckpt.plan(2900, 2870, 8, 512, 2880) == []
    # prompt and reply fit the window: every cell stays, nothing to checkpoint
    assert ckpt.plan(400, 0, 100, 512, 0) == []
    assert ckpt.plan(400, 0, 200, 512, 0) == [272, 368, 399]
    assert ckpt.plan(2900, 0, 8, 0, 0) == []  # swa_full, or no window layers


def test_a_checkpoint_serves_only_the_tokens_it_was_taken_from() -> None:
    a = fake([1, 2, 3, 4, 5, 6])
    b = fake([1, 2, 3])
    assert ckpt.best([b, a], [1, 2, 3, 4, 5, 6, 7], 6) is a
    assert ckpt.best([b, a], [1, 2, 3, 4, 5, 6, 7], 5) is b  # a would leave nothing to do
    assert ckpt.best([b, a], [1, 2, 3, 9, 5, 6, 7], 6) is b  # same length, other tokens
    assert ckpt.best([a], [1, 2, 9, 4, 5, 6, 7], 6) is None


def test_checkpoints_are_capped_per_sequence_and_counted_once_in_the_budget() -> None:
    cps = [fake(list(range(i + 1)), taken_ns=i + 1) for i in range(12)]
    kept = ckpt.cap(cps)
    assert len(kept) == ckpt.MAX_PER_SEQUENCE and kept[0] is cps[12 - ckpt.MAX_PER_SEQUENCE]

    host = HostCache(budget_bytes=10_000, n_swa=512)
    shared = fake([1, 2, 3], size=3000)
    for i, size in enumerate((2000, 2000)):
        host.entries.append(Entry([1, 2, 3, i], mmap.mmap(-1, size), size, 0, i, [shared]))
    assert host.bytes() == 7000  # the shared checkpoint once
    assert host.bytes([shared]) == 7000 and host.bytes([fake([1], size=2000)]) == 9000
    # running sequences' checkpoints push idle entries out, least recently used first
    assert host.fit([fake([1], size=4000)])
    assert [e.tokens[-1] for e in host.entries] == [1] and host.counts["evicted"] == 1
    assert not host.fit([fake([1], size=20_000)]) and host.entries == []
    # an entry gives up its checkpoints (earliest first) before it goes
    low, high = fake([1], size=3000), fake([1, 2], size=3000)
    host.entries.append(Entry([1, 2, 3], mmap.mmap(-1, 4000), 4000, 0, 5, [low, high]))
    assert host.fit([fake([9], size=2000)])
    assert host.entries[0].checkpoints == [high] and host.counts["evicted"] == 2


# ---- the real model --------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.timeout(1800)  # three cold 2.9k-token prompts: ~1 min on a quiet 2-core machine
def test_a_shared_3k_prefix_is_reused_and_answers_as_a_cold_engine(
    default_model_path: Path,
) -> None:
    """A 2.9k-token document: the same prompt again reuses all but its last token; the same
    document with other questions reuses the document (up to a checkpoint at most MIN_GAIN
    tokens before the question); the greedy answers equal a cold engine's. On main each of
    them evaluated the whole prompt (cached 0)."""
    rec = Recorder()
    eng = engine(default_model_path, rec)
    out: dict[str, list[int]] = {}
    try:
        doc = eng.tokenize(document(160))
        assert len(doc) > 2800
        prompts = {k: doc + eng.tokenize(question(q), add_bos=False) for k, q in (
            ("a", "What was seen on day 3?"), ("b", "Which entry mentions the reef?"),
            ("c", "How many entries are there?"))}
        out["a"] = run(eng, rec, "a", prompts["a"], 8)["generated_tokens"]
        idle(eng)
        for rid, key in (("a-again", "a"), ("b", "b"), ("c", "c")):
            st = run(eng, rec, rid, prompts[key], 8)
            out[rid] = st["generated_tokens"]
            assert rec.started(rid)["cached_tokens"] == st["prompt_cached_tokens"]
            if rid == "a-again":
                assert st["prompt_cached_tokens"] == len(prompts["a"]) - 1
            else:
                assert st["prompt_cached_tokens"] >= len(doc) - ckpt.MIN_GAIN, (rid, st)
            idle(eng)
        stats = eng.host_cache_stats()
        assert stats["bytes"] <= stats["budget_bytes"] and stats["failed"] == 0
        assert 0 < stats["checkpoints"] <= 2 * ckpt.MAX_PER_SEQUENCE
    finally:
        eng.close()
    assert out["a-again"] == out["a"]  # "a" itself ran cold

    rec = Recorder()
    cold = engine(default_model_path, rec)  # a fresh engine: nothing to reuse
    try:
        st = run(cold, rec, "b", prompts["b"], 8)
        assert st["prompt_cached_tokens"] == 0
        assert st["generated_tokens"] == out["b"]
    finally:
        cold.close()


@pytest.mark.model
@pytest.mark.timeout(900)
def test_checkpoints_stay_within_a_small_host_cache_budget(default_model_path: Path) -> None:
    """With 24 MB of host cache (one 1.3k-token sequence is ~12 MB, one checkpoint ~7.5 MB)
    entries and checkpoints, the running sequence's included, never exceed the budget, and
    a repeated prompt still reuses what fits."""
    rec = Recorder()
    budget = 24 << 20
    eng = engine(default_model_path, rec, host_cache_bytes=budget)
    peak = 0

    def watch(*_: Any) -> None:
        nonlocal peak
        peak = max(peak, eng.host_cache_stats()["bytes"])

    rec.on_token_hook = watch
    try:
        doc = eng.tokenize(document(72))
        assert len(doc) > 1200
        for i, q in enumerate(("What was seen on day 3?", "What was seen on day 3?",
                               "Which entry mentions the reef?")):
            st = run(eng, rec, f"r{i}", doc + eng.tokenize(question(q), add_bos=False), 4)
            idle(eng)
            watch()
            if i == 1:
                assert st["prompt_cached_tokens"] >= len(doc)
        stats = eng.host_cache_stats()
        assert peak <= budget and stats["bytes"] <= budget, (peak, stats)
        assert stats["evicted"] >= 1, stats
    finally:
        eng.close()


@pytest.mark.model
@pytest.mark.timeout(900)
def test_the_daemon_reuses_a_long_prefix_and_says_so_in_the_start_event(
    daemon_factory: Any,
) -> None:
    """Through the real daemon (defaults: swa_full off, host cache on): a ~950-token prompt
    again, then with another question, starts with all but the last token, then the
    document, reused; the start event's ``cached_tokens`` says so. Main reported 0."""
    doc = document(52)
    # a cold prompt's first token may take minutes on a crowded CI machine
    daemon = daemon_factory({"scheduler": {"stall_timeout_s": 600.0, "timeout_s": 900.0}})
    with daemon.client() as c:
        c.load("gemma3-270m")
        streams = []
        for q in ("What was seen on day 3?", "What was seen on day 3?",
                  "Which entry mentions the reef?"):
            s = c.generate("gemma3-270m", doc + question(q), max_tokens=8, temperature=0)
            list(s)
            streams.append(s)
        first, again, other = (s.state.start for s in streams)  # the start events
        assert first is not None and again is not None and other is not None
        assert first["prompt_tokens"] > 900 and first["cached_tokens"] == 0
        assert again["cached_tokens"] == again["prompt_tokens"] - 1
        assert streams[1].stats is not None
        assert streams[1].stats["prompt_cached_tokens"] == again["cached_tokens"]
        assert streams[1].text == streams[0].text
        assert other["cached_tokens"] >= other["prompt_tokens"] - 64, other
        cache = c.show("gemma3-270m")["host_cache"]
        assert cache["checkpoints"] >= 1 and cache["bytes"] <= cache["budget_bytes"], cache

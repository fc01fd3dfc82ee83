"""The host cache: a finished request's KV cells leave the unified KV cache (where every
token of every other stream would attend over them) for RAM, and come back bit-exact when a
request continues the conversation. Real model; outputs compared with ``Llama``'s."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_engine import (  # noqa: F401
    LONG_TEXT,
    Recorder,
    assert_greedy_path,
    greedy_gaps,
    llama_greedy,
    reference,
    run,
)

from infernod.backends.base import GenerationRequest, SamplingParams

pytestmark = pytest.mark.model
GREEDY = SamplingParams(temperature=0.0)


def eventually(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def engine(path: Path, rec: Recorder, **kw: Any) -> Any:
    from infernod.backends.gguf import GgufEngine

    kw.setdefault("park_slots", 0)
    kw.setdefault("n_slots", 2)
    kw.setdefault("n_ctx", 512)
    eng = GgufEngine(path, prefill_chunk=64, sink=rec, **kw)
    eng.start()
    return eng


def cells(eng: Any) -> list[int]:
    return [s["kv_tokens"] for s in eng.slot_state()]


def test_idle_conversation_moves_to_ram_and_continues_bit_exact(
    default_model_path: Path, reference: Any  # noqa: F811
) -> None:
    rec = Recorder()
    eng = engine(default_model_path, rec)
    try:
        base = eng.tokenize(LONG_TEXT)
        _, stats = run(eng, rec, "turn1", prompt_tokens=base, max_tokens=6)
        eventually(lambda: cells(eng) == [0, 0])  # the idle engine moved it out of the cache
        assert eng.host_cache_stats()["entries"] == 1
        assert all(s["pos_max"] == -1 for s in eng.slot_state())  # llama.cpp agrees

        follow = base + stats["generated_tokens"] + eng.tokenize(" The end.", add_bos=False)
        _, stats2 = run(eng, rec, "turn2", prompt_tokens=follow, max_tokens=8)
        assert stats2["prompt_cached_tokens"] >= len(base) + 5  # prompt + replies but the last
        assert eng.host_cache_stats()["restored"] == 1
        got = stats2["generated_tokens"]
        assert len(got) == 8
        assert_greedy_path(reference, follow, got)
    finally:
        eng.close()


def test_finished_request_leaves_the_cache_while_another_decodes(
    default_model_path: Path,
) -> None:
    rec = Recorder()
    eng = engine(default_model_path, rec)
    try:
        eng.submit(GenerationRequest("long", prompt="Once upon a time", max_tokens=400,
                                     sampling=GREEDY, ignore_eos=True))
        run(eng, rec, "short", prompt=LONG_TEXT, max_tokens=3)
        # the next step moved "short" to RAM: only "long" holds cells while it decodes
        eventually(lambda: sorted(c > 0 for c in cells(eng)) == [False, True])
        assert "long" not in rec.finished
        assert eng.host_cache_stats()["saved"] == 1
        eng.cancel("long")
        rec.wait("long")
    finally:
        eng.close()


def test_a_slot_cut_down_for_another_prompt_keeps_its_sequence_in_ram(
    default_model_path: Path, reference: Any  # noqa: F811
) -> None:
    """One slot: "next" waits while "first" runs and takes the slot the moment it is free,
    reusing only BOS of it. What it cuts off is saved first, so "first" continues from RAM
    (this is also how a preempted request resumes when no park is free)."""
    rec = Recorder()
    eng = engine(default_model_path, rec, n_slots=1)
    try:
        base = eng.tokenize(LONG_TEXT)
        eng.submit(GenerationRequest("first", prompt_tokens=base, max_tokens=12,
                                     sampling=GREEDY, ignore_eos=True))
        eng.submit(GenerationRequest("next", prompt="Hi", max_tokens=2, sampling=GREEDY))
        rec.wait("first", "next")
        assert rec.started("next")["cached_tokens"] == 1  # BOS, in place
        follow = base + rec.finished["first"][1]["generated_tokens"]
        _, stats = run(eng, rec, "again", prompt_tokens=follow, max_tokens=4)
        assert stats["prompt_cached_tokens"] >= len(base) + 10
        assert stats["generated_tokens"] == llama_greedy(reference, follow, 4)
    finally:
        eng.close()


def test_budget_evicts_least_recently_used_and_zero_keeps_cells_in_place(
    default_model_path: Path,
) -> None:
    rec = Recorder()
    eng = engine(default_model_path, rec, host_cache_bytes=1_000_000)  # one ~40-token sequence
    try:
        run(eng, rec, "a", prompt="Apples " + LONG_TEXT, max_tokens=2)
        eventually(lambda: eng.host_cache_stats()["saved"] == 1)
        run(eng, rec, "b", prompt="Rivers " + LONG_TEXT, max_tokens=2)
        eventually(lambda: eng.host_cache_stats()["saved"] == 2)
        st = eng.host_cache_stats()
        assert st["entries"] == 1 and st["evicted"] == 1 and st["bytes"] <= 1_000_000
    finally:
        eng.close()

    rec = Recorder()
    eng = engine(default_model_path, rec, host_cache_bytes=0)
    try:
        run(eng, rec, "c", prompt=LONG_TEXT, max_tokens=2)
        time.sleep(0.2)
        assert max(cells(eng)) > 0 and eng.host_cache_stats()["saved"] == 0
    finally:
        eng.close()


def saved_but_unrestorable(eng: Any, rec: Recorder) -> tuple[list[int], list[int]]:
    """Run a request until the host cache holds it, then make every restore fail as a full
    KV cache would. Returns its prompt and the prompt that continues it."""
    base = eng.tokenize(LONG_TEXT)
    _, stats = run(eng, rec, "one", prompt_tokens=base, max_tokens=4)
    eventually(lambda: eng.host_cache_stats()["entries"] == 1)
    eng._host.restore = lambda *a, **kw: False
    return base, base + stats["generated_tokens"]


def test_a_failed_restore_falls_back_to_evaluating_the_prompt(
    default_model_path: Path, reference: Any  # noqa: F811
) -> None:
    """llama.cpp refuses a restore when it finds no room: the request is evaluated in full
    and still gives Llama's output."""
    rec = Recorder()
    eng = engine(default_model_path, rec)
    try:
        base, follow = saved_but_unrestorable(eng, rec)
        _, stats2 = run(eng, rec, "two", prompt_tokens=follow, max_tokens=6)
        assert stats2["prompt_cached_tokens"] == 0
        assert stats2["generated_tokens"] == llama_greedy(reference, follow, 6)
    finally:
        eng.close()


def test_a_failed_restore_into_the_slot_holding_the_next_best_prefix(
    default_model_path: Path, reference: Any  # noqa: F811
) -> None:
    """One slot: "other" shares 10 tokens with "again" and still holds them when "again" is
    admitted; the host cache holds more of "again" but cannot restore it. The slot's cells
    went to RAM on the way, so "again" must not count on those 10 tokens either."""
    rec = Recorder()
    eng = engine(default_model_path, rec, n_slots=1)
    try:
        base, follow = saved_but_unrestorable(eng, rec)
        other = base[:10] + eng.tokenize(" and then nothing happened", add_bos=False)
        eng.submit(GenerationRequest("other", prompt_tokens=other, max_tokens=8,
                                     sampling=GREEDY, ignore_eos=True))
        eng.submit(GenerationRequest("again", prompt_tokens=follow, max_tokens=6,
                                     sampling=GREEDY, ignore_eos=True))
        rec.wait("other", "again")
        assert "again" not in rec.errors, rec.errors.get("again")
        _, stats2 = rec.finished["again"]
        assert stats2["generated_tokens"] == llama_greedy(reference, follow, 6)
    finally:
        eng.close()


def test_sliding_window_entries_serve_continuations_not_short_prefixes(
    default_model_path: Path, reference: Any  # noqa: F811
) -> None:
    """Gemma 3's window layers keep 512 positions, and a saved sequence keeps only its last
    window of them. "turn" continues "start" from RAM; "start" again (a regenerated first
    turn) cannot use the long entry's cells, is evaluated in full, and is saved again even
    though the long entry begins with all of its tokens: only that copy has their window."""
    rec = Recorder()
    eng = engine(default_model_path, rec, n_slots=1, n_ctx=2048)
    try:
        start = eng.tokenize(LONG_TEXT * 4)[:120]
        _, s1 = run(eng, rec, "start", prompt_tokens=start, max_tokens=4)
        eventually(lambda: eng.host_cache_stats()["entries"] == 1)
        turn = start + s1["generated_tokens"] + eng.tokenize(LONG_TEXT * 20, add_bos=False)[:700]
        _, s2 = run(eng, rec, "turn", prompt_tokens=turn, max_tokens=2)
        assert s2["prompt_cached_tokens"] >= len(start) + 3  # restored, then extended
        eventually(lambda: eng.host_cache_stats()["saved"] == 2)
        _, s3 = run(eng, rec, "start-again", prompt_tokens=start, max_tokens=4)
        assert s3["prompt_cached_tokens"] == 0  # the long entry's window is elsewhere
        assert s3["generated_tokens"] == s1["generated_tokens"]
        eventually(lambda: eng.host_cache_stats()["saved"] == 3)  # kept despite the long one
        _, s4 = run(eng, rec, "start-3", prompt_tokens=start, max_tokens=4)
        assert s4["prompt_cached_tokens"] == len(start) - 1
        assert s4["generated_tokens"] == llama_greedy(reference, start, 4)
    finally:
        eng.close()

"""Parking on the real default model: a preempted request keeps its KV cells on a spare sequence
id while another request uses its slot, resumes from them, and parks give way when the cache
needs room. Greedy outputs are compared with llama-cpp-python's ``Llama``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_engine import GREEDY, LONG_TEXT, Recorder, llama_greedy, run

from infernod.backends.base import GenerationRequest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def ref(default_model_path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(str(default_model_path), n_ctx=2048, n_threads=2, verbose=False)


def make_engine(path: Path, rec: Recorder, **kw: Any) -> Any:
    from infernod.backends.gguf import GgufEngine

    eng = GgufEngine(path, n_slots=1, prefill_chunk=64, sink=rec, **kw)
    eng.start()
    return eng


def preempt_after(eng: Any, rec: Recorder, rid: str, n: int, **kw: Any) -> list[int]:
    """Run a greedy request until it has delivered n tokens, preempt it, return its tokens."""

    def hook(r: str, text: str, k: int) -> None:
        if r == rid and sum(c[1] for c in rec.chunks(rid)) >= n:
            eng.preempt(rid)

    rec.on_token_hook = hook
    try:
        eng.submit(GenerationRequest(rid, sampling=GREEDY, ignore_eos=True, **kw))
        rec.wait(rid)
    finally:
        rec.on_token_hook = None
    reason, stats = rec.finished[rid]
    assert reason == "preempted"
    return stats["generated_tokens"]


def test_resume_reuses_parked_cells_after_another_request_used_the_slot(
    default_model_path: Path, ref: Any
) -> None:
    """One slot, a 600-token prompt (longer than Gemma 3's 512-position window): A is paused,
    B (long enough to overwrite A's cells outside the window) runs in the only slot, A comes
    back with its tokens and continues from its parked cells, exactly as if never paused."""
    rec = Recorder()
    eng = make_engine(default_model_path, rec, n_ctx=2048)
    try:
        assert eng.park_slots == 1
        prompt = eng.tokenize(LONG_TEXT * 40)[:600]
        done = preempt_after(eng, rec, "A", 4, prompt_tokens=prompt, max_tokens=16)
        assert [p["request_id"] for p in eng.park_state()] == ["A"]
        b_prompt = eng.tokenize("Hi there, how are you? " * 120)[:800]
        _, b = run(eng, rec, "B", prompt_tokens=b_prompt, max_tokens=4)
        assert b["prompt_cached_tokens"] <= 1  # B really overwrote the slot (BOS at most)
        park = eng.park_state()[0]
        assert park["request_id"] == "A" and park["pos_min"] > 0  # masked cells overwritten

        _, stats = run(eng, rec, "A2", prompt_tokens=prompt, resume_tokens=done, max_tokens=16)
        assert rec.started("A2")["cached_tokens"] >= len(prompt) + len(done) - 2
        assert eng.park_state()[0]["kv_tokens"] == 0  # consumed
        want = llama_greedy(ref, prompt, 16)
        assert stats["generated_tokens"] == want
        assert rec.text("A") + rec.text("A2") == ref.detokenize(want).decode()
    finally:
        eng.close()


def test_parks_give_way_when_the_cache_needs_room(default_model_path: Path, ref: Any) -> None:
    """256 cells, one slot: a parked 150-token request is evicted when a 200-token prompt is
    admitted, and again (on llama_decode finding no room) when a short prompt grows long.
    Neither request fails and both produce Llama's tokens. Parks are LRU-bounded."""
    rec = Recorder()
    eng = make_engine(default_model_path, rec, n_ctx=256)
    try:
        prompt = eng.tokenize(LONG_TEXT * 8)[:150]
        done = preempt_after(eng, rec, "A", 3, prompt_tokens=prompt, max_tokens=40)
        assert eng.park_state()[0]["kv_tokens"] >= 150
        big = eng.tokenize("Tell me about the weather in spring. " * 30)[:200]
        _, b = run(eng, rec, "B", prompt_tokens=big, max_tokens=4)  # would not fit beside A
        assert b["completion_tokens"] == 4
        assert eng.park_state()[0]["kv_tokens"] == 0
        assert eng.park_evictions() == {"lru": 0, "admission": 1, "decode": 0}

        done = preempt_after(
            eng, rec, "A2", 3, prompt_tokens=prompt, resume_tokens=done, max_tokens=40
        )
        assert rec.started("A2")["cached_tokens"] <= 1  # its park was gone
        assert eng.park_state()[0]["request_id"] == "A2"
        short = eng.tokenize("Count slowly:")
        _, c = run(eng, rec, "C", prompt_tokens=short, max_tokens=120)  # grows into A2's cells
        assert c["generated_tokens"] == llama_greedy(ref, short, 120)
        assert eng.park_state()[0]["kv_tokens"] == 0 and eng.park_evictions()["decode"] == 1

        _, a = run(eng, rec, "A3", prompt_tokens=prompt, resume_tokens=done, max_tokens=40)
        assert a["generated_tokens"] == llama_greedy(ref, prompt, 40)

        # LRU: one park, two preemptions: the newer one keeps it
        preempt_after(eng, rec, "X", 2, prompt="One two three", max_tokens=20)
        preempt_after(eng, rec, "Y", 2, prompt="Red green blue", max_tokens=20)
        assert [p["request_id"] for p in eng.park_state()] == ["Y"]
        assert eng.park_evictions()["lru"] == 1
        eng.cancel("Y")  # a parked request is no longer in the engine: cancel drops its cells
        _, _ = run(eng, rec, "Z", prompt="Hello", max_tokens=1)
        assert eng.park_state()[0]["kv_tokens"] == 0
        assert [e[0] for e in rec.events if e[1] == "Y"].count("finished") == 1  # no 2nd finish
    finally:
        eng.close()
    assert not rec.errors

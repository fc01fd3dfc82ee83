"""GgufEngine on the real default model (Gemma 3 270M): batching, stops, cancel, UTF-8, reuse.

Greedy outputs are compared with llama-cpp-python's own ``Llama`` on the same prompt, so a
change that breaks batching, positions or prefix reuse shows up as different tokens.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.backends.textstream import StopMatcher, TextStream

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The capital of France is"
LONG_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "told stories about the lighthouse, the storms and the ships that never came back. "
)
WAIT_S = 120


class Recorder:
    """An EngineSink that records every call, in order, and lets a test wait for finishes."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.finished: dict[str, tuple[str, dict[str, Any]]] = {}
        self.errors: dict[str, tuple[str, str, str | None]] = {}
        self.on_token_hook: Any = None
        self._cv = threading.Condition()

    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        with self._cv:
            self.events.append(("started", request_id, info))

    def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None:
        with self._cv:
            self.events.append(("tokens", request_id, text, n_tokens))
        if self.on_token_hook is not None:
            self.on_token_hook(request_id, text, n_tokens)

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        with self._cv:
            self.events.append(("finished", request_id, reason))
            self.finished[request_id] = (reason, stats)
            self._cv.notify_all()

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        with self._cv:
            self.events.append(("error", request_id, code))
            self.errors[request_id] = (code, message, hint)
            self._cv.notify_all()

    def wait(self, *request_ids: str) -> None:
        with self._cv:
            ok = self._cv.wait_for(
                lambda: all(r in self.finished or r in self.errors for r in request_ids), WAIT_S
            )
        assert ok, f"requests {request_ids} did not finish"

    def text(self, request_id: str) -> str:
        return "".join(e[2] for e in self.events if e[0] == "tokens" and e[1] == request_id)

    def chunks(self, request_id: str) -> list[tuple[str, int]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "tokens" and e[1] == request_id]

    def started(self, request_id: str) -> dict[str, Any]:
        return next(e[2] for e in self.events if e[0] == "started" and e[1] == request_id)


@pytest.fixture(scope="module")
def sink() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def engine(default_model_path: Path, sink: Recorder) -> Any:
    from infernod.backends.gguf import GgufEngine

    eng = GgufEngine(default_model_path, n_ctx=256, n_slots=8, prefill_chunk=64, sink=sink)
    eng.start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(default_model_path: Path) -> Any:
    """llama-cpp-python's own high-level API, the behaviour we must match."""
    from llama_cpp import Llama

    return Llama(str(default_model_path), n_ctx=2048, n_threads=2, verbose=False)


def llama_greedy(llm: Any, tokens: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(tokens, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) >= n:
            break
    return out


def greedy_gaps(llm: Any, tokens: list[int], got: list[int]) -> list[float]:
    """How far below the reference's best logit each of ``got`` is, step by step, following
    ``got`` (0.0 where it is the argmax)."""
    import numpy as np

    llm.reset()
    llm.eval(tokens)
    gaps = []
    for tok in got:
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        gaps.append(float(logits.max() - logits[tok]))
        llm.eval([tok])
    return gaps


def assert_greedy_path(llm: Any, tokens: list[int], got: list[int], tol: float = 0.25) -> None:
    """``got`` is a greedy continuation of ``tokens`` up to float noise.

    llama.cpp's logits depend on how a sequence was batched (a prompt in one batch, or a
    cached prefix plus a short suffix), so a near-tie can flip between the two. A cache that
    restored the wrong cells picks tokens whole logits below the best; the bound catches it."""
    gaps = greedy_gaps(llm, tokens, got)
    assert max(gaps) <= tol, f"not a greedy path: gaps {[round(g, 3) for g in gaps]}"


def run(engine: Any, sink: Recorder, rid: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("ignore_eos", True)
    engine.submit(GenerationRequest(rid, **kw))
    sink.wait(rid)
    assert rid not in sink.errors, sink.errors.get(rid)
    return sink.finished[rid]


# ---- pure units ------------------------------------------------------------------------------


def test_stop_matcher_holds_back_prefix_and_never_emits_stop() -> None:
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("abE") == ("ab", False)
    assert m.push("x") == ("Ex", False)


def test_text_stream_waits_for_whole_utf8_character() -> None:
    data = "ꙮ!".encode()
    ts = TextStream([])
    assert [ts.push(data[i : i + 1]) for i in range(len(data))] == ["", "", "ꙮ", "!"]
    assert ts.flush() == ""


# ---- real model ------------------------------------------------------------------------------


@pytest.mark.model
def test_greedy_matches_llama_cpp_python(engine: Any, sink: Recorder, reference: Any) -> None:
    tokens = engine.tokenize(PROMPT)
    _, stats = run(engine, sink, "greedy", prompt_tokens=tokens, max_tokens=12)
    assert stats["generated_tokens"] == llama_greedy(reference, tokens, 12)
    assert stats["completion_tokens"] == 12
    assert stats["finish_reason"] == "length"
    assert reference.detokenize(stats["generated_tokens"]).decode() == sink.text("greedy")
    for key in ("tokenize_ms", "prefill_ms", "decode_ms", "detokenize_ms", "ttft_ms"):
        assert stats[key] >= 0
    assert stats["itl_ms"]["max"] >= stats["itl_ms"]["p50"] > 0
    assert stats["tokens_per_s"] > 0


@pytest.mark.model
def test_eight_concurrent_requests_complete_in_order(engine: Any, sink: Recorder) -> None:
    prompts = [f"Item {i}: a short note about the number {i}." for i in range(8)]
    want = {f"c{i}": 6 + i for i in range(8)}
    for i, rid in enumerate(want):
        req = GenerationRequest(
            rid, prompt=prompts[i], max_tokens=want[rid], sampling=GREEDY, ignore_eos=True
        )
        engine.submit(req)
    sink.wait(*want)
    for rid, n in want.items():
        reason, stats = sink.finished[rid]
        assert (reason, stats["completion_tokens"]) == ("length", n)
        assert sum(c[1] for c in sink.chunks(rid)) == n
        # the deltas, in arrival order, spell exactly the detokenized token sequence
        expected = b"".join(engine.token_bytes(t) for t in stats["generated_tokens"])
        assert sink.text(rid) == expected.decode("utf-8", errors="replace")
    # they really ran side by side: every request started before the first one finished
    first_finish = min(i for i, e in enumerate(sink.events) if e[0] == "finished" and e[1] in want)
    starts = [i for i, e in enumerate(sink.events) if e[0] == "started" and e[1] in want]
    assert max(starts) < first_finish
    assert engine.free_slots() == 8


@pytest.mark.model
def test_greedy_argmax_picks_the_samplers_token_for_every_sequence(
    engine: Any, sink: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain greedy skips the sampler chain (it copies the 262k-token vocabulary per sequence
    and step): on the same logits, for 8 sequences in one batch, step after step, the argmax
    must be exactly the token llama.cpp's greedy sampler picks."""
    from infernod.backends import llama_native as native

    llama = native.bindings()
    chain = native.make_sampler(engine._n_vocab, GREEDY, [])
    fast = native.argmax_token
    picks: list[tuple[int, int]] = []

    def both(ctx: Any, idx: int, n_vocab: int) -> int:
        got = fast(ctx, idx, n_vocab)
        picks.append((got, int(llama.llama_sampler_sample(chain, ctx, idx))))
        return got

    monkeypatch.setattr(native, "argmax_token", both)
    ids = [f"argmax{i}" for i in range(8)]
    try:
        with engine._cond:  # all 8 admitted together: they decode in one batch
            for i, rid in enumerate(ids):
                engine.submit(GenerationRequest(rid, prompt=f"List {i}: the {i} best ideas are",
                                                max_tokens=12, sampling=GREEDY, ignore_eos=True))
        sink.wait(*ids)
    finally:
        llama.llama_sampler_free(chain)
    assert all(sink.finished[rid][0] == "length" for rid in ids)
    assert len(picks) == 8 * 12
    assert [a for a, _ in picks] == [b for _, b in picks]
    # a penalised or sampled request still goes through its chain
    assert not native.plain_greedy(SamplingParams(temperature=0.0, repeat_penalty=1.3))
    assert not native.plain_greedy(SamplingParams(temperature=0.7))


@pytest.mark.model
def test_cancel_stops_within_one_step_and_frees_the_slot(engine: Any, sink: Recorder) -> None:
    seen: list[int] = []
    cancelled_at: list[int] = []

    def hook(rid: str, text: str, n: int) -> None:
        if rid != "cancel-me":
            return
        seen.append(n)
        if len(seen) == 3:
            cancelled_at.append(len(seen))
            engine.cancel("cancel-me")  # from the decode thread: applied before the next step

    sink.on_token_hook = hook
    try:
        engine.submit(
            GenerationRequest(
                "cancel-me", prompt=PROMPT, max_tokens=200, sampling=GREEDY, ignore_eos=True
            )
        )
        sink.wait("cancel-me")
    finally:
        sink.on_token_hook = None
    reason, stats = sink.finished["cancel-me"]
    assert reason == "cancelled"
    assert len(seen) == cancelled_at[0]  # not a single token after the cancel
    assert stats["completion_tokens"] <= 4
    assert engine.free_slots() == 8
    slot = engine.slot_state()[sink.started("cancel-me")["slot"]]
    assert (slot["request_id"], slot["kv_tokens"], slot["pos_max"]) == (None, 0, -1)  # cells gone
    _, stats2 = run(engine, sink, "after-cancel", prompt=PROMPT, max_tokens=3)
    assert stats2["completion_tokens"] == 3


@pytest.mark.model
def test_cancel_from_another_thread_frees_slot(engine: Any, sink: Recorder) -> None:
    got_tokens = threading.Event()
    sink.on_token_hook = lambda rid, text, n: rid == "cancel-2" and got_tokens.set()
    try:
        engine.submit(
            GenerationRequest(
                "cancel-2", prompt=PROMPT, max_tokens=200, sampling=GREEDY, ignore_eos=True
            )
        )
        assert got_tokens.wait(WAIT_S)
        engine.cancel("cancel-2")
        sink.wait("cancel-2")
    finally:
        sink.on_token_hook = None
    reason, stats = sink.finished["cancel-2"]
    assert reason == "cancelled" and stats["completion_tokens"] < 200
    assert engine.free_slots() == 8


@pytest.mark.model
def test_stop_string_split_across_tokens(engine: Any, sink: Recorder) -> None:
    _, stats = run(engine, sink, "nostop", prompt=PROMPT, max_tokens=12)
    pieces = [engine.token_bytes(t).decode() for t in stats["generated_tokens"]]
    full = "".join(pieces)
    # a stop string made of the end of one token and the start of the next
    k = next(
        i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    reason, _ = run(engine, sink, "stop", prompt=PROMPT, max_tokens=12, stop=[stop])
    assert reason == "stop"
    assert sink.text("stop") == full[: full.index(stop)]
    assert stop not in sink.text("stop")


@pytest.mark.model
def test_prompt_longer_than_context_is_rejected(engine: Any, sink: Recorder) -> None:
    engine.submit(GenerationRequest("too-long", prompt=LONG_TEXT * 10, max_tokens=4))
    sink.wait("too-long")
    code, message, hint = sink.errors["too-long"]
    assert code == "context_exceeded"
    n_prompt = len(engine.tokenize(LONG_TEXT * 10))
    assert str(n_prompt) in message and "256" in message
    assert hint
    assert engine.free_slots() == 8


@pytest.mark.model
def test_multibyte_character_split_across_tokens_arrives_whole(engine: Any, sink: Recorder) -> None:
    # "ꙮ" is three byte-fallback tokens in Gemma's vocabulary; the model repeats the pattern
    assert len(engine.tokenize("ꙮ", add_bos=False)) == 3
    _, stats = run(engine, sink, "utf8", prompt="ꙮ " * 6, max_tokens=8)
    assert sink.text("utf8") == "ꙮ ꙮ "
    for text, n in sink.chunks("utf8"):
        assert "\ufffd" not in text
        if "ꙮ" in text:
            assert n >= 3  # the delta carries all three tokens of the character


@pytest.mark.model
def test_prefix_reuse_reports_cached_tokens_and_same_output(
    engine: Any, sink: Recorder, reference: Any
) -> None:
    base = engine.tokenize(LONG_TEXT)
    run(engine, sink, "warm", prompt_tokens=base, max_tokens=4)
    follow = base + engine.tokenize(" The fisherman said", add_bos=False)
    _, stats = run(engine, sink, "reuse", prompt_tokens=follow, max_tokens=8)
    assert sink.started("reuse")["cached_tokens"] == stats["prompt_cached_tokens"]
    assert stats["prompt_cached_tokens"] >= len(base)
    got = stats["generated_tokens"]
    assert len(got) == 8
    assert_greedy_path(reference, follow, got)


@pytest.mark.model
def test_preempt_returns_tokens_and_resume_continues(
    engine: Any, sink: Recorder, reference: Any
) -> None:
    tokens = engine.tokenize(PROMPT)

    def hook(rid: str, text: str, n: int) -> None:
        if rid == "pre" and sum(c[1] for c in sink.chunks("pre")) >= 3:
            engine.preempt("pre")

    sink.on_token_hook = hook
    try:
        engine.submit(
            GenerationRequest(
                "pre", prompt_tokens=tokens, max_tokens=10, sampling=GREEDY, ignore_eos=True
            )
        )
        sink.wait("pre")
    finally:
        sink.on_token_hook = None
    reason, stats = sink.finished["pre"]
    assert reason == "preempted"
    done = stats["generated_tokens"]
    assert 3 <= len(done) < 10
    _, stats2 = run(
        engine, sink, "resumed", prompt_tokens=tokens, resume_tokens=done, max_tokens=10
    )
    assert stats2["generated_tokens"] == llama_greedy(reference, tokens, 10)
    assert stats2["prompt_cached_tokens"] > 0


@pytest.mark.model
def test_sliding_window_reuse_only_while_window_cells_exist(
    default_model_path: Path, reference: Any
) -> None:
    """Gemma 3's SWA layers keep a window of 512 positions; with swa_full=False the cache is
    small (768 cells here: no park, which would add a window) and old cells get overwritten. A
    prefix whose window is gone must be evaluated again; one whose window is still there is
    reused. Both give Llama's output. (Parks under SWA: test_engine_park.py.)"""
    from infernod.backends.gguf import GgufEngine

    rec = Recorder()
    eng = GgufEngine(  # no host cache: this is about cells that stay in the KV cache
        default_model_path, n_ctx=2048, n_slots=1, prefill_chunk=64, sink=rec, park_slots=0,
        host_cache_bytes=0,
    )
    eng.start()
    try:
        long_prompt = eng.tokenize(LONG_TEXT * 40)[:1000]
        run(eng, rec, "long", prompt_tokens=long_prompt, max_tokens=2)
        assert eng.slot_state()[0]["pos_min"] > 0  # the window really overwrote old cells
        short = long_prompt[:100] + eng.tokenize(" Suddenly", add_bos=False)
        _, stats = run(eng, rec, "short", prompt_tokens=short, max_tokens=6)
        assert stats["prompt_cached_tokens"] == 0
        assert stats["generated_tokens"] == llama_greedy(reference, short, 6)

        run(eng, rec, "long2", prompt_tokens=long_prompt, max_tokens=2)
        follow = long_prompt + eng.tokenize(" Suddenly", add_bos=False)
        _, stats = run(eng, rec, "follow", prompt_tokens=follow, max_tokens=6)
        assert stats["prompt_cached_tokens"] >= len(long_prompt)
        assert stats["generated_tokens"] == llama_greedy(reference, follow, 6)
    finally:
        eng.close()


@pytest.mark.model
def test_seeded_sampling_repeats_and_penalties_change_the_output(
    engine: Any, sink: Recorder
) -> None:
    hot = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, seed=1234)
    _, a = run(engine, sink, "seed-a", prompt=PROMPT, max_tokens=10, sampling=hot)
    _, b = run(engine, sink, "seed-b", prompt=PROMPT, max_tokens=10, sampling=hot)
    assert a["generated_tokens"] == b["generated_tokens"]
    # greedy repeats the pattern; a strong presence penalty must break the repetition
    _, plain = run(engine, sink, "rep-plain", prompt="ꙮ " * 6, max_tokens=8)
    penalised = SamplingParams(temperature=0.0, presence_penalty=5.0, repeat_last_n=64)
    _, pen = run(engine, sink, "rep-pen", prompt="ꙮ " * 6, max_tokens=8, sampling=penalised)
    assert pen["generated_tokens"] != plain["generated_tokens"]


@pytest.mark.model
def test_engine_reports_memory_and_offload_support(engine: Any) -> None:
    mem = engine.memory_bytes()
    assert mem["model_bytes"] > 100 * 2**20  # the 270M Q4_K_M weights
    assert mem["context_bytes"] > 0
    assert mem["total_bytes"] == mem["model_bytes"] + mem["context_bytes"]
    assert isinstance(engine.supports_gpu_offload, bool)


@pytest.mark.model
def test_long_prompt_is_prefilled_in_chunks_while_others_decode(
    engine: Any, sink: Recorder
) -> None:
    """prefill_chunk is 64: a 200-token prompt takes 4 steps, and the running stream gets a
    token in each of them instead of waiting for the whole prompt."""
    got_tokens = threading.Event()
    sink.on_token_hook = lambda rid, text, n: rid == "runner" and got_tokens.set()
    try:
        engine.submit(
            GenerationRequest(
                "runner", prompt=PROMPT, max_tokens=40, sampling=GREEDY, ignore_eos=True
            )
        )
        assert got_tokens.wait(WAIT_S)
        long_prompt = engine.tokenize(LONG_TEXT * 8)[:200]
        engine.submit(
            GenerationRequest("chunked", prompt_tokens=long_prompt, max_tokens=2, sampling=GREEDY)
        )
        sink.wait("runner", "chunked")
    finally:
        sink.on_token_hook = None
    events = [e for e in sink.events if e[1] in ("runner", "chunked")]
    start = next(i for i, e in enumerate(events) if e[0] == "started" and e[1] == "chunked")
    first = next(i for i, e in enumerate(events) if e[0] == "tokens" and e[1] == "chunked")
    runner_tokens = sum(e[3] for e in events[start:first] if e[0] == "tokens")
    assert runner_tokens >= 3  # one per prefill step (4 chunks of <= 64 tokens)


@pytest.mark.model
def test_vip_prompt_gets_a_step_of_its_own(engine: Any, sink: Recorder) -> None:
    """A vip's first token comes out of a step that holds only its prompt, before the
    running requests' next tokens; a normal request's prompt shares the step with them."""
    import time as _time

    def first_after(rid: str, others: tuple[str, ...]) -> bool:
        """Did rid's first token come before any of `others`' tokens emitted after rid
        was started?"""
        i = next(k for k, e in enumerate(sink.events) if e[0] == "started" and e[1] == rid)
        for e in sink.events[i + 1:]:
            if e[0] == "tokens" and e[1] == rid:
                return True
            if e[0] == "tokens" and e[1] in others:
                return False
        raise AssertionError(f"{rid} produced no token")

    results = {}
    for prio in ("normal", "vip"):
        busy = (f"busy-a-{prio}", f"busy-b-{prio}")
        for rid in busy:
            engine.submit(GenerationRequest(rid, prompt=LONG_TEXT, max_tokens=60,
                                            sampling=GREEDY, ignore_eos=True))
        while len(sink.chunks(busy[0])) < 3 or len(sink.chunks(busy[1])) < 3:
            _time.sleep(0.01)  # both are decoding
        rid = f"new-{prio}"
        engine.submit(GenerationRequest(rid, prompt="The lighthouse keeper said", max_tokens=2,
                                        sampling=GREEDY, ignore_eos=True, priority=prio))
        sink.wait(rid, *busy)
        results[prio] = first_after(rid, busy)
    assert results == {"normal": False, "vip": True}


@pytest.mark.model
def test_a_context_smaller_than_the_prefill_chunk_still_generates(
        default_model_path: Path, tmp_path: Path) -> None:
    """n_ctx 64 x 1 slot with the default 256-token chunk: llama.cpp clamps n_batch to the 64
    cells and used to abort on the first prompt chunk (GGML_ASSERT), so this runs in a child
    process: an abort there fails the test instead of killing the session."""
    import subprocess
    import sys

    script = f"""
import threading
from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.backends.gguf import GgufEngine
done = threading.Event()
out = {{}}
class Sink:
    def on_started(self, rid, info): pass
    def on_tokens(self, rid, text, n): pass
    def on_finished(self, rid, reason, stats):
        out["stats"] = stats
        done.set()
    def on_error(self, rid, code, message, hint):
        out["error"] = code
        done.set()
eng = GgufEngine({str(default_model_path)!r}, n_ctx=64, n_slots=1, sink=Sink())
eng.start()
eng.submit(GenerationRequest("r", prompt="one two three four five six seven eight nine ten "
                             "eleven twelve", max_tokens=8, ignore_eos=True,
                             sampling=SamplingParams(temperature=0.0)))
assert done.wait(60), "no finish"
eng.close()
print(out.get("error"), out.get("stats", {{}}).get("completion_tokens"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["None", "8"], proc.stdout

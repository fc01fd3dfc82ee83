"""A request's life around its model's life, in the real daemon: reprioritising waiting
embeds, an operator's unload of a model with queued work, keep-alive expiry, pins and LRU
eviction under a tight memory budget. Small ONNX models built with onnx.helper keep the
runners cheap (tests/onnx_graphs.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from daemon_harness import wait_for
from onnx_graphs import generic_graph, slow_graph, tiny_encoder

from infernod.client import AsyncClient, encode_array
from infernod.protocol.errors import InfernoError

ONNX_CONFIG = {"onnx": {"intra_op_threads": 1, "inter_op_threads": 1, "providers": ["CPU"]}}
# every runner starts this much later: a request for a model that is not loaded waits in
# the queue for that long, which is what the reprioritize test needs to see
SLOW_START = ["sh", "-c", 'sleep 3; exec "$@"', "slow-start"]
BIG = {"X": encode_array(np.ones((1024, 512), np.float32))}  # ~30 s on `slow`, stoppable
MEDIUM = {"X": encode_array(np.ones((48, 512), np.float32))}  # a second or two on `slow`
ROW = {"X": encode_array(np.arange(512, dtype=np.float32)[None, :])}
XY_NP = {"X": np.ones((1, 3), np.float32), "Y": np.ones((1, 3), np.float32)}
XY = {k: encode_array(v) for k, v in XY_NP.items()}


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'tiny' (a text encoder with a tokenizer: embed), 'slow' (long runs on a big batch),
    'gen-a' and 'gen-b' (two generic graphs: infer)."""
    d = tmp_path_factory.mktemp("lifecycle-models")
    tiny_encoder(d / "tiny")
    slow_graph(d / "slow.onnx", depth=6000, width=512)
    generic_graph(d / "gen-a.onnx")
    generic_graph(d / "gen-b.onnx")
    return d


def _config(models: Path, **extra: object) -> dict:
    return {"models": {"dirs": [str(models)], **extra}, **ONNX_CONFIG}


async def _rows(op: AsyncClient) -> dict[str, dict]:
    return {r["id"]: r for r in (await op.queue_list())["items"]}


async def _until_row(op: AsyncClient, rid: str, state: str, timeout: float = 30) -> dict:
    end = time.monotonic() + timeout
    got: dict[str, dict] = {}
    while time.monotonic() < end:
        got = await _rows(op)
        if got.get(rid, {}).get("state") == state:
            return got[rid]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rid} never {state}: {got}")


def test_reprioritize_a_queued_embed(daemon_factory, small_models: Path) -> None:
    """reprioritize reaches embed/infer requests like generations: a waiting embed (its
    model is still starting) moves to vip, the queue shows it, and it still gets its
    vectors."""
    d = daemon_factory(_config(small_models, runner_wrapper=SLOW_START))

    async def scenario() -> None:
        async with AsyncClient(d.endpoint, timeout=60) as a, \
                AsyncClient(d.endpoint, timeout=60) as op:
            mid, fut = await a.send("embed", {"model": "tiny", "texts": ["a b"],
                                              "priority": "low"})
            rid = f"{a.session}.{mid}"
            row = await _until_row(op, rid, "queued")
            assert row["kind"] == "embed" and row["class"] == "low", row
            got = await op.reprioritize(rid, "vip")
            assert got == {"request_id": rid, "priority": "vip", "state": "queued"}, got
            row = (await _rows(op))[rid]
            assert row["class"] == "vip" and row["effective_class"] == "vip", row
            reply = a.core.parse_reply(await asyncio.wait_for(fut, 60), mid)
            assert reply["dim"] == 3 and reply["stats"]["priority"] == "vip", reply["stats"]
            with pytest.raises(InfernoError) as e:  # done: nothing left to move
                await op.reprioritize(rid, "low")
            assert e.value.code == "unknown_request"

    asyncio.run(scenario())


def _loaded(c) -> dict[str, dict]:
    return {m["name"]: m for m in c.status()["models_loaded"]}


def test_operator_unload_fails_queued_requests_at_once(daemon_factory, small_models: Path) -> None:
    """An operator's unload ends the running request (aborted) and, at once, the ones still
    queued for the model (model_unloaded), instead of leaving them waiting forever."""
    d = daemon_factory(_config(small_models))

    async def scenario() -> None:
        async with AsyncClient(d.endpoint, timeout=60) as a, \
                AsyncClient(d.endpoint, timeout=60) as op:
            await a.load("slow")
            mid, running = await a.send("infer", {"model": "slow", "inputs": BIG})
            await _until_row(op, f"{a.session}.{mid}", "running")
            mid2, queued = await a.send("infer", {"model": "slow", "inputs": ROW})
            await _until_row(op, f"{a.session}.{mid2}", "queued")
            t0 = time.monotonic()
            await asyncio.wait_for(op.unload("slow"), 30)
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(running, 10), mid)
            assert e.value.code == "aborted", e.value
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(queued, 10), mid2)
            assert e.value.code == "model_unloaded", e.value
            assert "unloaded by an operator" in e.value.message and e.value.hint
            assert time.monotonic() - t0 < 10
            assert not (await _rows(op)), "nothing may stay queued for an unloaded model"
            assert "slow" not in {m["name"] for m in (await op.status())["models_loaded"]}

    asyncio.run(scenario())


def test_operator_unload_fails_a_queued_generate(daemon_factory) -> None:
    """The same for a generate queued behind a running one on a one-slot GGUF model: its
    stream ends with an error event model_unloaded."""
    d = daemon_factory({"models": {"slots": 1}})
    with d.client(timeout=60) as c, d.client(timeout=60) as op:
        c.load("gemma3-270m")
        first = c.generate("gemma3-270m", "Count from one to a thousand, in words.",
                           max_tokens=2000, ignore_eos=True)
        next(iter(first))  # running: the only slot is taken
        second = c.generate("gemma3-270m", "Hello", max_tokens=4)
        wait_for(lambda: any(r["id"] == second.request_id and r["state"] == "queued"
                             for r in op.queue_list()["items"]), 30, "the second queued")
        ends: dict[str, str] = {}

        def consume() -> None:  # c's streams, read by this thread alone from here on
            for name, stream in (("second", second), ("first", first)):
                try:
                    "".join(stream)
                    ends[name] = "done"
                except InfernoError as e:
                    ends[name] = e.code

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        op.unload("gemma3-270m")
        reader.join(30)  # a queued request that waits forever would hang here
        assert ends == {"second": "model_unloaded", "first": "aborted"}, ends
        assert op.queue_list()["items"] == []


def test_keep_alive_expiry_and_pin_in_the_daemon(daemon_factory, small_models: Path) -> None:
    """A model idle past its keep-alive is unloaded by the daemon's tick; a pinned one
    (keep_alive -1) stays; the models events say why."""
    d = daemon_factory(_config(small_models, keep_alive_s=1.0))
    with d.client(timeout=30, topics=("models",)) as c:
        c.load("gen-a", keep_alive=-1)
        c.load("gen-b")
        assert _loaded(c)["gen-a"]["pinned"] and not _loaded(c)["gen-b"]["pinned"]
        wait_for(lambda: "gen-b" not in _loaded(c), 10, "gen-b's keep-alive expiry")
        time.sleep(1.5)  # well past gen-a's would-be expiry
        assert "gen-a" in _loaded(c) and _loaded(c)["gen-a"]["keep_alive_left_s"] is None
        events = [ev.body for ev in c.take_events()
                  if getattr(ev, "topic", "") == "models" and ev.body.get("event") == "unloaded"]
        assert [(e["model"], e["reason"]) for e in events] == [("gen-b", "idle for 1s")], events
        out, _ = c.infer("gen-b", XY_NP)  # an expired model loads again on the next request
        assert np.array_equal(out["S"], np.full((1, 3), 2, np.float32))


def _budget_for_one(d, c, names: list[str]) -> int:
    """Load each model once (the registry learns what its runner really takes), unload
    them, and SIGHUP a budget that holds any one of them but never two."""
    sizes = []
    for name in names:
        sizes.append(c.load(name)["memory_bytes"])
        c.unload(name)
    budget = max(sizes) + (40 << 20)  # any runner takes far more than 40 MiB
    cfg = tomllib.loads(d.config_path.read_text())
    cfg["models"]["memory_budget_bytes"] = budget
    d.config_path.write_text(tomli_w.dumps(cfg))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(lambda: "memory_budget_bytes" in d.log(), 10, "the budget reload")
    return budget


def test_eviction_pin_and_reload_under_a_tight_budget(daemon_factory, small_models: Path) -> None:
    """Two models, a budget for one. A pinned model is never evicted (the other's request
    fails at once: it can never fit). Unpinned, it is evicted (LRU) for the other; a request
    for it then waits while the other is busy and loads it again once that one is idle,
    evicting it in turn: both answered, nothing refused."""
    d = daemon_factory(_config(small_models))

    async def scenario() -> None:
        async with AsyncClient(d.endpoint, timeout=60) as a, \
                AsyncClient(d.endpoint, timeout=60, topics=("models",)) as op:
            await a.load("gen-a", keep_alive=-1)
            with pytest.raises(InfernoError) as e:  # pinned: slow can never fit beside it
                await a.infer("slow", {"X": np.ones((1, 512), np.float32)})
            assert e.value.code == "insufficient_memory" and "gen-a pinned" in e.value.message
            assert {m["name"] for m in (await op.status())["models_loaded"]} == {"gen-a"}

            await a.load("gen-a", keep_alive=300)  # unpinned: evictable when idle
            await op.wait_welcome()
            mid, slow = await a.send("infer", {"model": "slow", "inputs": MEDIUM})
            for _ in range(500):  # slow's load evicts gen-a
                if "gen-a" not in {m["name"] for m in (await op.status())["models_loaded"]}:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("gen-a was never evicted")
            mid2, again = await a.send("infer", {"model": "gen-a", "inputs": XY})
            reply = a.core.parse_reply(await asyncio.wait_for(again, 60), mid2)
            assert np.array_equal(reply["outputs"]["S"]["shape"], [1, 3])
            assert reply["stats"]["load_wait_ms"] > 0
            a.core.parse_reply(await asyncio.wait_for(slow, 60), mid)
            unloaded = [(ev.body["model"], ev.body["reason"]) for ev in op.take_events()
                        if getattr(ev, "topic", "") == "models"
                        and ev.body.get("event") == "unloaded"]
            assert [m for m, _ in unloaded] == ["gen-a", "slow"], unloaded
            assert "to fit slow" in unloaded[0][1] and "to fit gen-a" in unloaded[1][1]
            assert {m["name"] for m in (await op.status())["models_loaded"]} == {"gen-a"}

    with d.client(timeout=60) as c:
        _budget_for_one(d, c, ["gen-a", "slow"])
    asyncio.run(scenario())

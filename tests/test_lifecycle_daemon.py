"""A request's life around its model's life, in the real daemon: reprioritising waiting
embeds, an operator's unload of a model with queued work, keep-alive expiry, pins and LRU
eviction under a tight memory budget. Small ONNX models built with onnx.helper keep the
runners cheap (tests/onnx_graphs.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from onnx_graphs import generic_graph, slow_graph, tiny_encoder

from infernod.client import AsyncClient, encode_array
from infernod.protocol.errors import InfernoError

ONNX_CONFIG = {"onnx": {"intra_op_threads": 1, "inter_op_threads": 1, "providers": ["CPU"]}}
# every runner starts this much later: a request for a model that is not loaded waits in
# the queue for that long, which is what the reprioritize test needs to see
SLOW_START = ["sh", "-c", 'sleep 3; exec "$@"', "slow-start"]
BIG = {"X": encode_array(np.ones((1024, 512), np.float32))}  # ~30 s on `slow`, stoppable
ROW = {"X": encode_array(np.arange(512, dtype=np.float32)[None, :])}
XY = {"X": encode_array(np.ones((1, 3), np.float32)), "Y": encode_array(np.ones((1, 3), np.float32))}


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

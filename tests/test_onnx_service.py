"""The request service's ONNX side with the real scheduler and a real worker engine on a
tiny encoder: batching limits, backpressure and deadlines, without a daemon."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from onnx_graphs import tiny_encoder, tiny_expected

from infernod.backends.onnx_engine import OnnxEngine
from infernod.daemon.lifecycle import RequestService
from infernod.daemon.models import LoadedModel
from infernod.daemon.requests import Kind, Request, RequestTable, State
from infernod.daemon.scheduler import QueueItem, Scheduler
from infernod.protocol.errors import InfernoError


class _Models:
    """What the request service asks ModelManager: ``loaded``, ``load_for_request``."""

    def __init__(self, engine: OnnxEngine) -> None:
        self.loaded = {"tiny": LoadedModel(name="tiny", info=None, engine=engine,
                                           state="loaded")}

    def attach(self, user: object) -> None:
        pass

    async def load_for_request(self, name: str, keep_alive_s: float | None,
                               wanted: object = None) -> float:
        return 0.0


class _Publisher:
    def publish(self, topic: str, type_: str, body: dict) -> None:
        pass


def _hold(svc: RequestService) -> None:
    """Take the model's one slot, as a running request would: what arrives now waits."""
    now = time.monotonic()
    svc.scheduler.set_slots("tiny", 1)
    svc.scheduler.submit(QueueItem(request_id="hold", client="x", model="tiny",
                                   priority="normal", submitted_at=now, deadline=None), now)
    assert [i.request_id for i in svc.scheduler.pop_ready("tiny", 1, now)] == ["hold"]


def _release(svc: RequestService) -> None:
    svc.scheduler.finish("hold")
    svc.dispatch("tiny")


def _queued(svc: RequestService) -> int:
    return sum(r.state is State.QUEUED for r in svc.requests.values())


@pytest.fixture
def engine(tmp_path: Path):
    eng = OnnxEngine(tiny_encoder(tmp_path / "tiny"), providers=["CPU"], intra_op_threads=1,
                     inter_op_threads=1, graph_optimization="all", max_batch=32)
    eng.start()
    yield eng
    eng.close()


def _service(engine: OnnxEngine, *, max_batch: int = 32, max_queue: int = 16) -> RequestService:
    cfg = SimpleNamespace(onnx=SimpleNamespace(max_batch=max_batch),
                          scheduler=SimpleNamespace(timeout_s=30, max_timeout_s=60))
    scheduler = Scheduler(max_queue_per_model=max_queue)
    return RequestService(cfg, _Models(engine), scheduler, _Publisher(),  # type: ignore[arg-type]
                          RequestTable(scheduler, _no_publish))


def _no_publish(topic: str, type_: str, body: dict) -> None:
    pass


def _job(n: int, texts: list[str], *, deadline_s: float | None = None,
         normalize: bool = False) -> Request:
    now = time.monotonic()
    return Request(kind=Kind.EMBED, request_id=f"s.{n}", session="s", model="tiny",
                   body={"texts": texts, "normalize": normalize}, priority="normal",
                   submitted=now, deadline=None if deadline_s is None else now + deadline_s,
                   timeout_s=30, future=asyncio.get_running_loop().create_future())


async def test_waiting_embeds_share_runs_up_to_max_batch(engine: OnnxEngine) -> None:
    svc = _service(engine, max_batch=4)
    _hold(svc)  # the model's one slot is taken: everything queues, then it frees
    texts = [["a"], ["b c"], ["d", "a b"], ["c"], ["a b c d a b c d"]]
    tasks = [asyncio.ensure_future(svc.call(_job(i, t))) for i, t in enumerate(texts)]
    await asyncio.sleep(0.05)
    assert _queued(svc) == 5
    _release(svc)
    replies = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    # 1 + 1 + 2 texts fill the first run (4); the 4th request starts the second
    assert [r["stats"]["batch_requests"] for r in replies] == [3, 3, 3, 2, 2]
    assert [r["stats"]["batch_texts"] for r in replies] == [4, 4, 4, 2, 2]
    assert svc.batches == 2
    for r, t in zip(replies, texts, strict=True):  # sharing a run never changes a vector
        got = np.frombuffer(r["vectors"]["data"], np.float32).reshape(r["vectors"]["shape"])
        want = np.vstack([tiny_expected(x.split()) for x in t])
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert replies[4]["truncated"] == [True]


async def test_backpressure_and_queued_deadline(engine: OnnxEngine) -> None:
    svc = _service(engine, max_queue=2)
    _hold(svc)
    late = asyncio.ensure_future(svc.call(_job(1, ["a"], deadline_s=0.2)))
    other = asyncio.ensure_future(svc.call(_job(2, ["b"])))
    await asyncio.sleep(0.01)
    with pytest.raises(InfernoError) as e:  # the model's queue holds 2: refused at once
        await svc.call(_job(3, ["c"]))
    assert e.value.code == "overloaded" and e.value.extra.get("retry_after_ms")
    # One table holds every kind's records: the queue topic lists embeds beside generations,
    # and the daemon's tick expires whatever the shared scheduler drops, through its runner.
    listed = {it["request_id"]: it for it in svc.requests.queue_snapshot(time.monotonic())["items"]}
    assert listed["s.1"]["kind"] == "embed" and listed["s.1"]["state"] == "queued", listed
    for item in svc.scheduler.expire(time.monotonic() + 1.0):  # a tick once the deadline
        rec = svc.requests.get(item.request_id)  # passed, before the request's own timer
        assert rec is not None
        svc.expired(rec)
    with pytest.raises(InfernoError) as e:  # fires: the tick expires it
        await asyncio.wait_for(late, 5)
    assert e.value.code == "deadline_exceeded" and "while the request was queued" in str(e.value)
    await asyncio.sleep(0.3)
    _release(svc)
    reply = await asyncio.wait_for(other, 30)
    assert reply["stats"]["batch_requests"] == 1 and reply["stats"]["queue_wait_ms"] >= 300

"""ONNX models served by the real daemon: embed and infer under the shared scheduler.

The exported MiniLM (cached in ~/.cache/inferno-test/minilm-onnx, see test_onnx.py) and a
generic graph built with onnx.helper sit in a model directory beside the default GGUF model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from daemon_harness import wait_for
from onnx_graphs import GENERIC_W, generic_graph, slow_graph
from test_onnx import _minilm_dir

from infernod.cli import app as cli
from infernod.client import AsyncClient, Event, encode_array
from infernod.protocol.errors import InfernoError

ONNX_CONFIG = {"onnx": {"intra_op_threads": 1, "inter_op_threads": 1, "providers": ["CPU"]}}


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir with 'minilm' (a link to the exported directory), 'generic.onnx' and
    'slow.onnx' (6000 nodes: a big batch runs for many seconds, a row for milliseconds)."""
    d = tmp_path_factory.mktemp("onnx-models")
    os.symlink(_minilm_dir(), d / "minilm")
    generic_graph(d / "generic.onnx")
    slow_graph(d / "slow.onnx", depth=6000, width=512)
    return d


@pytest.fixture
def onnx_daemon(daemon_factory, models_dir: Path, onnx_models: Path):
    return daemon_factory({"models": {"dirs": [str(models_dir), str(onnx_models)]},
                           **ONNX_CONFIG})


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    return (got * want).sum(axis=1) / np.linalg.norm(got, axis=1)


def test_minilm_served_by_the_daemon_matches_reference(onnx_daemon, onnx_models: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    ref = json.loads((onnx_models / "minilm" / "reference.json").read_text())
    with onnx_daemon.client(timeout=60) as c:
        listed = {m["name"]: m for m in c.models()}
        assert listed["minilm"]["kind"] == "onnx" and listed["minilm"]["onnx"]["kind"] == "embedding"
        assert listed["generic"]["onnx"]["kind"] == "generic"
        assert [i["name"] for i in listed["generic"]["onnx"]["inputs"]] == ["X", "Y"]
        assert listed["minilm"]["onnx"]["opset"] >= 17 and listed["minilm"]["size_bytes"] > 10**7
        assert listed["gemma3-270m"]["kind"] == "gguf"

        loaded = c.load("minilm")
        assert loaded["provider"] == "CPUExecutionProvider" and loaded["backend"] == "onnx"
        assert c.show("minilm")["provider"] == "CPUExecutionProvider"

        vectors, info = c.embed("minilm", ref["sentences"])
        assert vectors.dtype == np.float32 and vectors.shape == (len(ref["sentences"]), 384)
        cos = _cosines(vectors, np.array(ref["vectors"], dtype=np.float32))
        assert cos.min() >= 0.999, cos
        assert info["dim"] == 384 and info["truncated"] == [False] * len(ref["sentences"])
        assert all(n > 2 for n in info["tokens"])
        stats = info["stats"]
        for key in ("queue_wait_ms", "load_wait_ms", "total_ms", "run_ms", "tokenize_ms"):
            assert stats[key] >= 0, key
        assert stats["finish_reason"] == "done" and stats["model"] == "minilm"
        profiles = c.request("profiles.recent", {"n": 5})["profiles"]  # same profiler as generate
        assert any(p["model"] == "minilm" and p["prompt_tokens"] == sum(info["tokens"])
                   for p in profiles), profiles

        v, _ = c.embed("minilm", ["How do I reset my password?",
                                  "What are the steps to change my login password?",
                                  "The orchestra played Beethoven's fifth symphony last night."])
        assert v[0] @ v[1] > v[0] @ v[2] + 0.3, (v[0] @ v[1], v[0] @ v[2])

        raw, info = c.embed("minilm", ["a man is eating food", "x " * 400], normalize=False)
        assert abs(np.linalg.norm(raw[0]) - 1.0) > 0.01 and info["normalized"] is False
        assert info["truncated"] == [False, True] and info["tokens"][1] == 256

        with pytest.raises(InfernoError) as e:  # GGUF models embed (test_gguf_embed.py)
            c.infer("gemma3-270m", {"x": np.zeros(1, dtype=np.float32)})
        assert e.value.code == "not_supported" and "generate" in (e.value.hint or "")
        with pytest.raises(InfernoError) as e:
            c.embed("generic", ["hello"])
        assert e.value.code == "not_supported" and "infer" in (e.value.hint or "")
        with pytest.raises(InfernoError) as e:
            list(c.generate("minilm", "hello", max_tokens=4))
        assert e.value.code == "not_supported"

    rc = cli.main(["--endpoint", onnx_daemon.endpoint, "embed", "minilm", ref["sentences"][0],
                   ref["sentences"][2], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["dim"] == 384 and len(out["vectors"]) == 2
    got = np.array(out["vectors"], dtype=np.float32)
    assert _cosines(got, np.array([ref["vectors"][0], ref["vectors"][2]])).min() >= 0.999


@pytest.mark.parametrize(
    ("inputs", "needles"),
    [
        ({"X": np.zeros((2, 3), np.float32), "W": np.zeros((2, 3), np.float32)},
         ["unknown input", "'W'", "'X'", "'Y'"]),
        ({"X": np.zeros((2, 3), np.int64), "Y": np.zeros((2, 3), np.float32)},
         ["'X'", "expected dtype float32", "got int64"]),
        ({"X": np.zeros((2, 4), np.float32), "Y": np.zeros((2, 4), np.float32)},
         ["'X'", "dimension 1 must be 3", "got 4"]),
    ],
    ids=["name", "dtype", "shape"],
)  # fmt: skip
def test_generic_graph_through_infer(onnx_daemon, inputs: dict, needles: list[str]) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.full((4, 3), 0.5, dtype=np.float32)
    with onnx_daemon.client(timeout=60) as c:
        outputs, stats = c.infer("generic", {"X": x, "Y": y})
        assert np.array_equal(outputs["Z"], (x + y) @ GENERIC_W) and outputs["Z"].dtype == np.float32
        assert np.array_equal(outputs["S"], x + y)
        assert stats["finish_reason"] == "done" and stats["queue_wait_ms"] >= 0
        with pytest.raises(InfernoError) as e:
            c.infer("generic", inputs)
        assert e.value.code == "bad_request"
        for needle in needles:
            assert needle in e.value.message, (needle, e.value.message)
        # raw wire arrays too: a short data buffer names the input
        bad = encode_array(x)
        bad["data"] = bad["data"][:-4]
        with pytest.raises(InfernoError) as e:
            c.request("infer", {"model": "generic", "inputs": {"X": bad, "Y": encode_array(y)}})
        assert e.value.code == "bad_request" and "'X'" in e.value.message
        with pytest.raises(InfernoError) as e:
            c.infer("gemma3-270m", {"X": x})
        assert e.value.code == "not_supported"
        # the daemon is still serving the model after the errors
        outputs, _ = c.infer("generic", {"X": x[:1], "Y": y[:1]})
        assert np.array_equal(outputs["Z"], ((x + y) @ GENERIC_W)[:1])


def test_embeds_interleave_with_generation_and_batch(onnx_daemon) -> None:
    """A GGUF stream and a flood of embeds on one daemon: the stream completes, pings stay
    answered, and embeds that waited together ran as one batch."""
    with onnx_daemon.client(timeout=60) as c:
        c.load("gemma3-270m")
        c.load("minilm")
    stop = threading.Event()
    pings: list[tuple[float, float]] = []  # (monotonic time answered, latency ms)
    window: list[float] = []  # when the long embed was sent and answered
    errors: list[BaseException] = []

    def ping_loop() -> None:
        try:
            with onnx_daemon.client(timeout=10) as pc:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    pc.ping()
                    pings.append((time.monotonic(), (time.perf_counter() - t0) * 1000))
                    time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    async def embed_flood() -> list[dict]:
        long_texts = [f"sentence number {i} about inference servers and queues " * 20
                      for i in range(24)]
        async with AsyncClient(onnx_daemon.endpoint, timeout=60) as ac:
            await ac.wait_welcome()
            window.append(time.monotonic())
            first = asyncio.ensure_future(ac.embed("minilm", long_texts))
            first.add_done_callback(lambda _: window.append(time.monotonic()))
            await asyncio.sleep(0.05)  # the long one runs; these wait together behind it
            small = [ac.embed("minilm", [f"short text {i}"]) for i in range(6)]
            results = await asyncio.gather(first, *small)
        return [info for _, info in results]

    streamed: dict = {}

    def generate() -> None:  # consumed in its own thread, so its client keeps its lease
        try:
            with onnx_daemon.client(timeout=60) as gc:
                stream = gc.generate("gemma3-270m", "Once upon a time", max_tokens=48,
                                     temperature=0, ignore_eos=True)
                streamed["text"] = "".join(stream)
                streamed["stats"] = stream.stats
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ping_loop, daemon=True),
               threading.Thread(target=generate, daemon=True)]
    for t in threads:
        t.start()
    try:
        infos = asyncio.run(embed_flood())
        threads[1].join(120)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    assert streamed["stats"]["finish_reason"] == "length"
    assert streamed["stats"]["completion_tokens"] == 48 and streamed["text"]
    assert all(i["dim"] == 384 for i in infos)
    assert max(i["stats"]["batch_requests"] for i in infos[1:]) > 1, [i["stats"] for i in infos]
    latencies = [ms for _, ms in pings]
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 250, sorted(latencies)
    # pings kept being answered while the long embed ran (a run on the loop would stall them
    # all for its whole duration: a few hundred ms to seconds on this model)
    start, end = window
    during = [t for t, _ in pings if start < t < end]
    assert end - start < 0.5 or len(during) >= 5, (end - start, len(during))


def test_cancel_reaches_queued_and_running_onnx_requests(onnx_daemon) -> None:
    """embed/infer have generate's request ids (session.message id): they are listed in
    queue.list, the queue topic and status, and `cancel` ends them. A running one is
    stopped (RunOptions.terminate), so the model's worker is free again at once."""
    big = {"X": encode_array(np.ones((1024, 512), np.float32))}  # ~30 s on one CPU thread
    row = np.arange(512, dtype=np.float32)[None, :]

    async def scenario() -> None:
        async with AsyncClient(onnx_daemon.endpoint, timeout=60) as a, \
                AsyncClient(onnx_daemon.endpoint, timeout=60, topics=("queue",)) as op:
            await a.load("slow")
            await op.wait_welcome()

            async def rows() -> dict[str, dict]:
                return {r["id"]: r for r in (await op.queue_list())["items"]}

            async def until(pred, what: str) -> dict[str, dict]:
                for _ in range(1000):
                    got = await rows()
                    if pred(got):
                        return got
                    await asyncio.sleep(0.02)
                if slow.done():
                    a.core.parse_reply(slow.result(), mid)
                raise AssertionError(f"timed out waiting for {what}: {got}")

            mid, slow = await a.send("infer", {"model": "slow", "inputs": big})
            slow_id = f"{a.session}.{mid}"
            await until(lambda r: r.get(slow_id, {}).get("state") == "running", "slow running")
            mid2, waiting = await a.send("embed", {"model": "minilm", "texts": ["hi"]})
            mid3, queued = await a.send("infer", {"model": "slow",
                                                  "inputs": {"X": encode_array(row)}})
            queued_id = f"{a.session}.{mid3}"
            got = await until(lambda r: r.get(queued_id, {}).get("state") == "queued",
                              "second infer queued")
            assert got[slow_id]["kind"] == "infer" and got[slow_id]["model"] == "slow"
            q = got[queued_id]
            assert q["kind"] == "infer" and q["class"] == "normal" and q["position"] == 1
            assert q["client"] == a.session and q["age_s"] >= 0 and q["deadline_in_s"] is None
            status = (await op.status())["queue"]
            assert status["running"] >= 1 and status["queued"] >= 1, status
            snaps = [ev.body for ev in op.take_events()
                     if isinstance(ev, Event) and ev.topic == "queue" and ev.type == "queue"]
            assert any({it["request_id"]: it.get("kind") for it in s["items"]}.get(queued_id)
                       == "infer" for s in snaps), snaps
            assert not any(ev.type == "queued" for ev in a.stream_events(queued_id))

            # queued: the owner cancels it; it leaves the scheduler, its reply is `cancelled`
            assert (await a.cancel(queued_id))["state"] == "cancelled"
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(queued, 10), mid3)
            assert e.value.code == "cancelled"
            assert queued_id not in await rows()

            # running: an operator in another session stops it; the reply comes at once
            t0 = time.monotonic()
            assert (await op.cancel(slow_id))["state"] == "cancelled"
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(slow, 10), mid)
            assert e.value.code == "cancelled"
            with pytest.raises(InfernoError) as e:
                await op.cancel(slow_id)
            assert e.value.code == "unknown_request"
            # the worker was freed early: the next run does not wait out the stopped one
            out, _ = await a.infer("slow", {"X": row})
            assert np.array_equal(out["Y"], row)
            assert time.monotonic() - t0 < 10, time.monotonic() - t0
            a.core.parse_reply(await asyncio.wait_for(waiting, 60), mid2)  # other model, unharmed

    asyncio.run(scenario())


# -- runner processes: every ONNX model runs in one of its own, like a GGUF model -------------


def _onnx_runner_pid(c, model: str) -> int:
    for lm in c.status()["models_loaded"]:
        if lm["name"] == model and lm.get("runner_pid"):
            return int(lm["runner_pid"])
    raise AssertionError(f"{model} has no runner: {c.status()['models_loaded']}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _row(c, model: str) -> dict:
    return next(m for m in c.models() if m["name"] == model)


def test_onnx_model_runs_in_a_runner_process_that_dies_with_the_daemon(onnx_daemon) -> None:
    with onnx_daemon.client(timeout=60) as c:
        c.load("minilm")
        pid = _onnx_runner_pid(c, "minilm")
        assert pid != onnx_daemon.pid
        proc = psutil.Process(pid)
        assert proc.ppid() == onnx_daemon.pid  # a plain child: in the daemon's cgroup
        assert "infernod.runner" in " ".join(proc.cmdline())
        lm = next(m for m in c.status()["models_loaded"] if m["name"] == "minilm")
        assert lm["runner_rss_bytes"] > 20 << 20 and lm["runner_cpu_s"] > 0, lm
        assert lm["provider"] == "CPUExecutionProvider" and lm["backend"] == "onnx", lm
        assert lm["memory_bytes"] >= lm["runner_rss_bytes"] // 2  # the budget counts it
        assert _row(c, "minilm")["runner_pid"] == pid
        vectors, _ = c.embed("minilm", ["hello world"])
        assert vectors.shape == (1, 384)
        # onnxruntime is loaded in the runner, never in the daemon
        assert any("onnxruntime" in m.path for m in proc.memory_maps())
        assert not any("onnxruntime" in m.path
                       for m in psutil.Process(onnx_daemon.pid).memory_maps())
    onnx_daemon.kill()
    wait_for(lambda: _gone(pid), 5, f"ONNX runner {pid} to die with its daemon")


def test_runner_killed_mid_embed_ends_that_embed_and_the_next_one_reloads(onnx_daemon) -> None:
    long_texts = [f"text {i} about runners, supervisors and crashes " * 40 for i in range(48)]

    async def scenario() -> None:
        async with AsyncClient(onnx_daemon.endpoint, timeout=60) as a, \
                AsyncClient(onnx_daemon.endpoint, timeout=60) as op:
            await a.load("minilm")
            await op.wait_welcome()
            pid = next(int(m["runner_pid"]) for m in (await op.status())["models_loaded"]
                       if m["name"] == "minilm")
            mid, fut = await a.send("embed", {"model": "minilm", "texts": long_texts})
            rid = f"{a.session}.{mid}"
            for _ in range(500):
                rows = {r["id"]: r for r in (await op.queue_list())["items"]}
                if rows.get(rid, {}).get("state") == "running":
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"the embed never ran: {rows}")
            await asyncio.sleep(0.3)  # well inside its forward passes (seconds long)
            assert not fut.done(), "the embed finished before the kill: make it longer"
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(fut, 10), mid)
            took = time.monotonic() - killed_at
            assert e.value.code == "runner_crashed", e.value
            assert "minilm" in e.value.message and "SIGKILL" in e.value.message, e.value
            assert "loaded again" in (e.value.hint or "")
            assert took < 3.0, f"the crash was reported {took:.2f}s after the kill"
            assert (await op.ping())["pong"]
            row = next(m for m in await op.models() if m["name"] == "minilm")
            assert row["state"] == "failed" and "SIGKILL" in row["failed_reason"], row
            assert row["crashes"] == 1
            assert [f["name"] for f in (await op.status())["models_failed"]] == ["minilm"]
            # the next embed loads it again (after the guard's 1 s backoff), in a new runner
            vectors, _ = await asyncio.wait_for(a.embed("minilm", ["hello world"]), 60)
            assert vectors.shape == (1, 384)
            loaded = {m["name"]: m for m in (await op.status())["models_loaded"]}
            assert loaded["minilm"]["runner_pid"] not in (None, pid)
            assert (await op.status())["models_failed"] == []
            for _ in range(50):
                if _gone(pid):
                    break
                await asyncio.sleep(0.1)
            assert _gone(pid), f"runner {pid} was not reaped"

            # killed again with another embed waiting behind the running one: the running
            # one fails, the waiting one is not lost: it runs once the model is back
            pid = loaded["minilm"]["runner_pid"]
            mid, fut = await a.send("embed", {"model": "minilm", "texts": long_texts})
            rid = f"{a.session}.{mid}"
            for _ in range(500):
                rows = {r["id"]: r for r in (await op.queue_list())["items"]}
                if rows.get(rid, {}).get("state") == "running":
                    break
                await asyncio.sleep(0.02)
            mid2, queued = await a.send("embed", {"model": "minilm", "texts": ["queued"]})
            await asyncio.sleep(0.3)
            assert not fut.done(), "the embed finished before the kill: make it longer"
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(fut, 10), mid)
            assert e.value.code == "runner_crashed", e.value
            reply = a.core.parse_reply(await asyncio.wait_for(queued, 60), mid2)
            assert reply["dim"] == 384 and reply["model"] == "minilm", reply

    asyncio.run(scenario())


def test_onnx_load_that_crashes_the_runner_fails_cleanly(daemon_factory, models_dir: Path,
                                                         onnx_models: Path,
                                                         tmp_path: Path) -> None:
    wrapper = tmp_path / "segv-wrapper.sh"
    wrapper.write_text("#!/bin/sh\n# a runner that dies of SIGSEGV as it starts\nkill -SEGV $$\n")
    wrapper.chmod(0o755)
    d = daemon_factory({"models": {"dirs": [str(models_dir), str(onnx_models)],
                                   "runner_wrapper": [str(wrapper)]}, **ONNX_CONFIG})
    with d.client(timeout=30) as c:
        with pytest.raises(InfernoError) as e:
            c.load("generic")
        assert e.value.code == "runner_crashed"
        assert "SIGSEGV" in e.value.message and "while loading" in e.value.message
        assert "generic" in e.value.message
        assert c.ping()["pong"]
        row = _row(c, "generic")
        assert row["state"] == "failed" and "SIGSEGV" in row["failed_reason"], row
        with pytest.raises(InfernoError) as e:  # a request reloads it, behind the guard
            c.infer("generic", {"X": np.zeros((1, 3), np.float32),
                                "Y": np.zeros((1, 3), np.float32)})
        assert e.value.code == "runner_crashed" and "SIGSEGV" in e.value.message


def test_unload_stops_a_running_onnx_run_and_its_runner_at_once(onnx_daemon) -> None:
    """Unloading a model whose runner is mid-run: the run is stopped (RunOptions.terminate)
    and the runner exits promptly, not after the close timeout's SIGKILL."""
    big = {"X": encode_array(np.ones((1024, 512), np.float32))}  # ~30 s on one CPU thread

    async def scenario() -> None:
        async with AsyncClient(onnx_daemon.endpoint, timeout=60) as a, \
                AsyncClient(onnx_daemon.endpoint, timeout=60) as op:
            await a.load("slow")
            await op.wait_welcome()
            pid = next(int(m["runner_pid"]) for m in (await op.status())["models_loaded"]
                       if m["name"] == "slow")
            mid, fut = await a.send("infer", {"model": "slow", "inputs": big})
            rid = f"{a.session}.{mid}"
            for _ in range(500):
                rows = {r["id"]: r for r in (await op.queue_list())["items"]}
                if rows.get(rid, {}).get("state") == "running":
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"the infer never ran: {rows}")
            t0 = time.monotonic()
            await asyncio.wait_for(op.unload("slow"), 30)
            with pytest.raises(InfernoError) as e:
                a.core.parse_reply(await asyncio.wait_for(fut, 10), mid)
            assert e.value.code == "aborted", e.value
            assert time.monotonic() - t0 < 5, time.monotonic() - t0
            for _ in range(50):
                if _gone(pid):
                    break
                await asyncio.sleep(0.1)
            assert _gone(pid), f"runner {pid} outlived the unload"
            assert "did not exit" not in onnx_daemon.log()

    asyncio.run(scenario())

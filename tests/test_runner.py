"""Runner processes: every GGUF model in a process of its own, supervised by the daemon.

A runner killed (SIGKILL, SIGSEGV), crashing at load or left behind by a killed daemon must
cost only its model's requests, with a clear error, never the daemon. Real daemon, real
model, real signals; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import tomli_w
from daemon_harness import wait_for

from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}

pytestmark = pytest.mark.model


def runner_pid(client, model: str = MODEL) -> int:
    for lm in client.status()["models_loaded"]:
        if lm["name"] == model and lm.get("runner_pid"):
            return int(lm["runner_pid"])
    raise AssertionError(f"{model} has no runner: {client.status()['models_loaded']}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def model_row(client, model: str = MODEL) -> dict:
    return next(m for m in client.models() if m["name"] == model)


def test_status_names_each_runner_with_its_pid_rss_and_cpu(daemon):
    with daemon.client(timeout=30) as c:
        c.load(MODEL)
        lm = c.status()["models_loaded"][0]
        pid = lm["runner_pid"]
        assert pid and pid != daemon.pid
        proc = psutil.Process(pid)
        assert proc.ppid() == daemon.pid  # a plain child: in the daemon's cgroup
        assert "infernod.runner" in " ".join(proc.cmdline())
        assert lm["runner_rss_bytes"] > 50 << 20
        assert lm["runner_cpu_s"] > 0
        assert lm["memory_bytes"] >= lm["runner_rss_bytes"] // 2  # the budget counts it
        assert model_row(c)["runner_pid"] == pid
        # the daemon itself never loads llama.cpp: a crash in it cannot take the daemon
        assert not any("libllama" in m.path for m in psutil.Process(daemon.pid).memory_maps())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_runner_killed_mid_stream_ends_only_that_stream_and_the_model_reloads(daemon, sig):
    with daemon.client(timeout=30) as c:
        c.load(MODEL)
        pid = runner_pid(c)
        stream = c.generate(MODEL, "Count from one to a thousand:", **LONG)
        it = iter(stream)
        next(it)  # it runs
        os.kill(pid, sig)
        killed_at = time.monotonic()
        with pytest.raises(InfernoError) as e:
            for _ in it:
                assert time.monotonic() - killed_at < 10, "the stream outlived its runner"
        took = time.monotonic() - killed_at
        assert e.value.code == "runner_crashed", e.value
        assert MODEL in e.value.message and sig.name in e.value.message, e.value.message
        assert "loaded again" in e.value.hint
        assert took < 3.0, f"the crash was reported {took:.2f}s after the kill"
        assert c.ping()["pong"]  # the daemon lives
        row = model_row(c)
        assert row["state"] == "failed", row
        assert sig.name in row["failed_reason"] and row["crashes"] == 1
        assert [f["name"] for f in c.status()["models_failed"]] == [MODEL]
        wait_for(lambda: gone(pid), 5, "the dead runner to be reaped")
        # the next request loads the model again, in a new runner
        text = "".join(c.generate(MODEL, "The capital of France is", max_tokens=8,
                                  temperature=0.0))
        assert text
        assert runner_pid(c) != pid
        assert model_row(c)["state"] == "loaded"
        assert c.status()["models_failed"] == []


def test_job_item_whose_runner_dies_runs_again_and_completes(daemon):
    with daemon.client(timeout=30) as c:
        c.load(MODEL)
        pid = runner_pid(c)
        job = c.jobs_submit(MODEL, ["Count slowly from one to a thousand:"], max_tokens=40,
                            ignore_eos=True, temperature=0.0)
        job_id = job["job_id"]
        wait_for(lambda: any(r["job"] == job_id and r["state"] == "running" and r["tokens"] > 2
                             for r in c.queue_list()["items"]), 90, "the job item to run")
        os.kill(pid, signal.SIGKILL)
        done = wait_for(lambda: (j := c.jobs_get(job_id))["state"] in ("done", "failed") and j,
                        180, "the job to finish after its runner died")
        item = done["items"][0]
        assert done["state"] == "done", done
        assert item["state"] == "done" and item["stats"]["completion_tokens"] == 40, item
        assert runner_pid(c) != pid


def _crashing_wrapper(tmp: Path) -> Path:
    script = tmp / "segv-wrapper.sh"
    script.write_text("#!/bin/sh\n# a runner that dies of SIGSEGV as it starts\nkill -SEGV $$\n")
    script.chmod(0o755)
    return script


def test_load_that_crashes_the_runner_fails_cleanly_and_the_guard_stops_a_crash_loop(
        daemon_factory, tmp_path):
    wrapper = _crashing_wrapper(tmp_path)
    d = daemon_factory({"models": {"runner_wrapper": [str(wrapper)]}})
    with d.client(timeout=30) as c:
        with pytest.raises(InfernoError) as e:
            c.load(MODEL)
        assert e.value.code == "runner_crashed"
        assert "SIGSEGV" in e.value.message and "while loading" in e.value.message
        assert c.ping()["pong"]
        row = model_row(c)
        assert row["state"] == "failed" and "SIGSEGV" in row["failed_reason"], row
        # requests reload it with a growing backoff; the third crash in the window arms the
        # guard, which then refuses at once with the last reason
        times = []
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(InfernoError) as e:
                "".join(c.generate(MODEL, "hi", max_tokens=2))
            times.append(time.monotonic() - t0)
            assert e.value.code == "runner_crashed" and "SIGSEGV" in e.value.message
        assert times[0] >= 0.9 and times[1] >= 1.9, times  # 1 s, then 2 s of backoff
        t0 = time.monotonic()
        with pytest.raises(InfernoError) as e:
            "".join(c.generate(MODEL, "hi", max_tokens=2))
        assert time.monotonic() - t0 < 1.0
        assert e.value.code == "runner_crashed"
        assert "refused" in e.value.message and "SIGSEGV" in e.value.message, e.value.message
        assert model_row(c)["loads_refused_for_s"] > 0
        # the operator fixes the cause (no wrapper, SIGHUP) and loads it: the guard clears
        cfg = tomli_w.dumps({**_config(d), "models": {**_config(d)["models"],
                                                      "runner_wrapper": []}})
        d.config_path.write_text(cfg)
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: "SIGHUP: applied" in d.log(), 10, "the config reload")
        assert c.load(MODEL)["state"] == "loaded"
        assert "".join(c.generate(MODEL, "Hello", max_tokens=4, temperature=0.0))


def _config(d) -> dict:
    import tomllib

    return tomllib.loads(d.config_path.read_text())


def test_daemon_killed_leaves_no_runner_behind(daemon):
    with daemon.client(timeout=30) as c:
        c.load(MODEL)
        pid = runner_pid(c)
    daemon.kill()
    wait_for(lambda: gone(pid), 5, f"runner {pid} to die with its daemon")


def test_two_models_stream_at_once_in_two_runners(daemon_factory, default_model_path,
                                                  models_dir, tmp_path):
    second = tmp_path / "models"
    second.mkdir()
    try:
        os.link(default_model_path, second / "second-model.gguf")
    except OSError:
        import shutil

        shutil.copyfile(default_model_path, second / "second-model.gguf")
    # one thread each, waiting by sleeping: two runners share 2 busy cores without spinning
    d = daemon_factory({"models": {"dirs": [str(models_dir), str(second)], "threads": 1,
                                   "threads_batch": 1, "cpu_wait": "sleep"}})
    with d.client(timeout=30) as c:
        names = {m["name"] for m in c.models()}
        assert {MODEL, "second-model"} <= names, names
        c.load(MODEL)
        c.load("second-model")
        pids = {runner_pid(c, MODEL), runner_pid(c, "second-model")}
        assert len(pids) == 2
        seen: dict[str, list[float]] = {}
        errors: list[BaseException] = []

        def stream(model: str) -> None:
            try:
                with d.client(timeout=30) as cc:
                    for _ in cc.generate(model, "Once upon a time", max_tokens=24,
                                         ignore_eos=True, temperature=0.0):
                        seen.setdefault(model, []).append(time.monotonic())
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(m,)) for m in (MODEL, "second-model")]
        for t in threads:
            t.start()
        end = time.monotonic() + 240
        for t in threads:
            t.join(timeout=max(0.1, end - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "the streams did not finish in 240 s"
        assert not errors, errors
        a, b = seen[MODEL], seen["second-model"]
        assert a[0] < b[-1] and b[0] < a[-1], "the two streams did not overlap"
        # one runner's death leaves the other model serving
        os.kill(runner_pid(c, MODEL), signal.SIGKILL)
        wait_for(lambda: model_row(c)["state"] == "failed", 5, "the model to show failed")
        assert "".join(c.generate("second-model", "Hello", max_tokens=4, temperature=0.0))
        assert runner_pid(c, "second-model") in pids


def thread_priorities(pid: int) -> set[tuple[int, int]]:
    """(niceness, scheduling policy) of every thread of ``pid``, from /proc/<pid>/task/*/stat
    (fields 19 and 41; the command name in parentheses may hold spaces)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        out.add((int(fields[16]), int(fields[38])))
    return out


@pytest.mark.parametrize("settings, nice, policy", [
    ({}, 10, os.SCHED_BATCH),  # the defaults
    ({"runner_nice": 3, "runner_sched": "idle"}, 3, os.SCHED_IDLE),
    ({"runner_nice": 0, "runner_sched": "normal"}, 0, os.SCHED_OTHER),
])
def test_runner_threads_run_nicer_than_the_daemon_which_keeps_its_priority(
        daemon_factory, settings, nice, policy):
    """models.runner_nice and models.runner_sched reach every thread of the runner (its
    llama.cpp CPU threads included: they start with the first decode), never the daemon."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    d = daemon_factory({"models": settings})
    with d.client(timeout=30) as c:
        c.load(MODEL)
        assert "".join(c.generate(MODEL, "Hello", max_tokens=4, temperature=0.0))
        pid = runner_pid(c)
        runner = thread_priorities(pid)
        assert len(os.listdir(f"/proc/{pid}/task")) > 2  # zmq's and llama.cpp's threads too
        assert runner == {(min(19, ours + nice), policy)}, runner
        assert thread_priorities(d.pid) == {(ours, os.SCHED_OTHER)}
        assert c.ping()  # and the daemon answers as before

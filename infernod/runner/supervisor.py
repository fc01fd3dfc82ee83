"""The daemon side of runner processes: spawn, talk to, and bury them.

Everything here runs on the event-loop thread: the ROUTER socket (its own ZeroMQ context,
bound in a 0700 directory of the runtime dir; a plain socket drained from a callback on its
descriptor, infernod.zmqio), the spawns (PR_SET_PDEATHSIG is tied to the thread that
forked the runner, so it must be the loop's, which lives as long as the daemon) and the
pidfd readers that notice a runner's death at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from infernod.backends.base import EngineSink, GenerationRequest
from infernod.backends.onnx_engine import RunDone
from infernod.protocol.errors import InfernoError
from infernod.runner import wire
from infernod.zmqio import FdWatch, plain_socket, send_frames

log = logging.getLogger("infernod.runner")

CLOSE_TIMEOUT_S = 10.0  # a runner asked to close gets this long before SIGKILL
POLL_EXIT_S = 0.2  # without pidfd_open: how often to look for a dead runner
RUNNER_BATCH = 1000  # runner messages per loop turn; the rest after the loop's other work
RUNNER_TICK_S = 0.25  # the runners' socket is drained this often anyway (infernod.zmqio)
CRASH_HINT = ("the model's running requests were ended; it is loaded again on the next "
              "request (after a short backoff). 'inferno models' shows the reason, the "
              "daemon log llama.cpp's last words")


def describe_exit(returncode: int) -> tuple[str, str]:
    """(signal name or "", human description) of a runner's exit status. A shell wrapper
    reports its child's signal as 128+N."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return name, name
    if returncode > 128:
        try:
            name = signal.Signals(returncode - 128).name
            return name, f"{name} (exit status {returncode})"
        except ValueError:
            pass
    return "", f"exit status {returncode}"


ExitCallback = Callable[["RunnerEngine", str, str], None]


class RunnerEngine:
    """One runner process, seen from the daemon: the engine surface RequestService and
    QueueService use (submit, cancel, preempt, free_slots, n_slots, memory_bytes, wire_info),
    with the sink's callbacks made on the event loop, in the runner's order."""

    def __init__(self, sup: RunnerSupervisor, model: str, runner_id: str,
                 kwargs: dict[str, Any], sink: EngineSink | None, on_exit: ExitCallback) -> None:
        self.sup = sup
        self.model = model
        self.runner_id = runner_id
        self.kwargs = kwargs
        self.sink = sink
        self.on_exit = on_exit
        self.n_slots: int = int(kwargs.get("n_slots", 1))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the runner's own pid (behind a wrapper: not proc.pid)
        self.returncode: int | None = None
        self.dead = False
        self.closing = False
        self._inflight: set[str] = set()  # submitted, not finished: the free_slots count
        self._runs: dict[int, RunDone] = {}  # runs (embed batches) sent, not answered
        self._run_ids = itertools.count(1)
        self._memory: dict[str, int] = {}
        self._info: dict[str, Any] = {}
        self._ps: psutil.Process | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None

    # -- process ------------------------------------------------------------------------------
    def spawn(self, argv: list[str]) -> None:
        """Start the process (from the event-loop thread: see the module docstring)."""
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            raise InfernoError("config_error", f"cannot start the runner for {self.model}: "
                               f"{argv[0]}: {e}", "check models.runner_wrapper") from e
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (OSError, AttributeError):
            self._pidfd = None
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._reap)
        else:
            loop.call_later(POLL_EXIT_S, self._poll_exit)

    def _poll_exit(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._reap()
        elif not self.dead:
            asyncio.get_running_loop().call_later(POLL_EXIT_S, self._poll_exit)

    def _reap(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None:  # readable pidfd means it exited; reap it for good
            rc = self.proc.wait(timeout=1)
        self.returncode = rc
        self.dead = True
        self.sup.forget(self)
        sig, how = describe_exit(rc)
        if not self.ready.done():
            message = f"{self.model}'s runner died with {how} while loading"
            self.ready.set_exception(InfernoError("runner_crashed", message, CRASH_HINT,
                                                  signal=sig or None))
        elif not self.closing:
            log.error("%s's runner (pid %s) died with %s", self.model, self.pid, how)
            self.on_exit(self, f"{self.model}'s runner died with {how}", sig)
        self._inflight.clear()
        self._lost(sig, how)
        if not self.exited.done():
            self.exited.set_result(rc)

    # -- messages from the runner ---------------------------------------------------------------
    def on_message(self, msg: list[Any]) -> None:
        op = msg[0]
        if op == "events":
            self._deliver(msg[1])
        elif op == "info":
            self._info = dict(msg[1])
        elif op == "hello":
            self.pid = int(msg[1]["pid"])
            try:
                self._ps = psutil.Process(self.pid)
                self._ps.cpu_times()
            except psutil.Error:
                self._ps = None
            self._send("load", self.kwargs)
        elif op == "ready":
            self._memory = dict(msg[1]["memory"])
            self._info = dict(msg[1]["info"])
            self.n_slots = int(msg[1]["n_slots"])
            if not self.ready.done():
                self.ready.set_result(None)
        elif op == "load_failed":
            if not self.ready.done():
                self.ready.set_exception(InfernoError.from_wire(msg[1]))
        else:
            log.warning("%s's runner sent an unknown message %r", self.model, op)

    def _lost(self, sig: str, how: str) -> None:
        """The process is gone (reaped): runs it owed end with runner_crashed (an
        unload's: aborted); its requests are RequestService's to end."""
        runs, self._runs = self._runs, {}
        if self.closing:
            error = InfernoError("aborted", f"model {self.model} was unloaded")
        else:
            error = InfernoError("runner_crashed", f"{self.model}'s runner died with {how}",
                                 CRASH_HINT, signal=sig or None)
        for on_done in runs.values():
            try:
                on_done(None, error)
            except Exception:
                log.exception("ending a run of %s's dead runner failed", self.model)

    def run(self, op: str, args: dict[str, Any], on_done: RunDone) -> int:
        """Send a run (an ONNX model's embed/infer, a GGUF model's embed); ``on_done(result,
        error)`` is called on the loop when its result comes back. Returns its id."""
        run_id = next(self._run_ids)
        if self.dead:  # died between dispatch's check and here: answer as the reap would
            on_done(None, InfernoError("runner_crashed", f"{self.model}'s runner is gone",
                                       CRASH_HINT))
            return run_id
        self._runs[run_id] = on_done
        self._send("run", run_id, op, args)
        return run_id

    def _run_done(self, ev: list[Any]) -> None:
        on_done = self._runs.pop(ev[1], None)
        if on_done is None:
            return
        try:
            if ev[0] == wire.RESULT:
                on_done(ev[2], None)
            else:
                on_done(None, InfernoError.from_wire(ev[2]))
        except Exception:
            log.exception("handling %s's runner result for run %s failed", self.model, ev[1])

    def _deliver(self, events: list[list[Any]]) -> None:
        sink = self.sink
        assert sink is not None, "a generation runner has a sink"
        for ev in events:
            kind, rid = ev[0], ev[1]
            if kind in (wire.RESULT, wire.FAILED):
                self._run_done(ev)
                continue
            try:
                if kind == wire.TOKENS:
                    if len(ev) > 4:
                        sink.on_tokens(rid, ev[2], ev[3], ev[4])
                    else:
                        sink.on_tokens(rid, ev[2], ev[3])
                elif kind == wire.STARTED:
                    sink.on_started(rid, ev[2])
                elif kind == wire.FINISHED:
                    self._inflight.discard(rid)  # free before the sink hears: it dispatches
                    sink.on_finished(rid, ev[2], ev[3])
                elif kind == wire.ERROR:
                    self._inflight.discard(rid)
                    sink.on_error(rid, ev[2], ev[3], ev[4])
            except Exception:  # one bad event must not lose the rest of the batch
                log.exception("handling %s's runner event %r for %s failed", self.model,
                              kind, rid)

    def _send(self, *parts: Any) -> None:
        if self.dead:
            return
        try:
            self.sup.send(self.runner_id, wire.pack(*parts))
        except zmq.ZMQError as e:  # gone (its exit is being reaped) or not connected yet
            log.warning("%s's runner did not take %s: %s", self.model, parts[0], e)

    # -- the engine surface ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        self._inflight.add(request.request_id)
        self._send("submit", wire.request_to_wire(request))

    def cancel(self, request_id: str) -> None:
        self._send("cancel", request_id)

    def preempt(self, request_id: str) -> None:
        self._send("preempt", request_id)

    def free_slots(self) -> int:
        if self.dead:
            return 0
        return max(0, self.n_slots - len(self._inflight))

    def running(self) -> set[str]:
        """Request ids submitted to this runner and not finished."""
        return set(self._inflight)

    def memory_bytes(self) -> dict[str, int]:
        """The runner's own measure (weights, context) and its resident set now."""
        return {**self._memory, "rss_bytes": self.rss_bytes()}

    def rss_bytes(self) -> int:
        try:
            return int(self._ps.memory_info().rss) if self._ps is not None else 0
        except psutil.Error:
            return 0

    def cpu_s(self) -> float:
        try:
            t = self._ps.cpu_times() if self._ps is not None else None
        except psutil.Error:
            return 0.0
        return round(t.user + t.system, 3) if t is not None else 0.0

    def wire_info(self) -> dict[str, Any]:
        out = {**self._info, "runner_pid": self.pid, "runner_rss_bytes": self.rss_bytes(),
               "runner_cpu_s": self.cpu_s()}
        gpu = self.sup.gpu_bytes(self.pid)
        if gpu is not None:
            out["runner_gpu_bytes"] = gpu
        return out

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Ask the runner to finish; SIGKILL it if it has not exited after ``timeout_s``."""
        self.closing = True
        self._inflight.clear()
        if self.dead:
            return
        if self.ready.done() and not self.ready.cancelled() and not self.ready.exception():
            self._send("close")
        else:
            self.kill()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except TimeoutError:
            log.warning("%s's runner did not exit within %.0fs: killing it", self.model,
                        timeout_s)
            self.kill()
            await asyncio.wait_for(asyncio.shield(self.exited), 5)

    def close(self) -> None:
        """Blocking-free stop for callers that cannot await: SIGKILL (prefer aclose)."""
        self.closing = True
        self._inflight.clear()
        self.kill()

    def kill(self) -> None:
        for pid in {self.pid, self.proc.pid if self.proc else None} - {None}:
            try:
                os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass


class OnnxRunnerEngine(RunnerEngine):
    """A runner hosting an ONNX model, seen from the daemon: the OnnxRunEngine surface
    RequestService uses (``run``, ``terminate``, ``free_slots``, ``provider``), with each
    run's ``on_done(result, error)`` called on the loop. How many runs at once is the
    scheduler's rule (its slots: ``n_slots``, 1); the runner's worker would queue more in
    order anyway."""

    def __init__(self, sup: RunnerSupervisor, model: str, runner_id: str,
                 kwargs: dict[str, Any], sink: EngineSink | None, on_exit: ExitCallback) -> None:
        super().__init__(sup, model, runner_id, kwargs, sink, on_exit)

    @property
    def provider(self) -> str | None:
        p = self._info.get("provider")
        return None if p is None else str(p)

    def terminate(self, run_id: int) -> None:
        if run_id in self._runs:
            self._send("terminate", run_id)

    def free_slots(self) -> int:
        return 0 if self.dead else max(0, self.n_slots - len(self._runs))

    def memory_bytes(self) -> dict[str, int]:
        return {"rss_bytes": self.rss_bytes()}

    def _deliver(self, events: list[list[Any]]) -> None:
        for ev in events:
            if ev[0] in (wire.RESULT, wire.FAILED):
                self._run_done(ev)


class RunnerSupervisor:
    """Owns the runners' ROUTER socket and every runner process. Event-loop thread only."""

    def __init__(self, runtime_dir: Path, log_level: str = "info",
                 gpu_bytes: Callable[[int], int | None] | None = None) -> None:
        self.dir = runtime_dir / "runners"
        self.log_level = log_level
        self._gpu_bytes = gpu_bytes
        self.runners: dict[str, RunnerEngine] = {}
        self._ids = itertools.count(1)
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        # Plain, not asyncio: every token comes through it (infernod.zmqio).
        self.sock: zmq.Socket[bytes] | None = None
        self._watch: FdWatch | None = None
        self._served: asyncio.Future[None] | None = None
        self.endpoint = ""

    def bind(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)  # runners only: never the socket group's
        path = self.dir / "runners.sock"
        path.unlink(missing_ok=True)
        self.endpoint = f"ipc://{path}"
        self.ctx = zmq.Context(1)
        self.sock = sock = plain_socket(self.ctx, zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(self.endpoint)

    async def serve(self) -> None:
        """Receive every runner's messages and hand them to its RunnerEngine, from a
        callback on the socket's descriptor (:meth:`_drain`), until :meth:`close`."""
        if self.sock is None:
            return
        loop = asyncio.get_running_loop()
        self._served = loop.create_future()
        self._watch = FdWatch(self.sock, self._drain, tick_s=RUNNER_TICK_S)
        try:
            await self._served
        finally:
            self._watch.close()
            self._watch = None

    def _drain(self) -> None:
        """Up to RUNNER_BATCH messages, then the rest on the next loop turn."""
        if self.sock is not None and self._watch is not None:
            self._watch.drain(self._dispatch, RUNNER_BATCH)

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        runner = self.runners.get(frames[0].decode(errors="replace"))
        if runner is None:
            return
        try:
            runner.on_message(wire.unpack(frames[1]))
        except Exception:
            log.exception("bad message from %s's runner", runner.model)

    def send(self, runner_id: str, body: bytes) -> None:
        assert self.sock is not None
        send_frames(self.sock, (runner_id.encode(), body))
        if self._watch is not None:
            self._watch.kick()  # the send may have taken in the descriptor's edge

    def forget(self, runner: RunnerEngine) -> None:
        self.runners.pop(runner.runner_id, None)

    def gpu_bytes(self, pid: int | None) -> int | None:
        return self._gpu_bytes(pid) if self._gpu_bytes is not None and pid else None

    async def start(self, model: str, kwargs: dict[str, Any], *, wrapper: list[str],
                    sink: EngineSink | None, on_exit: ExitCallback,
                    proxy: type[RunnerEngine] = RunnerEngine, nice: int = 0,
                    sched: str = "normal") -> RunnerEngine:
        """Spawn a runner for ``model`` and wait until it has loaded (or failed to).
        ``proxy``: RunnerEngine (a GGUF engine, events to ``sink``) or OnnxRunnerEngine;
        ``nice`` (added to ours) and ``sched`` (a policy of runner/main.SCHED_POLICIES):
        the runner applies them to itself before it starts a thread."""
        if self.sock is None:
            self.bind()
        runner_id = f"r{next(self._ids)}"
        engine = proxy(self, model, runner_id, kwargs, sink, on_exit)
        self.runners[runner_id] = engine
        argv = [*wrapper, sys.executable, "-m", "infernod.runner", "--endpoint", self.endpoint,
                "--id", runner_id, "--daemon-pid", str(os.getpid()), "--model", model,
                "--log-level", self.log_level, "--nice", str(nice), "--sched", sched]
        try:
            engine.spawn(argv)
            await engine.ready
        except BaseException:
            self.forget(engine)
            if engine.proc is not None:
                engine.closing = True
                engine.kill()
            raise
        return engine

    async def close(self) -> None:
        for runner in list(self.runners.values()):
            await runner.aclose()
        if self._watch is not None:
            self._watch.close()
        if self._served is not None and not self._served.done():
            self._served.set_result(None)
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close(0)
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

"""The runner process: hosts one engine (a GgufEngine, or an OnnxEngine for an ONNX model)
and speaks runner/wire.py with the daemon.

Started by the daemon as ``python -m infernod.runner --endpoint ipc://... --id ID
--daemon-pid PID`` (behind ``models.runner_wrapper`` if configured). The main thread owns
the ZeroMQ socket; the engine's decode thread only appends events to a buffer and wakes the
main thread through an eventfd, once per decode step (events outside a step, such as a
cancel's finish, wake it at once). The main thread sends everything buffered as one message.
An ONNX runner's worker thread hands each run's result or error to the same buffer.

It runs nicer than the daemon (``models.runner_nice``) and, by default, as SCHED_BATCH
(``models.runner_sched``), so its CPU threads, which keep both cores busy while they decode,
give way whenever the daemon wakes up to answer a request.

It never outlives the daemon: PR_SET_PDEATHSIG=SIGKILL (set first thing), and every half
second it checks that its parent is unchanged, that the daemon's pid still exists and that
the daemon's socket is still connected.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from infernod.protocol.errors import InfernoError
from infernod.runner import wire

log = logging.getLogger("infernod.runner")

PR_SET_PDEATHSIG = 1
CHECK_INTERVAL_S = 0.5
INFO_INTERVAL_S = 1.0


def die_with_parent() -> None:
    """SIGKILL this process when the thread that forked it (the daemon's loop) ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as e:  # not Linux: the parent checks still apply
        log.warning("PR_SET_PDEATHSIG unavailable: %s", e)


SCHED_POLICIES = {"normal": "SCHED_OTHER", "batch": "SCHED_BATCH", "idle": "SCHED_IDLE"}


def set_cpu_priority(nice: int, sched: str) -> None:
    """``models.runner_nice`` and ``models.runner_sched``, applied before this process starts
    a thread: on Linux both belong to each thread, and threads inherit them from the one
    that starts them (ZeroMQ's I/O thread, llama.cpp's CPU threads). The daemon keeps its
    own: only this process changes. A refusal (a system that forbids the policy) is logged,
    and the runner runs as it is."""
    if nice:
        try:
            os.nice(nice)
        except OSError as e:
            log.warning("could not add %d to the runner's niceness: %s", nice, e)
    policy = getattr(os, SCHED_POLICIES.get(sched, ""), None)
    if sched == "normal" or policy is None:  # normal: as started; no such policy: not Linux
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as e:
        log.warning("could not set the runner's scheduling policy to %s: %s", sched, e)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BatchSink:
    """EngineSink on the decode thread: buffers events, wakes the main thread once per step."""

    def __init__(self) -> None:
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._events: list[list[Any]] = []
        self._in_step = False

    def _add(self, event: list[Any]) -> None:
        with self._lock:
            self._events.append(event)
            wake = not self._in_step and len(self._events) == 1
        if wake:
            os.eventfd_write(self.wake_fd, 1)

    def step_started(self) -> None:
        with self._lock:
            self._in_step = True

    def step_ended(self) -> None:
        with self._lock:
            self._in_step = False
            wake = bool(self._events)
        if wake:
            os.eventfd_write(self.wake_fd, 1)

    def take(self) -> list[list[Any]]:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        with self._lock:
            events, self._events = self._events, []
        return events

    def on_started(self, request_id: str, info: dict[str, Any]) -> None:
        self._add([wire.STARTED, request_id, info])

    def on_tokens(self, request_id: str, text: str, n_tokens: int,
                  logprobs: list[dict[str, Any]] | None = None) -> None:
        if logprobs is None:
            self._add([wire.TOKENS, request_id, text, n_tokens])
        else:
            self._add([wire.TOKENS, request_id, text, n_tokens, logprobs])

    def on_finished(self, request_id: str, reason: str, stats: dict[str, Any]) -> None:
        self._add([wire.FINISHED, request_id, reason, stats])

    def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
        self._add([wire.ERROR, request_id, code, message, hint])

    def on_run_done(self, run_id: int, result: Any, error: InfernoError | None) -> None:
        """An ONNX run ended (its worker thread): its result, or its error."""
        if error is None:
            self._add([wire.RESULT, run_id, result])
        else:
            self._add([wire.FAILED, run_id, error.to_wire()])


class Runner:
    def __init__(self, endpoint: str, runner_id: str, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.parent = os.getppid()
        self.ctx = zmq.Context(1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, runner_id.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on the daemon
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.sink = BatchSink()
        self.engine: Any = None
        self.model = "?"
        self.onnx = False  # hosts an OnnxEngine (runs), not a GgufEngine (requests)
        self.onnx_runs: dict[int, int] = {}  # the daemon's run id -> the OnnxEngine's
        self._last_check = 0.0
        self._last_info: dict[str, Any] | None = None  # the wire_info the daemon has

    # -- liveness of the daemon ---------------------------------------------------------------
    def daemon_gone(self) -> str | None:
        if os.getppid() != self.parent:
            return "the daemon (parent process) exited"
        if not pid_alive(self.daemon_pid):
            return f"the daemon (pid {self.daemon_pid}) is gone"
        try:
            while self.monitor.poll(0):
                evt = recv_monitor_message(self.monitor)
                if evt["event"] == zmq.EVENT_DISCONNECTED:
                    return "the daemon's socket went away"
        except zmq.ZMQError:
            return None
        return None

    def send(self, *parts: Any) -> None:
        self.sock.send(wire.pack(*parts))

    # -- load ---------------------------------------------------------------------------------
    def wait_load(self) -> dict[str, Any]:
        self.send("hello", {"pid": os.getpid()})
        while True:
            if self.sock.poll(int(CHECK_INTERVAL_S * 1000)):
                msg = wire.unpack(self.sock.recv())
                if msg[0] == "load":
                    return dict(msg[1])
                if msg[0] == "close":
                    raise SystemExit(0)
            elif (why := self.daemon_gone()) is not None:
                log.warning("runner exits before loading: %s", why)
                raise SystemExit(0)

    def load(self, kwargs: dict[str, Any]) -> bool:
        """Build the engine ``load`` names (``backend``: a loader per model kind) and answer
        ``ready``, or ``load_failed`` with the reason."""
        kwargs = dict(kwargs)
        backend = kwargs.pop("backend", "gguf")
        loaders = {"gguf": self.load_gguf, "onnx": self.load_onnx}
        loader = loaders.get(backend)
        if loader is None:
            self.send("load_failed", {"code": "internal", "hint": None,
                                      "message": f"this runner has no {backend!r} backend"})
            return False
        try:
            ready = loader(kwargs)
        except InfernoError as e:
            self.send("load_failed", e.to_wire())
            return False
        except Exception as e:
            self.send("load_failed", {"code": "internal", "message": f"loading failed: {e}",
                                      "hint": None})
            return False
        self.send("ready", ready)
        return True

    def load_gguf(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        from infernod.backends.gguf import GgufEngine

        engine = GgufEngine(sink=self.sink, **kwargs)
        step = engine.step
        sink = self.sink

        def batched_step() -> None:  # one wake-up (one message) per decode step
            sink.step_started()
            try:
                step()
            finally:
                sink.step_ended()

        engine.step = batched_step  # type: ignore[method-assign]
        engine.start()
        self.engine = engine
        return {"memory": engine.memory_bytes(), "n_slots": engine.n_slots,
                "info": engine.wire_info(), "gpu_offload": engine.supports_gpu_offload}

    def load_onnx(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        from infernod.backends.onnx_engine import OnnxEngine

        engine = OnnxEngine(**kwargs)
        engine.start()
        self.engine, self.onnx = engine, True
        return {"memory": {}, "n_slots": engine.n_slots, "info": engine.wire_info()}

    def run_onnx(self, run_id: int, op: str, args: dict[str, Any]) -> None:
        """Queue a run on the OnnxEngine's worker (a GGUF engine's embed: on its decode
        thread); its end goes out as an events batch."""
        from infernod.backends.onnx_engine import OPS

        model, sink = self.model, self.sink

        def done(result: Any, error: BaseException | None) -> None:  # the worker thread
            if error is not None and not isinstance(error, InfernoError):
                log.error("onnx %s on %s failed: %r", op, model, error)
                error = InfernoError("internal", f"{op} on {model} failed: {error}")
            sink.on_run_done(run_id, result, error)

        if not self.onnx and op == "embed":  # a GGUF model: its embedding context
            self.engine.embed(args, done)
            return
        if not self.onnx or op not in OPS:
            done(None, InfernoError("bad_request", f"this runner cannot run {op!r}"))
            return
        self.onnx_runs[run_id] = self.engine.run(op, args, done)

    # -- serve --------------------------------------------------------------------------------
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.sink.wake_fd, zmq.POLLIN)
        last_info_at = 0.0
        while True:
            ready = dict(poller.poll(int(CHECK_INTERVAL_S * 1000)))
            if self.sink.wake_fd in ready:
                self.flush()
            if self.sock in ready:
                while self.sock.poll(0):
                    if not self.command(wire.unpack(self.sock.recv())):
                        return
            now = time.monotonic()
            if now - last_info_at >= INFO_INTERVAL_S:
                last_info_at = now
                self.push_info()
            if now - self._last_check >= CHECK_INTERVAL_S:
                self._last_check = now
                if (why := self.daemon_gone()) is not None:
                    log.warning("runner exits: %s", why)
                    return

    def flush(self) -> None:
        events = self.sink.take()
        if self.onnx:
            for ev in events:
                if ev[0] in (wire.RESULT, wire.FAILED):
                    self.onnx_runs.pop(ev[1], None)  # ended: nothing left to terminate
        if events:
            if any(ev[0] != wire.TOKENS for ev in events):
                # A request started or ended: the host cache may have saved or restored a
                # sequence. The counters go first, so a client that reads models.show after
                # its done event sees them (the periodic push alone lags up to a second).
                self.push_info()
            self.send("events", events)

    def push_info(self) -> None:
        """Send the engine's wire_info (host-cache counters) if it changed since the last."""
        if self.engine is None:
            return
        info = self.engine.wire_info()
        if info != self._last_info:
            self._last_info = info
            self.send("info", info)

    def command(self, msg: list[Any]) -> bool:
        op = msg[0]
        if op == "submit":
            self.engine.submit(wire.request_from_wire(msg[1]))
        elif op == "cancel":
            self.engine.cancel(msg[1])
        elif op == "preempt":
            self.engine.preempt(msg[1])
        elif op == "run":
            self.run_onnx(int(msg[1]), str(msg[2]), dict(msg[3]))
        elif op == "terminate":
            local = self.onnx_runs.get(int(msg[1]))
            if local is not None:
                self.engine.terminate(local)
        elif op == "close":
            if self.onnx:
                self.engine.terminate_all()  # stop the run in progress: its worker joins
            self.engine.close()
            self.flush()
            return False
        else:
            log.warning("unknown runner command %r", op)
        return True

    def close(self) -> None:
        self.monitor.close(0)
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # first: a daemon killed from here on takes this process with it
    parser = argparse.ArgumentParser(prog="infernod-runner")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--model", default="?")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--nice", type=int, default=0, help="added to the niceness")
    parser.add_argument("--sched", default="normal", choices=sorted(SCHED_POLICIES))
    args = parser.parse_args(argv)
    # the daemon's format, one tag added: its stderr is the daemon's (the journal)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(levelname)s runner[{args.model}] %(name)s: %(message)s")
    set_cpu_priority(args.nice, args.sched)  # before any thread starts: they inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the daemon,
    # which drains and then closes its runners
    if not pid_alive(args.daemon_pid):
        return 0
    runner = Runner(args.endpoint, args.id, args.daemon_pid)
    runner.model = args.model
    try:
        if runner.load(runner.wait_load()):
            runner.serve()
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        runner.close()
    return 0

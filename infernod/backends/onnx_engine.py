"""One loaded ONNX model and the worker thread that owns its session (runs in a runner).

The daemon never imports onnxruntime: every loaded ONNX model lives in a runner process
(:mod:`infernod.runner`), which builds an :class:`OnnxEngine` and turns the daemon's
``run`` / ``terminate`` messages into :meth:`OnnxEngine.run` / :meth:`OnnxEngine.terminate`.
The operations a run can do are named (``embed``, ``infer``: :data:`OPS`), so they can cross
the process boundary as data; their results are plain msgpack values (wire arrays).

:class:`OnnxRunEngine` is the surface the daemon's ``RequestService`` drives; the runner's proxy
(``runner.supervisor.OnnxRunnerEngine``) and :class:`OnnxEngine` itself (tests) both have it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from infernod.backends.base import Engine
from infernod.protocol.codec import MAX_BIN_LEN
from infernod.protocol.errors import InfernoError

log = logging.getLogger("infernod.onnx")

RunDone = Callable[[Any, "BaseException | None"], None]  # on_done(result, error)


@runtime_checkable
class OnnxRunEngine(Engine, Protocol):
    """What the request service needs of a loaded ONNX model, beyond any engine's surface:
    a run named by ``op``, stoppable by its id. How many runs at once is ``n_slots`` (1):
    the scheduler's slots hold them, as they hold a text engine's sequences."""

    @property
    def provider(self) -> str | None: ...

    def run(self, op: str, args: dict[str, Any], on_done: RunDone) -> int: ...

    def terminate(self, run_id: int) -> None: ...


class OnnxEngine:
    """One loaded ONNX model and the thread that owns its session.

    The constructor loads the weights (blocking); ``run`` / ``submit`` queue an operation,
    which the worker thread runs, then calls ``on_done(result, error)`` from that thread.
    Has the :class:`OnnxRunEngine` surface, so the request service can drive it in-process
    (tests).
    """

    n_slots = 1

    def __init__(self, path: str | Path, *, providers: list[str], intra_op_threads: int,
                 inter_op_threads: int, graph_optimization: str, max_batch: int) -> None:
        from infernod.backends.onnx import OnnxModel

        self.model = OnnxModel(path, providers_pref=tuple(providers),
                               intra_op_threads=intra_op_threads,
                               inter_op_threads=inter_op_threads,
                               graph_optimization_level=graph_optimization,
                               batch_size=max_batch)
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three fields below (loop and worker)
        self._runs = 0  # ids handed out by submit
        self._started = 0  # the last run id the worker took (ids start in order)
        self._current: tuple[int, Any] | None = None  # (run id, its RunOptions) while running
        self._doomed: set[int] = set()  # terminated before their run started
        self._thread = threading.Thread(target=self._main, name=f"onnx-{self.model.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[[Any], Any], on_done: Callable[[Any, BaseException | None],
                                                                   None]) -> int:
        """Queue a run; returns its id for :meth:`terminate`."""
        with self._lock:
            self._runs += 1
            run_id = self._runs
        self._work.put((run_id, fn, on_done))
        return run_id

    def run(self, op: str, args: dict[str, Any], on_done: RunDone) -> int:
        """Queue the named operation (:data:`OPS`) on ``args``; returns its run id."""
        fn = OPS[op]
        return self.submit(lambda m: fn(m, args), on_done)

    @property
    def provider(self) -> str | None:
        return self.model.provider

    def terminate_all(self) -> None:
        """Stop the run in progress and every queued one (closing)."""
        with self._lock:
            if self._current is not None:
                self._current[1].terminate = True
            self._doomed.update(range(self._started + 1, self._runs + 1))

    def terminate(self, run_id: int) -> None:
        """Thread-safe: stop run ``run_id`` early (onnxruntime's ``RunOptions.terminate``,
        checked between graph nodes); it then ends with a ``cancelled`` error. A run not
        started yet ends as soon as it starts; a finished one is left alone."""
        with self._lock:
            if self._current is not None and self._current[0] == run_id:
                self._current[1].terminate = True
            elif run_id > self._started:
                self._doomed.add(run_id)

    def _main(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            run_id, fn, on_done = item
            try:
                run_options = self.model.new_run_options()
                with self._lock:
                    self._current = (run_id, run_options)
                    self._started = run_id
                    if run_id in self._doomed:
                        self._doomed.discard(run_id)
                        run_options.terminate = True
                with self.model.run_scope(run_options):
                    result, error = fn(self.model), None
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which translates
                result, error = None, e
            with self._lock:
                self._current = None
            try:
                on_done(result, error)
            except Exception:  # the loop is gone (daemon stopping): nothing to tell
                log.debug("onnx result dropped", exc_info=True)

    def free_slots(self) -> int:
        """Runs it may take now: 1 when none is queued or running in its worker."""
        with self._lock:
            return 0 if self._runs > self._started or self._current is not None else 1

    def preempt(self, request_id: str) -> None:
        """ONNX runs are short and not resumable: nothing to pause."""

    def memory_bytes(self) -> dict[str, int] | None:
        """Not measured: the registry's file-size estimate stands."""
        return None

    def wire_info(self) -> dict[str, Any]:
        """What load replies, models.show and ``models`` events add for a loaded ONNX model."""
        m = self.model
        return {"backend": "onnx", "onnx_kind": m.kind, "provider": m.provider,
                "providers": list(m.providers), "fallback_reason": m.fallback_reason}

    def close(self) -> None:
        """Stop the worker after its current run; blocking (call from the executor)."""
        self._work.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=60)


def embed_batch(model: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Worker side: embed every request's texts in one ``embed`` call, split per request.

    Runs unnormalised and normalises per request, so requests with and without
    ``normalize`` can share a batch; padding is masked, so sharing never changes a vector.
    """
    import numpy as np

    from infernod.protocol.arrays import encode_array

    requests: list[tuple[list[str], bool]] = [(list(t), bool(n)) for t, n in args["requests"]]
    texts = [t for texts, _ in requests for t in texts]
    vectors, info = model.embed(texts, normalize=False)
    dim = int(vectors.shape[1])
    out, pos = [], 0
    for req_texts, normalize in requests:
        n = len(req_texts)
        v = vectors[pos:pos + n]
        if normalize and n:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        v = np.ascontiguousarray(v, dtype=np.float32)
        if v.nbytes > MAX_BIN_LEN:
            raise InfernoError("bad_request", f"{n} vectors of {dim} floats are {v.nbytes} bytes;"
                               f" one reply array may hold {MAX_BIN_LEN}",
                               "send fewer texts per request")
        out.append({"vectors": encode_array(v), "dim": dim,
                    "truncated": info["truncated"][pos:pos + n],
                    "tokens": info["tokens"][pos:pos + n]})
        pos += n
    return {"results": out, "tokenize_ms": info["tokenize_ms"], "run_ms": info["run_ms"],
            "max_length": info["max_length"], "texts": len(texts)}


def infer_one(model: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Worker side: validate (names, dtypes, shapes: bad_request) and run one infer."""
    t0 = time.perf_counter()
    outputs = model.infer(args["inputs"])
    for name, arr in outputs.items():
        if len(arr["data"]) > MAX_BIN_LEN:
            raise InfernoError("bad_request", f"output {name!r} is {len(arr['data'])} bytes; one "
                               f"reply array may hold {MAX_BIN_LEN}", "send a smaller batch")
    return {"outputs": outputs, "run_ms": (time.perf_counter() - t0) * 1000}


# The operations a run may name: ``embed`` takes {"requests": [[texts, normalize], ...]},
# ``infer`` takes {"inputs": {name: wire array}}.
OPS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "embed": embed_batch, "infer": infer_one}

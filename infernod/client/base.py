"""What :class:`~infernod.client.Client` and :class:`~infernod.client.AsyncClient` share:
connection setup and security, and every request method written once (``_Requests``: each
client supplies ``_call``, blocking or as a coroutine).

The protocol logic itself (frames, replies, heartbeats, which events to keep) is
:class:`~infernod.client.core.ClientCore`'s. Scripts import from :mod:`infernod.client`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from infernod.client.core import ClientCore, Event, Notice
from infernod.paths import Endpoints, default_endpoints, untrusted_socket
from infernod.protocol import bodies
from infernod.protocol.arrays import decode_array, encode_array
from infernod.protocol.errors import DaemonUnavailable, InfernoError


@dataclass
class CurveKeys:
    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_key: str, client_key: str) -> CurveKeys:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(server_key)
        client_public, client_secret = zmq.auth.load_certificate(client_key)
        if client_secret is None:
            raise InfernoError("bad_request", f"{client_key} holds no secret key",
                               "pass the .key_secret file made by 'inferno keys add'")
        return cls(server_public, client_public, client_secret)


def _endpoints(endpoint: str | Endpoints | None) -> Endpoints:
    if isinstance(endpoint, Endpoints):
        return endpoint
    return Endpoints.from_control(endpoint) if endpoint else default_endpoints()


def _check_socket_file(ep: Endpoints) -> None:
    if ep.control.startswith("ipc://"):
        path = Path(ep.control[len("ipc://"):])
        if not path.exists():
            raise DaemonUnavailable(f"no daemon socket at {path}",
                                    "start it with 'infernod' or 'systemctl start infernod'")
        why = untrusted_socket(path) or untrusted_socket(Path(ep.events[len("ipc://"):]))
        if why is not None:  # checked before a single byte (hello, a prompt) is sent
            raise DaemonUnavailable(
                f"refusing to talk to {path}: {why}; another user may be posing as the daemon",
                "set XDG_RUNTIME_DIR (a private runtime dir) or INFERNO_ENDPOINT to the real "
                "daemon's socket; if that user does run the daemon, set INFERNO_DAEMON_USER")


class _Base:
    """What both drivers share: the protocol core (:class:`ClientCore`), socket setup, and
    the public read-outs of the core's state."""

    def __init__(self, endpoint: str | Endpoints | None, timeout: float, name: str,
                 curve: CurveKeys | None, rcvbuf_bytes: int = 0,
                 session: str | None = None) -> None:
        self.endpoints = _endpoints(endpoint)
        self.rcvbuf_bytes = rcvbuf_bytes
        self.timeout = timeout
        self.name = name
        self.curve = curve
        self.core = ClientCore(session)

    # -- the core's state, read-only --------------------------------------------------------
    @property
    def session(self) -> str:
        """This client's session id (random unless given): the ``session`` of its requests."""
        return self.core.session

    @session.setter
    def session(self, session: str) -> None:
        # Only later requests' headers change: the subscriptions stay those of the old one.
        self.core.session = session

    @property
    def boot_id(self) -> str | None:
        return self.core.boot_id

    @property
    def welcomed(self) -> bool:
        return self.core.welcomed

    @property
    def welcome(self) -> dict[str, Any] | None:
        return self.core.welcome

    @property
    def restarted(self) -> bool:
        """True once a reply or event came from a daemon with a new boot id."""
        return self.core.restarted

    @property
    def heartbeat_interval_s(self) -> float:
        return self.core.heartbeat_interval_s

    @property
    def last_heartbeat(self) -> float:
        """Monotonic time of the last heartbeat or reply."""
        return self.core.last_heartbeat

    @property
    def stood_still_s(self) -> float:
        """Total time this client was not listening (stopped, suspended, busy)."""
        return self.core.stood_still_s

    @property
    def followed_streams(self) -> frozenset[str]:
        """Request ids whose token events this client keeps (its streams)."""
        return self.core.followed

    def stream_events(self, request_id: str) -> list[Event]:
        """Token events of one of our streams that arrived and were not read yet (a copy;
        call :meth:`listen` or ``event_batch`` first to take in what is waiting)."""
        return self.core.stream_events(request_id)

    def take_events(self) -> list[Event | Notice]:
        """Events (and the library's notices) that already arrived, without waiting."""
        return self.core.take_events()

    def check_alive(self) -> None:
        """Raise DaemonUnavailable when heartbeats stopped (for UIs that poll)."""
        self.core.check_alive()

    def _setup(self, dealer: zmq.Socket[Any], sub: zmq.Socket[Any],
               topics: tuple[str, ...]) -> None:
        if not self.endpoints.control.startswith("tcp://"):
            _check_socket_file(self.endpoints)
        elif self.curve is None:
            raise InfernoError("bad_request", "tcp:// endpoints need CURVE keys",
                               "pass --server-key and --client-key")
        for s in (dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if self.curve is not None:
                s.curve_serverkey = self.curve.server_public
                s.curve_publickey = self.curve.client_public
                s.curve_secretkey = self.curve.client_secret
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 1000)
        sub.setsockopt(zmq.RCVHWM, 100000)
        if self.rcvbuf_bytes:  # kernel buffer of the events connection (tcp); 0 = OS default
            sub.setsockopt(zmq.RCVBUF, self.rcvbuf_bytes)
        dealer.connect(self.endpoints.control)
        sub.connect(self.endpoints.events)
        sub.setsockopt(zmq.SUBSCRIBE, f"tokens.{self.session}.".encode())
        sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
        for t in topics:
            sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.core.watch_tokens = any(t.startswith("tokens") for t in topics)
        # Subscribed last: when the welcome arrives, every subscription above is in place.
        sub.setsockopt(zmq.SUBSCRIBE, f"welcome.{self.session}".encode())

    @staticmethod
    def _gen_body(model: str, prompt: str | None, messages: list[dict[str, str]] | None,
                  params: dict[str, Any]) -> dict[str, Any]:
        body = {"model": model, **{k: v for k, v in params.items() if v is not None}}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        return body


class _Requests:
    """Every plain request, written once for both clients.

    ``_call`` is the only difference: :class:`Client` returns the result, :class:`AsyncClient`
    returns an awaitable of it. So ``c.ping()`` and ``await ac.ping()`` mean the same.
    """

    timeout: float
    name: str

    def _call(self, type_: str, body: dict[str, Any] | None = None,
              post: Callable[[dict[str, Any]], Any] | None = None, **kw: Any) -> Any:
        raise NotImplementedError

    def hello(self) -> Any:
        return self._call("hello", {"client": self.name})

    def ping(self) -> Any:
        return self._call("ping")

    def status(self) -> Any:
        return self._call("status")

    def models(self) -> Any:
        """Every model on disk, with its state: ``list[bodies.ModelState]``."""
        return self._call("models.list", post=_model_states, timeout=max(self.timeout, 30))

    def model_listing(self) -> Any:
        """``{models, skipped}``: the models, and the files the daemon could not use and why."""
        return self._call("models.list", timeout=max(self.timeout, 30))

    def show(self, model: str) -> Any:
        return self._call("models.show", {"model": model})

    def load(self, model: str, keep_alive: float | None = None, timeout: float = 600) -> Any:
        return self._call("models.load", _drop_none({"model": model, "keep_alive": keep_alive}),
                          timeout=timeout)

    def unload(self, model: str) -> Any:
        return self._call("models.unload", {"model": model}, timeout=60)

    def cancel(self, request_id: str) -> Any:
        return self._call("cancel", {"request_id": request_id})

    def config_get(self, key: str | None = None) -> Any:
        return self._call("config.get", _drop_none({"key": key}))

    def embed(self, model: str, texts: list[str], *, normalize: bool = True,
              priority: str | None = None, deadline: float | None = None,
              timeout: float | None = None) -> Any:
        """Embed ``texts`` with an ONNX embedding model: ``(float32 array [n, dim], info)``,
        ``info`` being the reply without ``vectors`` (dim, truncated, tokens, stats)."""
        return self._call("embed", _embed_body(model, texts, normalize, priority),
                          post=_embed_result, deadline=deadline,
                          timeout=timeout or max(self.timeout, 120))

    def infer(self, model: str, inputs: dict[str, Any], *, priority: str | None = None,
              deadline: float | None = None, timeout: float | None = None) -> Any:
        """Run an ONNX model on named numpy arrays: ``({output name: array}, stats)``."""
        return self._call("infer", _infer_body(model, inputs, priority), post=_infer_result,
                          deadline=deadline, timeout=timeout or max(self.timeout, 120))

    def stats(self) -> Any:
        """Latency percentiles computed in the daemon (see docs/protocol.md, ``stats``)."""
        return self._call("stats")

    def profiles(self, n: int = 20) -> Any:
        """The latest ``n`` request profiles, oldest first: ``list[bodies.Profile]``."""
        return self._call("profiles.recent", {"n": n}, post=_profiles)

    def metrics(self) -> Any:
        """The latest system/GPU sample, ``bodies.MetricsSample`` (None before the first)."""
        return self._call("metrics.get", post=_metrics_sample)

    def queue_list(self, model: str | None = None) -> Any:
        """Every running and waiting request (``model``'s only, if given):
        ``bodies.QueueSnapshot``."""
        return self._call("queue.list", _drop_none({"model": model}),
                          post=bodies.queue_snapshot_from_wire)

    def reprioritize(self, request_id: str, priority: str) -> Any:
        return self._call("reprioritize", {"request_id": request_id, "priority": priority})

    def jobs_submit(self, model: str, prompts: list[str], *, idem: str | None = None,
                    **params: Any) -> Any:
        """Store a job; with ``idem`` a retried submit returns the same ``job_id``."""
        return self._call("jobs.submit", _drop_none({"model": model, "prompts": prompts,
                                                     **params}),
                          idem=idem, timeout=max(self.timeout, 30))

    def jobs_get(self, job_id: str, offset: int = 0, limit: int | None = None) -> Any:
        """The job and one page of its items (1000 unless ``limit``); while the reply's
        ``next_offset`` is not None, ask again with ``offset=next_offset`` for the rest."""
        return self._call("jobs.get", _drop_none({"job_id": job_id, "offset": offset,
                                                  "limit": limit}))

    def jobs_list(self, **filters: Any) -> Any:
        return self._call("jobs.list", _drop_none(filters), post=lambda r: r["jobs"])

    def jobs_cancel(self, job_id: str) -> Any:
        return self._call("jobs.cancel", {"job_id": job_id})

    def _drive(self, steps: UploadSteps) -> Any:
        raise NotImplementedError

    def upload_model(self, path: str | os.PathLike[str], name: str | None = None, *,
                     progress: UploadProgress | None = None, resume: bool = True) -> Any:
        """Send a local ``.gguf``/``.onnx`` file to the daemon as a new model, in chunks.

        The file is read here, with the caller's rights (the daemon never opens a path of
        the caller's choosing). ``progress(sent_bytes, total_bytes)`` is called after each
        chunk. The daemon checks the sha256 computed while sending, validates the header
        and returns ``{model, path, size, sha256}``. On an error or an interrupt the upload
        is aborted (nothing is left on the daemon); when the daemon becomes unreachable it
        keeps the partial file for a while, and calling again with the same file and name
        resumes where it stopped (``resume=False`` starts over).
        """
        return self._drive(_upload_steps(Path(path), name, progress, resume,
                                         max(self.timeout, 60.0)))

    def pull(self, source: str, name: str | None = None, *, sha256: str | None = None,
             stall_timeout_s: float | None = None, timeout: float = 180) -> Any:
        """Ask the daemon to download a model (a URL, ``hf://org/repo/file.gguf`` or
        ``org/repo:QUANT``) onto its own host. Returns once the server answered: the pull's
        state (``pull_id``, ``state``, ``done_bytes``, ``total_bytes``, ...); follow it with
        :meth:`pulls` or the ``progress`` events of the ``models`` topic."""
        return self._call("models.pull", _drop_none({
            "source": source, "name": name, "sha256": sha256,
            "stall_timeout_s": stall_timeout_s}), timeout=timeout)

    def pulls(self) -> Any:
        """The running pulls and the last finished ones: ``list[dict]``."""
        return self._call("models.pulls", post=lambda r: r["pulls"])

    def pull_cancel(self, pull: str) -> Any:
        """Stop a pull (by ``pull_id`` or model name) and delete what it fetched."""
        return self._call("models.pull.cancel", {"pull": pull})

    def import_path(self, path: str, name: str | None = None, *, link: bool = False,
                    timeout: float = 3600) -> Any:
        """Import a model that is already on the daemon's host, by path: only from the
        directories its operator listed in ``models.import_dirs``."""
        return self._call("models.import", _drop_none({"path": path, "name": name,
                                                      "link": link or None}),
                          timeout=timeout)


UploadProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class UploadStep:
    """One request of an upload; the client that drives the steps sends it."""

    type: str
    body: dict[str, Any]
    timeout: float
    best_effort: bool = False  # an abort: its failure must not hide the original error


UploadSteps = Generator[UploadStep, dict[str, Any], dict[str, Any]]


def _upload_steps(path: Path, name: str | None, progress: UploadProgress | None,
                  resume: bool, timeout: float) -> UploadSteps:
    """The whole upload as a generator of requests, so Client and AsyncClient share it:
    the driver sends each step and sends the reply back in (or throws the error in)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise InfernoError("bad_request", f"cannot read {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise InfernoError("invalid_model", f"{path} is empty")
        begin = yield UploadStep("models.upload.begin", _drop_none(
            {"filename": path.name, "size": size, "name": name, "resume": resume}), timeout)
        upload_id, offset, chunk = begin["upload_id"], begin["offset"], begin["chunk_bytes"]
        digest = hashlib.sha256()
        try:
            while f.tell() < offset:  # resumed: the daemon has these bytes, we hash them
                block = f.read(min(8 * chunk, offset - f.tell()))
                if not block:
                    raise InfernoError("conflict", f"{path} is shorter than the "
                                       f"{offset} bytes already sent", "send it again")
                digest.update(block)
            if progress:
                progress(offset, size)
            while offset < size:
                data = f.read(min(chunk, size - offset))
                if not data:
                    raise InfernoError("conflict", f"{path} shrank while it was sent")
                digest.update(data)
                reply = yield UploadStep("models.upload.chunk", {
                    "upload_id": upload_id, "offset": offset, "data": data}, timeout)
                offset = reply["offset"]
                if progress:
                    progress(offset, size)
            return (yield UploadStep("models.upload.finish", {
                "upload_id": upload_id, "sha256": digest.hexdigest()}, max(timeout, 600.0)))
        except DaemonUnavailable:
            raise  # the daemon keeps the partial upload for a while: a rerun resumes it
        except BaseException:
            try:
                yield UploadStep("models.upload.abort", {"upload_id": upload_id}, 10.0,
                                 best_effort=True)
            except InfernoError:
                pass
            raise


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _embed_body(model: str, texts: list[str], normalize: bool,
                priority: str | None) -> dict[str, Any]:
    if isinstance(texts, str):
        raise InfernoError("bad_request", "texts must be a list of strings, not one string")
    body: dict[str, Any] = {"model": model, "texts": list(texts), "normalize": normalize}
    if priority is not None:
        body["priority"] = priority
    return body


def _embed_result(reply: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    info = {k: v for k, v in reply.items() if k != "vectors"}
    return decode_array(reply["vectors"]).copy(), info


def _infer_body(model: str, inputs: dict[str, Any], priority: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model,
                            "inputs": {name: encode_array(a) for name, a in inputs.items()}}
    if priority is not None:
        body["priority"] = priority
    return body


def _infer_result(reply: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    outputs = {name: decode_array(a).copy() for name, a in reply["outputs"].items()}
    return outputs, reply.get("stats") or {}


def default_client_name() -> str:
    return f"{os.path.basename(sys.argv[0]) or 'python'}:{os.getpid()}"


def _model_states(reply: dict[str, Any]) -> list[bodies.ModelState]:
    return [bodies.model_state_from_wire(m) for m in reply.get("models") or []]


def _profiles(reply: dict[str, Any]) -> list[bodies.Profile]:
    return [bodies.profile_from_wire(p) for p in reply.get("profiles") or []]


def _metrics_sample(reply: dict[str, Any]) -> bodies.MetricsSample | None:
    sample = reply.get("sample")
    return None if sample is None else bodies.metrics_sample_from_wire(sample)

"""The gateway when slots are scarce: one slot, a short queue. A client that leaves frees
its slot; a `vip` request goes before waiting `normal` ones; a full queue answers 429 with
Retry-After; a passed deadline 504; a draining or gone daemon 503.

Real daemon, real gateway process, real sockets; every wait is bounded."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_harness import DaemonProcess, wait_for
from gateway_harness import GatewayProcess, daemon_and_gateway

MODEL = "gemma3-270m"
QUEUE = 4
LONG = {"max_tokens": 900, "ignore_eos": True}  # far longer than any test waits


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[DaemonProcess, GatewayProcess]]:
    with daemon_and_gateway({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 1,
                                       "preload": [MODEL]},
                            "scheduler": {"max_queue_per_model": QUEUE},
                            "daemon": {"drain_timeout_s": 20}}, tmp_path_factory.mktemp("gw")) as pair:
        yield pair


def _oai(gw: GatewayProcess, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", timeout=timeout,
                         max_retries=0)


def _rows(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.client(timeout=10) as c:
        return list(c.queue_list()["items"])


def _running(daemon: DaemonProcess) -> list[str]:
    return [r["request_id"] for r in _rows(daemon) if r["state"] in ("running", "preempting")]


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def http(method: str, url: str, *, body: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """One HTTP request with urllib (no extra package), errors returned, not raised."""
    data = content if content is not None else (
        json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                         resp.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


@pytest.fixture(autouse=True)
def idle_slot(stack: tuple[DaemonProcess, GatewayProcess]) -> Iterator[None]:
    """Each test starts and ends with nothing running or waiting (cancelled if need be)."""
    daemon = stack[0]
    yield
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    with daemon.client(timeout=10) as c:
        for row in c.queue_list()["items"]:
            try:
                c.cancel(row["request_id"])
            except Exception:
                pass
    wait_for(lambda: not _rows(daemon), 30, "an empty queue after the test")


class Streamer:
    """A streaming chat request read in a thread; records when its first text came."""

    def __init__(self, gw: GatewayProcess, *, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None, max_tokens: int = 4) -> None:
        self.oai = _oai(gw)
        self.headers = headers or {}
        self.body = body or {}
        self.max_tokens = max_tokens
        self.first_text_at: float | None = None
        self.request_id: str | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Streamer:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            raw = self.oai.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                max_tokens=self.max_tokens, temperature=0, stream=True,
                extra_headers=self.headers, extra_body=self.body)
            self.request_id = raw.headers["x-request-id"]
            stream = raw.parse()
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content \
                            and self.first_text_at is None:
                        self.first_text_at = time.monotonic()
                    if self.stop.is_set():
                        return  # leaving the with-block closes the connection
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "a streaming request did not end"
        assert self.error is None, repr(self.error)


def _blocker(stack: tuple[DaemonProcess, GatewayProcess]) -> Streamer:
    """A long generation holding the only slot, running once this returns."""
    s = Streamer(stack[1], body=dict(LONG), max_tokens=LONG["max_tokens"]).start()
    wait_for(lambda: s.request_id and s.request_id in _running(stack[0]), 60,
             "the blocker to run")
    return s


def test_client_disconnect_cancels_the_stream_and_frees_the_slot(stack) -> None:
    daemon, gw = stack
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "stream": True,
                       "temperature": 0, **LONG}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: {") < 3:  # a few tokens: it is decoding
            data = sock.recv(65536)
            assert data, got
            got += data
    rid = next(line.split(b":", 1)[1].strip().decode() for line in got.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    left = time.monotonic()
    wait_for(lambda: rid not in _running(daemon), 10, "the slot to be freed")
    freed_s = time.monotonic() - left
    with daemon.client(timeout=10) as c:
        stream = c.attach(rid)
        list(stream)
        assert stream.stats is not None and stream.stats["finish_reason"] == "cancelled"
        assert stream.stats["completion_tokens"] < LONG["max_tokens"]
    # The next request starts at once: nothing else holds the slot.
    t0 = time.monotonic()
    out = _oai(gw).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None
    assert time.monotonic() - t0 < 30
    print(f"slot freed {freed_s * 1000:.0f} ms after the disconnect")


def test_non_streaming_client_timeout_cancels_its_request(stack) -> None:
    daemon, gw = stack
    with pytest.raises(openai.APITimeoutError):
        _oai(gw, timeout=4.0).completions.create(
            model=MODEL, prompt="Once upon a time", extra_body=LONG, max_tokens=900)
    wait_for(lambda: not _rows(daemon), 10, "the abandoned request to be cancelled")


def test_vip_starts_before_waiting_normal_requests(stack) -> None:
    daemon, gw = stack
    blocker = _blocker(stack)
    normals = [Streamer(gw).start() for _ in range(3)]
    wait_for(lambda: sum(r["state"] == "queued" for r in _rows(daemon)) == 3, 30,
             "three normal requests waiting")
    vip = Streamer(gw, headers={"X-Inferno-Priority": "vip"}).start()
    wait_for(lambda: vip.request_id, 30, "the vip request's admission")
    classes = {r["request_id"]: r["class"] for r in _rows(daemon)}
    assert classes.get(vip.request_id, "vip") == "vip"
    blocker.stop.set()  # frees the slot in case vip does not preempt
    for s in [vip, *normals]:
        s.join()
    blocker.join()
    assert vip.first_text_at is not None
    assert all(n.first_text_at is not None and vip.first_text_at < n.first_text_at
               for n in normals)


def test_vllm_integer_priority_in_the_body(stack) -> None:
    daemon, gw = stack
    blocker = _blocker(stack)
    try:
        s = Streamer(gw, body={"priority": -1}).start()
        wait_for(lambda: s.request_id and any(r["request_id"] == s.request_id
                                              for r in _rows(daemon)), 30, "admission")
        row = next(r for r in _rows(daemon) if r["request_id"] == s.request_id)
        assert row["class"] == "high"
    finally:
        blocker.stop.set()
    s.join()
    blocker.join()


def test_full_queue_answers_429_overloaded_with_retry_after(stack) -> None:
    daemon, gw = stack
    blocker = _blocker(stack)
    waiting = [Streamer(gw).start() for _ in range(QUEUE)]
    try:
        wait_for(lambda: sum(r["state"] == "queued" for r in _rows(daemon)) == QUEUE, 30,
                 "a full queue")
        r = http("POST", gw.url + "/v1/completions", timeout=30,
                       body={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    finally:
        blocker.stop.set()
        for s in waiting:
            s.join()
        blocker.join()


def test_passed_deadline_answers_504(stack) -> None:
    gw = stack[1]
    r = http("POST", gw.url + "/v1/completions", timeout=60,
                   headers={"X-Inferno-Deadline-Ms": "400"},
                   body={"model": MODEL, "prompt": "Once", **LONG})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] in ("deadline_exceeded", "would_miss_deadline")


def test_bad_bodies_answer_400_in_openais_shape(stack) -> None:
    gw = stack[1]
    cases = [
        (b"{not json", None),
        (json.dumps({"model": MODEL, "prompt": "x", "n": 2}).encode(), "n"),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": 9}).encode(), None),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": MODEL, "prompt": "x", "stop": 3}).encode(), "stop"),
        (json.dumps({"model": MODEL, "prompt": "x", "priority": "urgent"}).encode(),
         "priority"),
    ]
    for body, param in cases:
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = http("POST", gw.url + path, content=body, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        if param:
            assert err["param"] == param
    r = http("POST", gw.url + "/v1/completions", timeout=30,
                   body={"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http("GET", gw.url + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_draining_then_gone_daemon_answers_503_until_it_is_back(stack) -> None:
    """Last in the module: it stops the daemon (and starts it again)."""
    daemon, gw = stack
    blocker = _blocker(stack)  # keeps the drain going
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def refused() -> Reply | None:
        r = http("POST", gw.url + "/v1/completions", timeout=30,
                       body={"model": MODEL, "prompt": "x", "max_tokens": 1})
        return r if r.status_code == 503 else None

    r = wait_for(refused, 15, "a 503 while draining")
    assert r.json()["error"]["code"] == "shutting_down"
    assert "retry-after" in r.headers
    health = http("GET", gw.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert "draining" in health.json()["reason"]
    blocker.stop.set()
    blocker.join()
    daemon.stop(timeout=30)
    health = http("GET", gw.url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "down"
    r = http("POST", gw.url + "/v1/completions", timeout=30,
                   body={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    # The daemon comes back: the same gateway serves again, no restart needed.
    daemon.start()
    r = http("POST", gw.url + "/v1/completions", timeout=120,
             body={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert http("GET", gw.url + "/health").json()["status"] == "ready"

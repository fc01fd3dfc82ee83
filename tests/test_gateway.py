"""The OpenAI-compatible gateway, as its users call it: the real `openai` package against a
real `inferno-gateway` process in front of a real daemon with the default model."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from daemon_harness import DaemonProcess
from gateway_harness import GatewayProcess, daemon_and_gateway, run_gateway

from infernod.gateway.errors import STATUS, missing_codes
from infernod.protocol.errors import CODES

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[DaemonProcess, GatewayProcess]]:
    with daemon_and_gateway({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 4,
                                       "preload": [MODEL]}}, tmp_path_factory.mktemp("gw")) as pair:
        yield pair


@pytest.fixture
def oai(stack: tuple[DaemonProcess, GatewayProcess]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack[1].url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


def test_every_daemon_error_code_has_an_http_status() -> None:
    assert not missing_codes()
    assert set(CODES) <= set(STATUS)
    assert STATUS["overloaded"] == 429 and STATUS["unknown_model"] == 404
    assert STATUS["shutting_down"] == 503 and STATUS["deadline_exceeded"] == 504


def test_models_lists_the_default_model(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids


def test_completion_non_streaming(oai: openai.OpenAI) -> None:
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert raw.headers["x-request-id"]
    got = raw.parse()
    assert got.object == "text_completion" and got.model == MODEL
    assert got.choices[0].text and got.choices[0].finish_reason in ("length", "stop")
    assert got.usage is not None and got.usage.completion_tokens >= 1
    assert got.usage.prompt_tokens >= 1


def test_health_is_ready(stack: tuple[DaemonProcess, GatewayProcess]) -> None:
    import urllib.request

    with urllib.request.urlopen(stack[1].url + "/health", timeout=30) as resp:
        body = json.loads(resp.read())
    assert resp.status == 200 and body["status"] == "ready", body


def test_non_loopback_listen_is_refused_without_keys(tmp_path: Path) -> None:
    r = run_gateway(["--listen", "0.0.0.0:0", "--endpoint", f"ipc://{tmp_path}/control.sock"])
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0" in r.stderr and "API keys" in r.stderr


def test_chat_non_streaming_uses_the_daemons_template_fallback(oai: openai.OpenAI) -> None:
    got = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You answer briefly."},
                               {"role": "user", "content": "Name a colour."}],
        max_completion_tokens=6, temperature=0, seed=1, user="alice")
    assert got.object == "chat.completion"
    msg = got.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert got.usage is not None and 1 <= got.usage.completion_tokens <= 6


def test_chat_streaming_chunks_as_openai_sends_them(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count: one, two,"}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("length", "stop")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert 1 <= last.usage.completion_tokens <= 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streaming_matches_non_streaming(oai: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": "Water boils at", "max_tokens": 10, "temperature": 0}
    whole = oai.completions.create(**kw)
    parts = list(oai.completions.create(stream=True, **kw))
    assert all(p.object == "text_completion" for p in parts)
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert parts[-1].usage is None  # no include_usage: no usage chunk


def test_stop_strings_end_the_text(oai: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": "The days of the week are Monday,", "max_tokens": 12,
          "temperature": 0}
    text = oai.completions.create(**kw).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    got = oai.completions.create(stop=stop, **kw).choices[0]
    assert got.finish_reason == "stop" and stop not in got.text
    assert text.startswith(got.text)


def _read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``sock``: status line, headers, the body de-chunked (or by
    Content-Length). Reads exactly the response, so the next one can follow."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, "connection closed before the headers"
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def need(n: int) -> None:
        nonlocal rest
        while len(rest) < n:
            data = sock.recv(65536)
            assert data, "connection closed inside the body"
            rest += data

    if "content-length" in headers:
        n = int(headers["content-length"])
        need(n)
        return lines[0], headers, rest[:n]
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        while b"\r\n" not in rest:
            need(len(rest) + 1)
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        need(size + 2)
        body += rest[:size]
        rest = rest[size + 2:]
        if size == 0:
            return lines[0], headers, body


def _post(sock: socket.socket, path: str, body: dict) -> None:
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)


def test_sse_framing_at_the_byte_level_on_one_kept_alive_connection(
        stack: tuple[DaemonProcess, GatewayProcess]) -> None:
    with socket.create_connection(("127.0.0.1", stack[1].port), timeout=120) as sock:
        _post(sock, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3})
        status, headers, body = _read_response(sock)
        assert status == "HTTP/1.1 200 OK" and json.loads(body)["object"] == "text_completion"
        assert headers.get("connection", "keep-alive").lower() != "close"
        # The same socket: a second request, streamed.
        _post(sock, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}})
        status, headers, body = _read_response(sock)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-request-id"]
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for ev in events[:-2]:  # every event: exactly one `data: ` line holding one JSON object
        assert ev.startswith(b"data: {") and b"\n" not in ev, ev
        json.loads(ev[len(b"data: "):])
    objs = [json.loads(ev[len(b"data: "):]) for ev in events[:-2]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] >= 1


def test_openai_user_is_the_requests_client_in_queue_rows_and_profiles(
        stack: tuple[DaemonProcess, GatewayProcess], oai: openai.OpenAI,
        capsys: pytest.CaptureFixture[str]) -> None:
    """OpenAI's ``user`` reaches the daemon as the request's label: ``inferno queue`` shows it
    while the stream runs, and the request's profile keeps it."""
    from infernod.cli import app as cli

    daemon = stack[0]
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=400, temperature=0, stream=True, user="alice@example.org",
        extra_body={"ignore_eos": True})
    rid = raw.headers["x-request-id"]
    stream = raw.parse()
    try:
        next(iter(stream))  # it runs now
        assert cli.main(["--endpoint", daemon.endpoint, "queue"]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(rid)]
        assert len(lines) == 1 and lines[0].endswith(" alice@example.org"), lines
    finally:
        stream.close()
    with daemon.client(timeout=10) as c:
        for _ in range(100):  # the profile is written when the cancelled stream ends
            mine = [p for p in c.profiles(50) if p["request_id"] == rid]
            if mine:
                break
            c.listen(0.1)
    assert mine and mine[0]["client"] == "alice@example.org"


@pytest.mark.parametrize("user,why", [("u" * 65, "65 characters"),
                                      ("alice\nINFO forged line", "control characters")])
def test_a_user_too_long_or_with_control_characters_is_a_400_naming_it(
        oai: openai.OpenAI, user: str, why: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user=user)
    body = e.value.body
    assert isinstance(body, dict) and body["param"] == "user", body
    assert why in body["message"] and "64" in body["message"]


def test_the_daemon_refuses_a_label_with_a_newline(
        stack: tuple[DaemonProcess, GatewayProcess]) -> None:
    from infernod.protocol.errors import InfernoError

    with stack[0].client(timeout=30) as c, pytest.raises(InfernoError) as e:
        c.generate(MODEL, "Hi", max_tokens=2, client="bob\r\nx")
    assert e.value.code == "bad_request" and "generate.client" in e.value.message
    assert "printable" in e.value.message


def test_done_and_the_end_of_the_body_leave_in_one_write() -> None:
    """``[DONE]`` and the chunked body's terminator go out together: a client that stops
    reading at ``[DONE]`` finds the body complete and keeps its connection (aiohttp's
    client, like others, closes one whose body has not ended)."""
    import asyncio
    from unittest import mock

    from aiohttp.http_writer import StreamWriter
    from aiohttp.test_utils import make_mocked_request

    from infernod.gateway import sse

    async def stream() -> list[bytes]:
        writes: list[bytes] = []
        transport = mock.Mock(is_closing=lambda: False)  # a socket that records each write
        transport.write = lambda b: writes.append(bytes(b))
        transport.writelines = lambda bs: writes.append(b"".join(bytes(x) for x in bs))
        protocol = mock.Mock(transport=transport, _reading_paused=False,
                             _drain_helper=mock.AsyncMock())
        writer = StreamWriter(protocol, asyncio.get_running_loop())
        req = make_mocked_request("POST", "/v1/completions", writer=writer, protocol=protocol,
                                  transport=transport)
        resp = await sse.open_stream(req, {})
        await sse.send(resp, {"a": 1})
        await sse.done(resp)
        return writes

    writes = asyncio.run(stream())
    assert writes[-2] == b'f\r\ndata: {"a":1}\n\n\r\n'
    assert writes[-1] == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"

"""API keys and /metrics through the real gateway: the `openai` package and plain HTTP
against `inferno-gateway` in front of a real daemon with the default model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from daemon_harness import DaemonProcess
from gateway_harness import GatewayProcess, daemon_and_gateway, run_gateway
from prometheus_client.parser import text_string_to_metric_families

from infernod import apikeys
from infernod.client import Client, api_key
from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"
Stack = tuple[DaemonProcess, GatewayProcess]


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def load(daemon: DaemonProcess) -> None:
        with daemon.client(timeout=120) as c:
            c.load(MODEL)

    with daemon_and_gateway({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 2,
                                       "preload": [MODEL]}}, tmp_path_factory.mktemp("gw"), load) as pair:
        yield pair


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    kdir = stack[0].state / "keys"
    return {name: apikeys.add(kdir, name, role)[0]
            for name, role in (("alice", "user"), ("bob", "user"), ("mon", "monitor"),
                               ("ops", "operator"))}


def _oai(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, timeout=120, max_retries=0)


def _http(url: str, headers: dict[str, str] | None = None,
          body: dict | None = None) -> tuple[int, dict, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _scrape(gw: GatewayProcess) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=30) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_http_users_saw(stack: Stack, keys: dict[str, str]) -> None:
    _, gw = stack
    before = _scrape(gw)  # no key needed
    oai = _oai(gw, keys["alice"])
    usage = []
    for prompt in ("The capital of France is", "Water boils at"):
        got = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        usage.append(got.usage)
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count: one, two,"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    usage.append(chunks[-1].usage)
    after = _scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    m = {"model_name": MODEL}
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "inferno_gateway_time_to_first_token_seconds_count",
                 "inferno_gateway_request_latency_seconds_count"):
        assert delta(name, **m) == 3, name
    assert delta("vllm:time_to_first_token_seconds_sum", **m) > 0
    gen = sum(u.completion_tokens for u in usage)
    prompt = sum(u.prompt_tokens for u in usage)
    assert gen > 0 and prompt > 0
    assert delta("vllm:generation_tokens_total", **m) == gen
    assert delta("vllm:prompt_tokens_total", **m) == prompt
    assert delta("inferno_gateway_generation_tokens_total", **m) == gen
    assert delta("inferno_gateway_http_requests_total", path="/v1/completions",
                 status="200") == 2
    assert delta("inferno_gateway_http_requests_total", path="/v1/chat/completions",
                 status="200") == 1
    # the daemon's queue, per model: idle now, and the loaded model is there with 0
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert (name, (("model_name", MODEL),)) in after and _value(after, name, **m) == 0
    assert _value(after, "inferno_requests_running", model=MODEL) == 0
    assert _value(after, "inferno_gateway_daemon_up") == 1


def test_metrics_show_a_running_request(stack: Stack, keys: dict[str, str]) -> None:
    _, gw = stack
    oai = _oai(gw, keys["alice"])
    stream = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=400,
                                    temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        samples = _scrape(gw)
        assert _value(samples, "vllm:num_requests_running", model_name=MODEL) == 1, samples
        assert _value(samples, "inferno_gateway_requests_in_flight") >= 1
    finally:
        stream.close()


def test_keys_401_403_success_and_revocation(stack: Stack, keys: dict[str, str]) -> None:
    daemon, gw = stack
    k = keys
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    # keys exist: a wrong key, and no key at all, are 401 (OpenAI's shape)
    with pytest.raises(openai.AuthenticationError) as ei:
        _oai(gw, "unused").completions.create(**body)
    assert ei.value.status_code == 401 and ei.value.code == "unauthenticated"
    status, err, _ = _http(gw.url + "/v1/completions", body=body)
    assert status == 401 and err["error"]["type"] == "authentication_error", err
    # a monitor may list models, not generate
    assert MODEL in [m.id for m in _oai(gw, k["mon"]).models.list()]
    with pytest.raises(openai.PermissionDeniedError) as pe:
        _oai(gw, k["mon"]).completions.create(**body)
    assert pe.value.status_code == 403
    # a user key generates; Azure's api-key header works too
    got = _oai(gw, k["alice"]).completions.create(**body)
    assert got.choices[0].text is not None and got.usage.completion_tokens >= 1
    status, out, _ = _http(gw.url + "/v1/completions", {"api-key": k["bob"]}, body)
    assert status == 200, out
    # /health and /metrics need no key
    assert _http(gw.url + "/health")[0] == 200
    _scrape(gw)
    # revocation: the very next request is 401
    assert apikeys.revoke(daemon.state / "keys", "bob") is not None
    status, err, _ = _http(gw.url + "/v1/completions", {"Authorization": f"Bearer {k['bob']}"},
                           body)
    assert status == 401, err
    k["bob"] = apikeys.add(daemon.state / "keys", "bob", "user")[0]  # for the tests below


def test_an_http_request_belongs_to_its_key(stack: Stack, keys: dict[str, str]) -> None:
    """Alice's streaming request, seen from the daemon: bob's key can neither read nor
    cancel it, alice's key can read it."""
    daemon, gw = stack
    stream = _oai(gw, keys["alice"]).completions.with_streaming_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=300, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    with stream as resp:
        rid = resp.headers["x-request-id"]
        next(resp.iter_lines())
        with Client(daemon.endpoint, timeout=10) as c:
            for key, fetch, cancel in ((keys["bob"], "unknown_request", "forbidden"),
                                       (keys["alice"], "ok", "forbidden")):  # other session
                with api_key(key):
                    got = {}
                    for what, fn in (("fetch", lambda: c.request(
                            "stream.fetch", {"request_id": rid})),
                                     ("cancel", lambda: c.cancel(rid))):
                        try:
                            fn()
                            got[what] = "ok"
                        except InfernoError as e:
                            got[what] = e.code
                assert got == {"fetch": fetch, "cancel": cancel}, (key[:14], got)


def test_non_loopback_listen_needs_keys_and_then_every_caller_one(
        stack: Stack, keys: dict[str, str], tmp_path: Path) -> None:
    daemon, _ = stack
    gw = GatewayProcess(daemon.endpoint, tmp_path / "gw.log", "--listen", "0.0.0.0:0").start()
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        status, err, _ = _http(gw.url + "/v1/completions", body=body)
        assert status == 401 and "requires an API key" in err["error"]["message"], err
        assert _http(gw.url + "/v1/completions", {"Authorization": "Bearer sk-inferno-x"},
                     body)[0] == 401
        assert _http(gw.url + "/v1/completions",
                     {"Authorization": f"Bearer {keys['alice']}"}, body)[0] == 200
    finally:
        gw.stop()


def test_non_loopback_listen_is_refused_while_the_daemon_has_no_keys(
        models_dir: Path, tmp_path: Path) -> None:
    d = DaemonProcess({"models": {"dirs": [str(models_dir)]}})
    try:
        d.start()
        r = run_gateway(["--listen", "0.0.0.0:0", "--endpoint", d.endpoint])
        assert r.returncode == 2 and "the daemon has no API keys" in r.stderr, r.stderr
    finally:
        d.cleanup()

"""The OpenAI-compatible gateway, as its users call it: the real `openai` package against a
real `inferno-gateway` process in front of a real daemon with the default model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from daemon_harness import DaemonProcess
from gateway_harness import GatewayProcess, run_gateway

from infernod.gateway.errors import STATUS, missing_codes
from infernod.protocol.errors import CODES

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[DaemonProcess, GatewayProcess]]:
    daemon = DaemonProcess({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 4,
                                       "preload": [MODEL]}})
    gateway: GatewayProcess | None = None
    try:
        daemon.start()
        gateway = GatewayProcess(daemon.endpoint,
                                 tmp_path_factory.mktemp("gw") / "gateway.log").start()
        yield daemon, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        daemon.cleanup()


@pytest.fixture
def oai(stack: tuple[DaemonProcess, GatewayProcess]) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack[1].url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


def test_every_daemon_error_code_has_an_http_status() -> None:
    assert not missing_codes()
    assert set(STATUS) == set(CODES)
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

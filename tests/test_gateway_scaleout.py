"""Scale-out behind a router people already run: LiteLLM's ``Router`` (least-busy) over two
real daemons, each with its own real ``inferno-gateway`` on a free 127.0.0.1 port. The
requests spread over both nodes, all succeed, and Inferno's priority passes through LiteLLM
as the ``X-Inferno-Priority`` header or the ``priority`` body field (docs/scale-out.md)."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess
from gateway_harness import GatewayProcess

# LiteLLM fetches a model price list from GitHub at import unless told to use its own copy:
# tests never touch the network.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

MODEL = "gemma3-270m"
BATCH = "gemma3-270m-batch"  # a LiteLLM model group: the same model at low priority
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic")
REQUESTS = 16


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus sample's values over its labels, read from ``/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    pat = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pat.findall(text))


def test_litellm_router_spreads_requests_over_two_nodes(models_dir: Path,
                                                        tmp_path: Path) -> None:
    litellm = pytest.importorskip("litellm")
    daemons: list[DaemonProcess] = []
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(2):
            d = DaemonProcess({"models": {"dirs": [str(models_dir)], "n_ctx": 512, "slots": 2,
                                          "preload": [MODEL]}})
            daemons.append(d)
            d.start()
        for i, d in enumerate(daemons):
            g = GatewayProcess(d.endpoint, tmp_path / f"gateway{i}.log")
            gateways.append(g)
            g.start()

        def node(g: GatewayProcess, **extra: object) -> dict[str, object]:
            return {"model": f"openai/{MODEL}", "api_base": g.url + "/v1",
                    "api_key": "unused", "timeout": 120, **extra}

        # one model group per use: interactive work, and the same nodes as a batch group
        # whose every request runs at Inferno's low priority (set once, in the router)
        router = litellm.Router(
            model_list=[{"model_name": MODEL, "litellm_params": node(g)} for g in gateways]
            + [{"model_name": BATCH, "litellm_params": node(
                g, extra_headers={"X-Inferno-Priority": "low"})} for g in gateways],
            routing_strategy="least-busy", num_retries=0, timeout=120)

        async def one(i: int) -> str:
            # interactive: the priority per request, as a header or vLLM's integer field
            extra: dict[str, object] = (
                {"extra_headers": {"X-Inferno-Priority": "high"}} if i % 4 == 0
                else {"extra_body": {"priority": -1}} if i % 4 == 2 else {})
            got = await router.acompletion(
                model=BATCH if i % 2 else MODEL,
                messages=[{"role": "user", "content": f"Say {i}."}],
                max_tokens=4, temperature=0, **extra)
            assert got.choices[0].message.content is not None
            return str(got.choices[0].finish_reason)

        async def all_of_them() -> list[str]:
            return await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(REQUESTS))), timeout=600)

        reasons = asyncio.run(all_of_them())
        assert len(reasons) == REQUESTS
        assert set(reasons) <= {"length", "stop"}, reasons

        # each node's /metrics (what a router or Prometheus reads): generations completed
        # there, and the tokens its daemon generated for them
        done = [metric(g.url, "vllm:request_success_total") for g in gateways]
        assert sum(done) == REQUESTS, done
        assert all(n >= 1 for n in done), f"one node got everything: {done}"
        tokens = [metric(g.url, "vllm:generation_tokens_total") for g in gateways]
        assert all(t >= 1 for t in tokens), tokens
        logs = "".join(g.log() for g in gateways)
        assert logs.count("priority=low") == REQUESTS // 2, logs
        assert logs.count("priority=high") == REQUESTS // 2, logs
    finally:
        for g in gateways:
            g.stop()
        for d in daemons:
            d.cleanup()

"""``GET /metrics``: Prometheus text, under our own ``inferno_`` names and under the names
the routers and autoscalers in front of model servers already read (vLLM's: LiteLLM,
Envoy AI Gateway / llm-d's endpoint picker, KEDA and Grafana dashboards).

Two kinds of figures:

* measured here, per HTTP request (what an HTTP user saw, gateway included): time to first
  token and end-to-end latency as histograms, prompt and generated tokens as counters,
  labelled ``model_name``; every HTTP answer by path and status;
* asked of the daemon at scrape time (``queue.list`` and ``status``, as the gateway's own
  principal): requests waiting and running per model, as gauges. A loaded model with no
  request shows 0, so a router sees an idle replica, not a missing one.

The metrics live in a registry of their own (nothing in the process-global default one,
which tests and libraries share), one per :class:`GatewayMetrics`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from infernod.client import AsyncClient
from infernod.protocol.errors import InfernoError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 2.0
# vLLM's buckets, so dashboards built for it read ours unchanged
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
WAITING_STATES = ("queued",)
RUNNING_STATES = ("running", "preempting")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.ttft = (
            Histogram("vllm:time_to_first_token_seconds", "Time to first token (gateway)", m,
                      registry=r, buckets=TTFT_BUCKETS),
            Histogram("inferno_gateway_time_to_first_token_seconds", "HTTP request arrival "
                      "to its first token, seconds", m, registry=r, buckets=TTFT_BUCKETS))
        self.e2e = (
            Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", m,
                      registry=r, buckets=E2E_BUCKETS),
            Histogram("inferno_gateway_request_latency_seconds", "HTTP request arrival to its "
                      "last token, completed generations, seconds", m, registry=r,
                      buckets=E2E_BUCKETS))
        self.generation_tokens = (
            Counter("vllm:generation_tokens", "Generated tokens", m, registry=r),
            Counter("inferno_gateway_generation_tokens", "Tokens generated for HTTP "
                    "requests", m, registry=r))
        self.prompt_tokens = (
            Counter("vllm:prompt_tokens", "Prompt tokens", m, registry=r),
            Counter("inferno_gateway_prompt_tokens", "Prompt tokens of HTTP requests", m,
                    registry=r))
        self.success = Counter("vllm:request_success", "Completed generations", m + [
            "finished_reason"], registry=r)
        self.waiting = (
            Gauge("vllm:num_requests_waiting", "Requests waiting in the daemon's queue", m,
                  registry=r),
            Gauge("inferno_requests_waiting", "Requests waiting in the daemon's queue (all "
                  "clients, not only this gateway's)", ["model"], registry=r))
        self.running = (
            Gauge("vllm:num_requests_running", "Requests running in the daemon", m,
                  registry=r),
            Gauge("inferno_requests_running", "Requests running in the daemon (all "
                  "clients)", ["model"], registry=r))
        self.http = Counter("inferno_gateway_http_requests", "HTTP answers by path and status",
                            ["path", "status"], registry=r)
        self.in_flight = Gauge("inferno_gateway_requests_in_flight", "HTTP requests being "
                               "answered", registry=r)
        self.daemon_up = Gauge("inferno_gateway_daemon_up", "1 when the daemon answered the "
                               "last scrape", registry=r)

    # -- per HTTP request -------------------------------------------------------------------
    async def first_token(self, model: str, t0: float,
                          texts: AsyncGenerator[str, None]) -> AsyncIterator[str]:
        """``texts`` unchanged (and closed with this); the first observes the time to
        first token."""
        first = True
        try:
            async for text in texts:
                if first:
                    first = False
                    ttft = time.monotonic() - t0
                    for h in self.ttft:
                        h.labels(model).observe(ttft)
                yield text
        finally:
            await texts.aclose()

    def finished(self, model: str, t0: float, stats: dict[str, Any] | None,
                 reason: str) -> None:
        """A completed generation: its latency and tokens."""
        e2e = time.monotonic() - t0
        for h in self.e2e:
            h.labels(model).observe(e2e)
        stats = stats or {}
        for c in self.generation_tokens:
            c.labels(model).inc(int(stats.get("completion_tokens") or 0))
        for c in self.prompt_tokens:
            c.labels(model).inc(int(stats.get("prompt_tokens") or 0))
        self.success.labels(model, reason).inc()

    def answered(self, path: str, status: int) -> None:
        self.http.labels(path, str(status)).inc()

    # -- scrape -----------------------------------------------------------------------------
    async def scrape(self, client: AsyncClient) -> bytes:
        """The text exposition, with the daemon's queue read now."""
        try:
            snapshot, status = await asyncio.gather(
                client.queue_list(), client.request("status", timeout=SCRAPE_TIMEOUT_S))
        except InfernoError:
            self.daemon_up.set(0)
            for g in (*self.waiting, *self.running):
                g.clear()  # unknown is absent, never a stale count
            return generate_latest(self.registry)
        self.daemon_up.set(1)
        counts: dict[str, list[int]] = {m.get("name"): [0, 0]
                                        for m in status.get("models_loaded") or []
                                        if isinstance(m.get("name"), str)}
        for row in snapshot.get("items") or []:
            c = counts.setdefault(row.get("model") or "", [0, 0])
            if row.get("state") in WAITING_STATES:
                c[0] += 1
            elif row.get("state") in RUNNING_STATES:
                c[1] += 1
        for g in (*self.waiting, *self.running):
            g.clear()
        for model, (waiting, running) in counts.items():
            for g in self.waiting:
                g.labels(model).set(waiting)
            for g in self.running:
                g.labels(model).set(running)
        return generate_latest(self.registry)

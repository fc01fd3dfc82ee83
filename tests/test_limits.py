"""Limits that keep one caller from costing everyone else: bounded input (stop strings,
finite numbers), bytes held per principal and in total, quotas, cheap monitor requests and
a job store that survives a full disk. Each test runs against a real daemon over ipc://.
"""

from __future__ import annotations

import time

import pytest
import zmq

from infernod.protocol import codec
from infernod.protocol.errors import InfernoError


def _raw(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 3000)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.connect(endpoint)
    return s


def _answer(sock: zmq.Socket, header: dict, body: dict, timeout_ms: int = 5000) -> dict:
    sock.send_multipart([codec.MAGIC, codec.packb(header), codec.packb(body)])
    assert sock.poll(timeout_ms), "no answer"
    reply = sock.recv_multipart()
    return {"kind": codec.unpackb(reply[1], max_bytes=4096, what="header")["type"],
            **codec.unpackb(reply[2], max_bytes=1 << 24)}


# -- input bounds -----------------------------------------------------------------------------
def test_job_stop_strings_and_infinite_times_are_refused(daemon):
    """jobs.submit bounds each stop string like generate does (1-256 chars), and the header's
    ts/deadline refuse inf: neither reaches a handler."""
    raw = _raw(daemon.endpoint)
    try:
        hdr = {"id": "1", "type": "ping", "session": "limits"}
        for field in ("ts", "deadline"):
            for value in (float("inf"), float("-inf")):
                r = _answer(raw, {**hdr, field: value}, {})
                assert r["kind"] == "error" and r["code"] == "bad_request", (field, r)
                assert f"header.{field}" in r["message"] and "finite" in r["message"], r
        assert _answer(raw, {**hdr, "ts": time.time()}, {})["kind"] == "reply"
        with daemon.client() as c:
            for stop in (["x" * 257], [""], ["ok", "y" * 100_000]):
                with pytest.raises(InfernoError) as ei:
                    c.request("jobs.submit", {"model": "gemma3-270m", "prompts": ["hi"],
                                              "stop": stop})
                assert ei.value.code == "bad_request", ei.value
                assert "jobs.submit.stop[" in ei.value.message, ei.value
            assert c.request("jobs.list", {})["jobs"] == []  # nothing was stored
            assert c.ping()["pong"]
    finally:
        raw.close(0)

"""What docs/protocol.md's "Checklist for client authors" states, proved with raw sockets
(pyzmq + msgpack, the way an outside client is written) against a real daemon."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import msgpack
import pytest
import zmq
from rawsock import raw_socket
from test_protocol_doc import DOC

from infernod.protocol.codec import MAGIC

MODEL = "gemma3-270m"


class Raw:
    """A client written from docs/protocol.md alone: a DEALER and a SUB, no library."""

    def __init__(self, endpoints: Any, session: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.session = session or secrets.token_hex(8)
        self.dealer = raw_socket(endpoints.control, ctx=self.ctx, timeout_ms=5000)
        self.sub = raw_socket(endpoints.events, zmq.SUB, ctx=self.ctx, timeout_ms=5000)
        self.events: list[tuple[dict, dict]] = []  # (header, body) in arrival order

    def close(self) -> None:
        if not self.ctx.closed:
            self.dealer.close(0)
            self.sub.close(0)
            self.ctx.term()

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, t.encode())

    def send(self, type_: str, body: dict | None = None, msg_id: str | None = None) -> str:
        msg_id = msg_id or secrets.token_hex(8)
        header = {"id": msg_id, "type": type_, "session": self.session, "ts": time.time()}
        self.dealer.send_multipart([MAGIC, msgpack.packb(header), msgpack.packb(body or {})])
        return msg_id

    def reply(self, msg_id: str, timeout: float = 10.0) -> tuple[dict, dict]:
        """The reply to ``msg_id``, reading events meanwhile (both sockets, bounded)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.pump(0.0)
            if self.dealer.poll(50):
                frames = self.dealer.recv_multipart()
                header = msgpack.unpackb(frames[1])
                if header["re"] == msg_id:
                    return header, msgpack.unpackb(frames[2])
        raise AssertionError(f"no reply to {msg_id} within {timeout}s")

    def call(self, type_: str, body: dict | None = None, timeout: float = 10.0) -> dict:
        header, reply = self.reply(self.send(type_, body), timeout)
        assert header["type"] == "reply", reply
        return reply

    def pump(self, timeout: float) -> None:
        if self.sub.poll(int(timeout * 1000)):
            while True:
                try:
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                self.events.append((msgpack.unpackb(frames[2]), msgpack.unpackb(frames[3])))

    def wait_event(self, pred: Any, timeout: float, what: str) -> tuple[dict, dict]:
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            for ev in self.events[seen:]:
                if pred(*ev):
                    return ev
            seen = len(self.events)
            self.pump(0.05)
        raise AssertionError(f"no {what} within {timeout}s")

    def welcome(self, timeout: float = 10.0) -> tuple[dict, dict]:
        """Subscribe to the welcome (last) and wait for it."""
        n = sum(1 for h, _ in self.events if h["type"] == "welcome")
        self.subscribe(f"welcome.{self.session}")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = [ev for ev in self.events if ev[0]["type"] == "welcome"]
            if len(got) > n:
                return got[-1]
            self.pump(0.05)
        raise AssertionError("no welcome")

    def stream(self, rid: str) -> list[tuple[dict, dict]]:
        return [ev for ev in self.events if ev[0]["topic"] == f"tokens.{rid}"]


@pytest.fixture
def raw(daemon):
    clients: list[Raw] = []

    def make(session: str | None = None) -> Raw:
        c = Raw(daemon.endpoints, session)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def test_the_checklist_is_in_the_doc():
    m = re.search(r"^## Checklist for client authors\n(.*?)(?=^## )", DOC, re.M | re.S)
    assert m, "docs/protocol.md has no '## Checklist for client authors' section"
    text = m.group(1)
    for must in ("empty delimiter", "SNDTIMEO", "`hello`", "`seq` is always 0", "`first_seq`",
                 "`start`", "overtake", "`cancelling`", "finish_reason", "`events_lost`",
                 "`daemon_restarted`"):
        assert must in text, must
    assert "Python library" in DOC


def test_an_empty_delimiter_frame_is_refused_by_name_and_names_the_request(daemon, raw):
    c = raw()
    header = {"id": "abc123", "type": "ping", "session": c.session}
    c.dealer.send_multipart([b"", MAGIC, msgpack.packb(header), msgpack.packb({})])
    h, body = c.reply("abc123", timeout=5)
    assert h["type"] == "error" and body["code"] == "bad_request"
    assert "empty delimiter" in body["message"] and "DEALER" in body["hint"]


def test_immediate_alone_blocks_a_send_sndtimeo_bounds_it(tmp_path):
    """Nothing listens: with IMMEDIATE a blocking send does not fail, it waits; only
    SNDTIMEO (or NOBLOCK) turns that into an error."""
    ctx = zmq.Context()
    s = raw_socket(ctx=ctx, timeout_ms=300)  # SNDTIMEO 300 ms
    try:
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.connect(f"ipc://{tmp_path}/nobody.sock")
        t0 = time.monotonic()
        with pytest.raises(zmq.Again):
            s.send_multipart([MAGIC, b"\x80", b"\x80"])
        assert time.monotonic() - t0 >= 0.25  # it blocked for the whole SNDTIMEO
    finally:
        s.close(0)
        ctx.term()


def test_no_hello_needed_and_the_welcome_is_seq_0_every_time(daemon, raw):
    c = raw()
    c.subscribe("heartbeat")
    h, body = c.welcome()
    assert h["seq"] == 0 and body["boot_id"] == h["boot_id"]
    assert c.call("ping")["pong"] is True  # no hello first
    time.sleep(1.1)  # the same welcome topic is answered at most once a second
    c.sub.setsockopt(zmq.UNSUBSCRIBE, f"welcome.{c.session}".encode())
    h2, _ = c.welcome()
    assert h2["seq"] == 0


@pytest.mark.model
def test_stream_events_around_the_reply_cancel_and_fetch(daemon, raw):
    """Events can come before the generate reply (buffer them by the predictable id) and
    after a 'cancelling' reply; stream.fetch's first_seq is the oldest seq held."""
    c = raw()
    c.subscribe(f"tokens.{c.session}.", "heartbeat")
    c.welcome()
    c.call("models.load", {"model": MODEL}, timeout=120)
    msg_id = secrets.token_hex(8)
    rid = f"{c.session}.{msg_id}"
    c.send("generate", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300,
                        "temperature": 0, "ignore_eos": True}, msg_id=msg_id)
    # Tokens of the predicted id arrive whether or not the reply was read: nothing orders
    # the two sockets, so a client keeps them (it knows the id before sending).
    first = c.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}", 10, "first event")
    assert first[0]["seq"] == 0
    c.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}" and eh["type"] == "token",
                 30, "a token before the reply was read")
    _, reply = c.reply(msg_id)
    assert reply["request_id"] == rid and reply["topic"] == f"tokens.{rid}"

    assert c.call("cancel", {"request_id": rid})["state"] == "cancelling"
    n_at_reply = len(c.stream(rid))
    end, _ = c.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}"
                          and eh["type"] in ("done", "error"), 30, "the stream's end")
    assert end["type"] == "done"
    assert len(c.stream(rid)) > n_at_reply  # at least the 'done' came after 'cancelling'
    assert c.stream(rid)[-1][1]["finish_reason"] == "cancelled"

    last = end["seq"]
    fetched = c.call("stream.fetch", {"request_id": rid, "from_seq": 2})
    assert fetched["first_seq"] == 0 and fetched["events"][0]["seq"] == 2
    assert fetched["events"][-1]["seq"] == last and fetched["finished"] is True


@pytest.mark.model
def test_error_events_carry_the_code_as_finish_reason(daemon, raw):
    c = raw()
    c.subscribe(f"tokens.{c.session}.", "heartbeat")
    c.welcome()
    c.call("models.load", {"model": MODEL}, timeout=120)
    rid = f"{c.session}." + c.send("generate", {"model": MODEL, "prompt": "Count:",
                                                "max_tokens": 4000, "ignore_eos": True,
                                                "timeout_s": 0.3})
    h, body = c.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}"
                           and eh["type"] in ("done", "error"), 30, "the stream's end")
    assert h["type"] == "error" and body["code"] == "timeout"
    assert body["stats"]["finish_reason"] == "timeout"


@pytest.mark.model
def test_a_reconnecting_client_keeps_its_session(daemon, raw):
    """New sockets, same session id, same principal: the stream is still ours to read,
    fetch and cancel."""
    a = raw()
    a.subscribe(f"tokens.{a.session}.", "heartbeat")
    a.welcome()
    a.call("models.load", {"model": MODEL}, timeout=120)
    msg_id = a.send("generate", {"model": MODEL, "prompt": "Once upon a time",
                                 "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
    rid = f"{a.session}.{msg_id}"
    a.reply(msg_id)
    a.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}" and eh["type"] == "token",
                 30, "a token")
    a.close()

    b = raw(session=a.session)
    b.subscribe(f"tokens.{rid}", "heartbeat")
    _, welcome = b.welcome()
    assert f"tokens.{rid}" in welcome["seqs"]  # its own live stream, with its next seq
    fetched = b.call("stream.fetch", {"request_id": rid})
    assert fetched["events"][0]["seq"] == 0 and not fetched["finished"]
    assert b.call("cancel", {"request_id": rid})["state"] in ("cancelling", "cancelled")
    b.wait_event(lambda eh, _: eh["topic"] == f"tokens.{rid}" and eh["type"] == "done",
                 30, "the cancelled stream's end")

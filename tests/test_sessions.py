"""Sessions cannot be hijacked by another uid (issue 12, item 7).

A session id is public (``queue.list`` shows it) and any client may write it in its headers.
Here a second, real uid (a forked child that setuid()s to 'nobody', as in test_security.py)
with the user role uses the victim's session id to (a) spend the victim's rate limit and (b)
get its own text into the victim's next ``generate``. Neither works: limits are kept per
principal and session, a stream never opens in another principal's session, message ids
are random, and the client drops every token event of a request id it did not send.
"""

from __future__ import annotations

import time

import pytest
import zmq
from test_security import NOBODY, _open_for_group, needs_root, run_as

from infernod.client import Client
from infernod.protocol import codec
from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"
ATTACK_PROMPT = "Repeat after me: the password is swordfish, the password is swordfish"


def _hostile_daemon(daemon_factory, **security):
    """A daemon whose socket 'nobody' can reach, with 'nobody' a user (a second user of a
    shared host with the right to generate)."""
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"users": [NOBODY], **security}})
    _open_for_group(d)
    return d


def _spend(endpoint: str, session: str, n: int) -> dict:
    """In the child: ``n`` pings under someone else's session id; count the answers."""
    out = {"ok": 0, "rate_limited": 0}
    with Client(endpoint, timeout=5) as c:
        c.session = session
        for _ in range(n):
            try:
                c.ping()
                out["ok"] += 1
            except InfernoError as e:
                out[e.code] = out.get(e.code, 0) + 1
    return out


@needs_root
def test_another_uid_cannot_rate_limit_my_session(daemon_factory):
    d = _hostile_daemon(daemon_factory, rate_limit_per_s=1.0, rate_limit_burst=20)
    with d.client(timeout=5) as victim:
        victim.ping()
        spent = run_as(NOBODY, NOBODY, lambda: _spend(d.endpoint, victim.session, 60))
        # The attacker ran into the per-session limit: its own bucket for that session id.
        assert spent["rate_limited"] >= 30 and spent["ok"] <= 25, spent
        # The victim's allowance is untouched (it used to be drained: rate_limited here).
        for _ in range(10):
            assert victim.ping()["pong"]


def _raw(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    for opt, value in ((zmq.LINGER, 0), (zmq.SNDTIMEO, 5000), (zmq.RCVTIMEO, 10000)):
        s.setsockopt(opt, value)
    s.connect(endpoint)
    return s


def _call(s: zmq.Socket, header: dict, body: dict) -> tuple[dict, dict]:
    s.send_multipart(codec.encode_request(header, body))
    while True:
        frames = s.recv_multipart()  # RCVTIMEO: zmq.Again rather than a hang
        h = codec.unpackb(frames[1], max_bytes=4096)
        if h.get("re") == header["id"]:
            return h, codec.unpackb(frames[2], max_bytes=1 << 24)


def _inject(endpoint: str, session: str, ids: list[str]) -> dict:
    """In the child: start a short generation under the victim's session for each guessed
    message id and wait until they have all finished (their streams stay kept)."""
    s = _raw(endpoint)
    started, refused = [], {}
    try:
        for mid in ids:
            h, body = _call(s, {"id": mid, "type": "generate", "session": session},
                            {"model": MODEL, "prompt": ATTACK_PROMPT, "max_tokens": 8,
                             "temperature": 0.0})
            if h["type"] == "reply":
                started.append(body["request_id"])
            else:
                refused[mid] = body["code"]
        texts = []
        for n, rid in enumerate(started):
            end = time.monotonic() + 60
            while True:
                h, f = _call(s, {"id": f"fetch{n}x{time.monotonic_ns()}", "type": "stream.fetch",
                                 "session": session}, {"request_id": rid})
                if h["type"] == "reply" and f["finished"]:
                    texts.append("".join(e["body"].get("text", "") for e in f["events"]))
                    break
                assert time.monotonic() < end, f"{rid} never finished"
                time.sleep(0.05)
        return {"started": started, "refused": refused, "texts": texts}
    finally:
        s.close(0)


@needs_root
@pytest.mark.model
def test_another_uid_cannot_put_text_into_my_generate(daemon_factory, monkeypatch):
    d = _hostile_daemon(daemon_factory)
    with d.client(timeout=30) as victim:
        victim.load(MODEL)
        victim.wait_welcome()
        # The attacker guesses the victim's next message ids (a counter used to make them:
        # "1", "2", ...; "predicted" stands for any id it could guess) and tries to finish a
        # stream under each in the victim's session before the victim asks.
        guesses = [str(n) for n in range(1, 31)] + ["predicted"]
        out = run_as(NOBODY, NOBODY, lambda: _inject(d.endpoint, victim.session, guesses),
                     timeout=300)
        # No stream opens in a session that belongs to someone else (the daemon's own
        # uid, an operator, included): it used to open, and the victim's client kept its
        # events for the id it had not used yet.
        assert not out["started"] and set(out["refused"].values()) == {"forbidden"}, out
        victim.listen(0.5)
        real_new_id, predicted = victim.core.new_id, iter(["predicted"])
        for n in range(3):
            if n == 1:  # the id the attacker predicted goes to the victim's second generate
                monkeypatch.setattr(victim.core, "new_id",
                                    lambda: next(predicted, None) or real_new_id())
            s = victim.generate(MODEL, "The capital of France is", max_tokens=8,
                                temperature=0.0)
            assert n != 1 or s.request_id == f"{victim.session}.predicted"
            text = "".join(s)
            own = victim.request("stream.fetch", {"request_id": s.request_id})
            # What the victim got is what the daemon generated for the victim's own request.
            assert text == "".join(e["body"].get("text", "") for e in own["events"])
            assert "swordfish" not in text and s.stats["prompt_tokens"] < 15, (text, s.stats)
        assert not victim.followed_streams & set(f"{victim.session}.{g}" for g in guesses[:30])
        assert victim.ping()["pong"]


def test_a_client_drops_token_events_of_requests_it_did_not_send():
    """Without a daemon: events of a request id the client never sent are not kept, those
    of a stream it is about to start are (they may come before the reply)."""
    from infernod.client.core import ClientCore, Event

    c = ClientCore()
    foreign = f"{c.session}.1"
    c.on_event(Event(f"tokens.{foreign}", "token", 0, "b", {"text": "pwned"}))
    assert foreign not in c.followed and not c.take_events()
    mine = c.expect_stream(c.new_id())
    c.on_event(Event(f"tokens.{mine}", "token", 0, "b", {"text": "ok"}))
    assert [ev.body["text"] for ev in c.stream_events(mine)] == ["ok"]
    ids = {c.new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 for i in ids)

"""API keys for HTTP users: stored as hashes, checked by the daemon, each key a principal.

The gateway forwards an HTTP caller's key in the request header (``api_key``); these tests
send it the same way, with the client library's ``api_key`` context, over a real daemon.
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from test_security import NOBODY, _open_for_group, needs_root, run_as

from infernod import apikeys, keys
from infernod.cli import app as cli
from infernod.client import Client, api_key
from infernod.daemon.auth import Security
from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"


def _code(fn) -> str:
    try:
        fn()
    except InfernoError as e:
        return e.code
    return "ok"


def test_key_file_is_0600_holds_no_key_and_revocation_is_immediate(tmp_path, capsys):
    kdir = tmp_path / "keys"
    old = os.umask(0o022)
    try:
        assert cli.main(["keys", "--state-dir", str(tmp_path), "add", "alice", "--role",
                         "user", "--http"]) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr()
    key = out.out.strip()  # the key alone on stdout, shown this once
    assert key.startswith(apikeys.PREFIX) and len(key) == len(apikeys.PREFIX) + 43, key
    assert "only time" in out.err
    path = kdir / apikeys.API_KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text and key[len(apikeys.PREFIX):] not in text
    [entry] = json.loads(text)["keys"]
    assert entry["sha256"] == apikeys.digest(key) and entry["role"] == "user"

    store = apikeys.ApiKeyStore(path)
    found = store.verify(key)
    assert found is not None and found.name == "alice"
    assert store.verify(key + "x") is None and store.verify("") is None

    assert cli.main(["keys", "--state-dir", str(tmp_path), "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "http" in listed and key not in listed

    # one name is either an HTTP key or a CURVE key: key:NAME must mean one principal
    keys.init_server(kdir)
    with pytest.raises(keys.KeyStoreError):
        apikeys.add(kdir, "alice", "user")  # exists (no --force)
    assert cli.main(["keys", "--state-dir", str(tmp_path), "add", "alice", "--role", "user",
                     "--out", str(tmp_path / "out")]) == 1
    assert "already names an API key" in capsys.readouterr().err
    keys.add_client(kdir, "bob", "user", tmp_path / "out")
    with pytest.raises(keys.KeyStoreError, match="CURVE"):
        apikeys.add(kdir, "bob", "user")

    # the same store instance sees the revoke at the next lookup (no cache to wait out)
    assert cli.main(["keys", "--state-dir", str(tmp_path), "revoke", "alice"]) == 0
    assert store.verify(key) is None


def test_authenticate_rules(tmp_path):
    kdir = tmp_path / "keys"
    sec = Security(lambda: None, kdir)  # type: ignore[arg-type,return-value]
    # no keys configured: a keyless HTTP caller acts as the connection
    assert sec.authenticate("", "uid:1000", "user") == ("uid:1000", "user")
    mon, _ = apikeys.add(kdir, "mon", "monitor")
    op, _ = apikeys.add(kdir, "op", "operator")
    assert sec.authenticate(mon, "uid:1000", "operator") == ("key:mon", "monitor")  # never more
    assert sec.authenticate(op, "uid:1000", "user") == ("key:op", "operator")
    assert sec.authenticate(op, "uid:1000", "none") == ("uid:1000", "none")  # no role, no key
    for bad in ("", "sk-inferno-nope", op[:-1]):
        with pytest.raises(InfernoError) as ei:
            sec.authenticate(bad, "uid:1000", "operator")
        assert ei.value.code == "unauthenticated", bad
    # a corrupt file keeps no key valid (fail closed), keyless callers included
    (kdir / apikeys.API_KEYS_FILE).write_text("{not json")
    for k in (op, ""):
        with pytest.raises(InfernoError):
            sec.authenticate(k, "uid:1000", "operator")


@pytest.mark.model
def test_keys_are_principals_with_their_roles_and_revocation_is_next_request(daemon_factory):
    d = daemon_factory({"models": {"slots": 2}})
    kdir = d.state / "keys"
    with d.client(timeout=30) as c:
        with api_key(""):
            assert c.hello()["api_keys"] == 0  # none yet: a keyless HTTP caller is allowed
        mon, _ = apikeys.add(kdir, "mon", "monitor")
        user, _ = apikeys.add(kdir, "alice", "user")
        op, _ = apikeys.add(kdir, "ops", "operator")
        assert c.hello()["api_keys"] == 3 and c.hello()["role"] == "operator"  # no key: uid
        with api_key(""):
            assert _code(c.ping) == "unauthenticated"
        with api_key("sk-inferno-" + "x" * 43):
            assert _code(c.ping) == "unauthenticated"
        with api_key(mon):
            h = c.hello()
            assert (h["role"], h["principal"]) == ("monitor", "key:mon")
            assert _code(lambda: c.request("generate", {"model": MODEL, "prompt": "hi",
                                                        "max_tokens": 1})) == "forbidden"
        with api_key(user):
            assert c.hello()["principal"] == "key:alice"
            assert _code(lambda: c.load(MODEL)) == "forbidden"
        with api_key(op):
            c.load(MODEL)  # an operator key may load
        with api_key(user):
            stream = c.generate(MODEL, "Once upon a time", max_tokens=8)
        text = "".join(stream)  # the connection follows the key's stream
        assert text and stream.stats is not None
        # revocation applies to the very next request
        assert apikeys.revoke(kdir, "alice") is not None
        with api_key(user):
            assert _code(c.ping) == "unauthenticated"
        with api_key(op):
            assert c.ping()["pong"]
        assert "sk-inferno-" not in d.log()  # a key is never logged


@pytest.mark.model
def test_two_keys_cannot_touch_each_others_work_and_quotas_are_per_key(daemon_factory):
    d = daemon_factory({"models": {"slots": 1},
                        "scheduler": {"max_queued_per_principal": 1}})
    kdir = d.state / "keys"
    alice, _ = apikeys.add(kdir, "alice", "user")
    bob, _ = apikeys.add(kdir, "bob", "user")
    gen = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    with d.client(timeout=30) as c:
        c.load(MODEL)
        with api_key(alice):
            long = c.generate(MODEL, "Once upon a time", max_tokens=900, ignore_eos=True)
        next(iter(long))  # the only slot is busy
        rid = long.request_id
        with api_key(bob):
            assert _code(lambda: c.cancel(rid)) == "forbidden"
            assert _code(lambda: c.request("stream.fetch", {"request_id": rid})) \
                == "unknown_request"
        with api_key(alice):
            assert c.request("stream.fetch", {"request_id": rid})["events"]
        # quotas: one queued request per principal, and each key is one
        with api_key(alice):
            c.request("generate", gen)
            with pytest.raises(InfernoError) as ei:
                c.request("generate", gen)
            assert ei.value.code == "quota_exceeded", ei.value
        with api_key(bob):
            assert "." in c.request("generate", gen)["request_id"]  # bob's own room
            job = c.jobs_submit(MODEL, ["a"], priority="low")
            assert job["owner"] == "key:bob"
        with api_key(alice):
            assert _code(lambda: c.jobs_get(job["job_id"])) == "forbidden"
            assert _code(lambda: c.jobs_cancel(job["job_id"])) == "forbidden"
            assert c.jobs_list() == []
            assert c.cancel(rid)["state"] in ("cancelling", "cancelled")
        with api_key(bob):
            assert c.jobs_cancel(job["job_id"])["job_id"] == job["job_id"]
        list(long)
        time.sleep(0.2)
        assert c.ping()["pong"]


def _gateway_as_user(endpoint: str, alice: str, bob: str) -> dict:
    """In the child, a user-role uid: a gateway serving two HTTP users over one connection."""
    out: dict = {}
    with Client(endpoint, timeout=30) as c:
        out["role"] = c.hello()["role"]
        with api_key(alice):
            s = c.generate(MODEL, "Once upon a time", max_tokens=6)
        out["text"] = "".join(s)  # tokens arrive by the connection's own subscription
        with api_key(alice):
            s = c.generate(MODEL, "Once upon a time", max_tokens=900, ignore_eos=True)
        next(iter(s))
        out["fetch"] = len(c.request("stream.fetch", {"request_id": s.request_id})["events"])
        with api_key(bob):
            out["bob_cancel"] = _code(lambda: c.cancel(s.request_id))
        out["cancel"] = c.cancel(s.request_id)["state"]  # the gateway's client went away
        list(s)
    return out


@needs_root
@pytest.mark.model
def test_a_user_role_gateway_follows_and_cancels_what_it_sent_for_keys(daemon_factory):
    d = daemon_factory({"models": {"slots": 2}, "daemon": {"socket_group": "nogroup"},
                        "security": {"users": [NOBODY], "default_role": "none"}})
    _open_for_group(d)
    kdir = d.state / "keys"
    alice, _ = apikeys.add(kdir, "alice", "user")
    bob, _ = apikeys.add(kdir, "bob", "user")
    with d.client(timeout=30) as c:
        c.load(MODEL)
    out = run_as(NOBODY, NOBODY, lambda: _gateway_as_user(d.endpoint, alice, bob), timeout=90)
    assert out["role"] == "user" and out["text"], out
    assert out["fetch"] > 0 and out["bob_cancel"] == "forbidden", out
    assert out["cancel"] in ("cancelling", "cancelled"), out

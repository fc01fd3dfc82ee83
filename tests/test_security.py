"""Access roles: local uids over ipc (ZAP + SO_PEERCRED), CURVE keys over tcp, key files.

Other uids are real: the test forks, drops to uid 65534 ('nobody') or 65533 with setuid and
talks to the daemon from there (the interpreter under /root is not reachable by another uid,
so a fork of the running one is used instead of a new process).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import stat
import time
import traceback
from pathlib import Path

import pytest
import zmq
from rawsock import answered, raw_socket

from infernod import keys
from infernod.cli import app as cli
from infernod.client import Client, CurveKeys
from infernod.config import SecurityConfig
from infernod.daemon.auth import RolePolicy, Security, parse_ipc_peer
from infernod.protocol import codec
from infernod.protocol.errors import DaemonUnavailable, InfernoError

NOBODY = 65534
STRANGER = 65533  # no passwd entry needed: the kernel reports whatever uid we set

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to setuid to other uids")


# -- pure parts -----------------------------------------------------------------------------
def test_parse_ipc_peer_reads_libzmq_address():
    assert parse_ipc_peer("localhost:65534:65534:18039") == 65534
    assert parse_ipc_peer(":1000:1000:1") == 1000
    assert parse_ipc_peer("127.0.0.1") is None
    assert parse_ipc_peer("localhost:x:1:2") is None


def test_role_policy_maps_uids_and_names():
    sec = SecurityConfig(operators=[1000, "nobody"], monitors=[2000], default_role="none")
    p = RolePolicy(sec, daemon_uid=4242)
    assert p.role_for_uid(4242) == "operator"  # the daemon's own uid, always
    assert p.role_for_uid(1000) == "operator"
    assert p.role_for_uid(NOBODY) == "operator"  # by user name
    assert p.role_for_uid(2000) == "monitor"
    assert p.role_for_uid(3000) == "none"
    sec = SecurityConfig(default_role="monitor")
    assert RolePolicy(sec, daemon_uid=0).role_for_uid(3000) == "monitor"


def test_zap_decisions(tmp_path):
    sec = SecurityConfig(monitors=[2000], default_role="none")
    s = Security(lambda: sec, tmp_path / "keys")
    assert s.decide("ipc", "localhost:2000:2000:7", "NULL", []) == ("200", "OK", "uid:2000")
    assert s.decide("ipc", "localhost:3000:3000:7", "NULL", [])[0] == "400"
    assert s.decide("ipc", "localhost", "NULL", [])[0] == "400"  # no credentials: refuse
    assert s.decide("tcp", "10.0.0.1", "NULL", [])[0] == "400"  # tcp without CURVE
    keys.init_server(tmp_path / "keys")
    keys.add_client(tmp_path / "keys", "alice", "monitor", tmp_path / "out")
    pub = zmq.utils.z85.decode(keys.read_cert(tmp_path / "out" / "alice.key").public)
    assert s.decide("tcp", "10.0.0.1", "CURVE", [pub]) == ("200", "OK", "key:alice")
    assert s.decide("tcp", "10.0.0.1", "CURVE", [b"\0" * 32])[0] == "400"
    keys.revoke(tmp_path / "keys", "alice")
    assert s.decide("tcp", "10.0.0.1", "CURVE", [pub])[0] == "400"  # re-read by mtime


def test_secret_key_files_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        kdir = tmp_path / "keys"
        _, secret = keys.init_server(kdir)
        paths = keys.add_client(kdir, "bob", "operator", tmp_path / "bob")
    finally:
        os.umask(old)
    for p in (secret, paths["client_secret"]):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((tmp_path / "bob").stat().st_mode) == 0o700
    # The files are ZeroMQ certificates: pyzmq and our client read them.
    c = CurveKeys.from_files(str(paths["server_public"]), str(paths["client_secret"]))
    assert len(c.server_public) == 40 and c.client_secret
    assert keys.list_clients(kdir) == [{"name": "bob", "role": "operator",
                                        "public_key": c.client_public.decode()}]
    with pytest.raises(keys.KeyStoreError):
        keys.add_client(kdir, "../evil", "operator", tmp_path / "x")
    with pytest.raises(keys.KeyStoreError):
        keys.init_server(kdir)  # never silently replaced


# -- other uids over ipc --------------------------------------------------------------------
def run_as(uid: int, gid: int, fn, timeout: float = 30.0):
    """Run fn() in a forked child with the given uid/gid; return what it returns (JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = {"ok": fn()}
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            out = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        os.write(w, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    end = time.monotonic() + timeout
    try:
        while True:  # bounded: a child stuck in a blocking call fails the test, never hangs it
            left = end - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"uid {uid}: {fn} still running after {timeout}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"{}")
    assert "error" not in out, out.get("tb")
    return out["ok"]


def _open_for_group(daemon) -> None:
    os.chmod(daemon.base, 0o711)  # mkdtemp made it 0700; the socket dir itself is 0750


def _attempts(endpoint: str, requests: list[tuple[str, dict]]) -> dict:
    """In the child: hello, then each request; record the role or the error code."""
    out: dict = {"uid": os.getuid()}
    try:
        with Client(endpoint, timeout=5) as c:
            out["hello"] = c.hello()["role"]
            for type_, body in requests:
                try:
                    c.request(type_, body)
                    out[type_] = "ok"
                except InfernoError as e:
                    out[type_] = e.code
                    out[type_ + ".message"] = e.message
    except DaemonUnavailable as e:
        out["unavailable"] = e.message
    return out


def _cancel_in_session(endpoint: str, session: str, request_id: str) -> str:
    """In the child: cancel ``request_id`` with another client's session id in the header."""
    with Client(endpoint, timeout=5) as c:
        c.session = session
        try:
            return c.cancel(request_id)["state"]
        except InfernoError as e:
            return e.code


def _raw_ping_gets_answer(endpoint: str) -> bool:
    ctx = zmq.Context()
    s = raw_socket(endpoint, ctx=ctx)
    got = answered(s, codec.encode_request({"id": "1", "type": "ping", "session": "raw"}, {}))
    s.close(0)
    ctx.term()
    return got


@needs_root
@pytest.mark.model
def test_ipc_uid_roles(daemon_factory):
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"monitors": [NOBODY], "default_role": "none"}})
    _open_for_group(d)
    with d.client() as root:
        assert root.hello()["role"] == "operator"  # the daemon's own uid
        root.load("gemma3-270m")
        stream = root.generate("gemma3-270m", "Once upon a time", max_tokens=2000)
        next(iter(stream))
        reqs = [("ping", {}), ("status", {}), ("models.list", {}),
                ("models.load", {"model": "gemma3-270m"}),
                ("models.unload", {"model": "gemma3-270m"}),
                ("generate", {"model": "gemma3-270m", "prompt": "hi", "max_tokens": 1}),
                ("cancel", {"request_id": stream.request_id})]
        mon = run_as(NOBODY, NOBODY, lambda: _attempts(d.endpoint, reqs))
        assert mon["uid"] == NOBODY and mon["hello"] == "monitor", mon
        assert mon["ping"] == mon["status"] == mon["models.list"] == "ok"
        for t in ("models.load", "models.unload"):
            assert mon[t] == "forbidden" and "operator" in mon[t + ".message"], mon
        # generating needs the user role (between monitor and operator)
        assert mon["generate"] == "forbidden" and "user" in mon["generate.message"], mon
        assert mon["cancel"] == "forbidden"  # someone else's request
        # ... even in the owner's session: session ids are public (queue.list), uids are not
        assert run_as(NOBODY, NOBODY, lambda: _cancel_in_session(
            d.endpoint, root.session, stream.request_id)) == "forbidden"
        assert root.status()["queue"]["running"] == 1  # still running, model still loaded
        assert root.cancel(stream.request_id)["state"] in ("cancelling", "cancelled")
        list(stream)
        # A uid with no role gets nothing through: the handshake itself is refused.
        assert run_as(STRANGER, NOBODY, lambda: _raw_ping_gets_answer(d.endpoint)) is False
        out = run_as(STRANGER, NOBODY, lambda: _attempts(d.endpoint, [("ping", {})]))
        assert "unavailable" in out and "hello" not in out, out
        assert run_as(NOBODY, NOBODY, lambda: _raw_ping_gets_answer(d.endpoint)) is True
        assert "refused ipc connection" in d.log() and f":{STRANGER}:" in d.log()
        assert root.ping()["pong"]


@contextlib.contextmanager
def _impostor(directory: Path, uid: int = NOBODY):
    """Another local user's fake daemon at ``directory`` (ROUTER + XPUB, sockets 0777, the
    directory 0755): yields a dict filled at exit with what it received."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(ready_r)
            os.close(stop_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.umask(0)
            directory.mkdir(mode=0o755)
            ctx = zmq.Context()
            router = raw_socket(None, zmq.ROUTER, ctx=ctx, timeout_ms=1000)
            pub = raw_socket(None, zmq.XPUB, ctx=ctx, timeout_ms=1000)
            router.bind(f"ipc://{directory}/control.sock")
            pub.bind(f"ipc://{directory}/events.sock")
            os.write(ready_w, b"ready\n")
            got: list[bytes] = []
            end = time.monotonic() + 60
            while time.monotonic() < end and not select.select([stop_r], [], [], 0)[0]:
                if router.poll(50):
                    got.append(b"".join(router.recv_multipart()))
            out = {"messages": len(got), "secret": any(b"my secret" in m for m in got)}
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(ready_w, json.dumps(out).encode())
        os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    seen: dict = {}
    try:
        assert select.select([ready_r], [], [], 10)[0], "the impostor did not start"
        assert os.read(ready_r, 6) == b"ready\n"
        yield seen
    finally:
        os.close(stop_w)
        if select.select([ready_r], [], [], 10)[0]:
            seen.update(json.loads(os.read(ready_r, 65536) or b"{}"))
        else:
            os.kill(pid, signal.SIGKILL)
        os.close(ready_r)
        os.waitpid(pid, 0)
    assert "error" not in seen, seen


def _send_secret(daemon_user: str | None = None) -> dict:
    """In the child: a client with no XDG_RUNTIME_DIR (so /tmp/inferno-$UID) sends a prompt."""
    for key in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY", "INFERNO_ENDPOINT", "INFERNO_DAEMON_USER"):
        os.environ.pop(key, None)
    if daemon_user is not None:
        os.environ["INFERNO_DAEMON_USER"] = daemon_user
    try:
        with Client(None, timeout=2) as c:
            c.request("generate", {"model": "m", "prompt": "my secret prompt"}, timeout=2)
    except InfernoError as e:
        return {"code": e.code, "message": e.message, "hint": e.hint}
    return {"code": None}


@needs_root
def test_client_refuses_a_socket_another_user_made_in_shared_tmp():
    # Without XDG_RUNTIME_DIR the socket is /tmp/inferno-$UID: whoever makes it first gets
    # every prompt. The client checks who owns the socket and its directory before sending.
    directory = Path(f"/tmp/inferno-{STRANGER}")
    shutil.rmtree(directory, ignore_errors=True)
    try:
        with _impostor(directory) as seen:
            out = run_as(STRANGER, STRANGER, _send_secret)
        assert seen == {"messages": 0, "secret": False}, seen
        assert out["code"] == "unavailable", out
        assert "belongs to uid 65534 (nobody)" in out["message"], out
        assert "XDG_RUNTIME_DIR" in out["hint"] and "INFERNO_DAEMON_USER" in out["hint"], out
        # The same socket is believed once its owner is named as the daemon's user: the check
        # above, not a broken socket, is what kept the prompt from it.
        shutil.rmtree(directory)
        with _impostor(directory) as seen:
            run_as(STRANGER, STRANGER, lambda: _send_secret(daemon_user="nobody"))
        assert seen["secret"], seen
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@needs_root
def test_daemon_refuses_a_runtime_dir_another_user_made(daemon_factory):
    d = daemon_factory(start=False)
    d.runtime.mkdir(parents=True)
    os.chown(d.runtime, NOBODY, NOBODY)
    d.start(wait=False)
    assert d.proc.wait(30) == 2, d.log()
    assert f"runtime directory {d.runtime} belongs to uid {NOBODY}" in d.log(), d.log()


@needs_root
def test_default_role_applies_and_sighup_changes_it(daemon_factory):
    d = daemon_factory({"daemon": {"socket_group": "nogroup"},
                        "security": {"default_role": "monitor"}})
    _open_for_group(d)
    out = run_as(STRANGER, NOBODY, lambda: _attempts(d.endpoint, [("models.unload",
                                                                    {"model": "x"})]))
    assert out["hello"] == "monitor" and out["models.unload"] == "forbidden", out
    # Promote the uid and reload: the role is evaluated per request, not per connection.
    text = d.config_path.read_text().replace('default_role = "monitor"',
                                             f"operators = [ {STRANGER}, ]\n"
                                             'default_role = "monitor"')
    d.config_path.write_text(text)
    os.kill(d.pid, 1)
    time.sleep(1.0)
    out = run_as(STRANGER, NOBODY, lambda: _attempts(d.endpoint, [("models.unload",
                                                                    {"model": "x"})]))
    assert out["hello"] == "operator" and out["models.unload"] == "model_not_loaded", out


# -- CURVE over tcp -------------------------------------------------------------------------
def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def test_tcp_without_curve_keys_refuses_to_start(daemon_factory):
    port = _free_port_pair()
    d = daemon_factory({"security": {"tcp_endpoint": f"tcp://127.0.0.1:{port}"}}, start=False)
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "no CURVE server key" in d.log() and "inferno keys init" in d.log()
    with socket.socket() as s:  # nothing listens in plaintext either
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _keys(state: Path, *argv: str) -> int:
    return cli.main(["keys", "--state-dir", str(state), *argv])


def _raw_curve_answer(endpoint: str, server_public: bytes, pub: bytes, sec: bytes) -> bool:
    s = raw_socket(endpoint, curve=(server_public, pub, sec))
    got = answered(s, codec.encode_request({"id": "1", "type": "ping", "session": "raw"}, {}))
    s.close(0)
    return got


def test_tcp_curve_keys_roles_and_revocation(daemon_factory, tmp_path, monkeypatch, capsys):
    port = _free_port_pair()
    ep = f"tcp://127.0.0.1:{port}"
    d = daemon_factory({"security": {"tcp_endpoint": ep}}, start=False)
    assert _keys(d.state, "init") == 0
    assert _keys(d.state, "add", "alice", "--role", "monitor", "--out", str(tmp_path / "a")) == 0
    assert _keys(d.state, "add", "bob", "--role", "operator", "--out", str(tmp_path / "b")) == 0
    d.start()
    alice = CurveKeys.from_files(str(tmp_path / "a/server.key"),
                                 str(tmp_path / "a/alice.key_secret"))
    bob = CurveKeys.from_files(str(tmp_path / "b/server.key"), str(tmp_path / "b/bob.key_secret"))
    with Client(ep, curve=bob, timeout=5) as c:
        assert c.hello()["role"] == "operator"
        with pytest.raises(InfernoError) as e:
            c.unload("gemma3-270m")
        assert e.value.code == "model_not_loaded"  # allowed, just nothing to unload
    a = Client(ep, curve=alice, timeout=5)
    assert a.hello()["role"] == "monitor"
    with pytest.raises(InfernoError) as e:
        a.load("gemma3-270m")
    assert e.value.code == "forbidden" and "operator" in e.value.message
    a.wait_welcome()  # the events socket (port+1) accepts the key too

    # Unknown client key, and a right client key with the wrong server key: nothing through.
    pub, sec = zmq.curve_keypair()
    assert not _raw_curve_answer(ep, alice.server_public, pub, sec)
    wrong_server, _ = zmq.curve_keypair()
    assert not _raw_curve_answer(ep, wrong_server, alice.client_public, alice.client_secret)
    assert _raw_curve_answer(ep, alice.server_public, alice.client_public, alice.client_secret)

    # The CLI end to end, with flags and with ~/.config/inferno/client.toml.
    capsys.readouterr()
    assert cli.main(["--endpoint", ep, "--server-key", str(tmp_path / "a/server.key"),
                     "--client-key", str(tmp_path / "a/alice.key_secret"), "status",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == d.pid
    conf = tmp_path / "client.toml"
    conf.write_text(f'endpoint = "{ep}"\nserver_key = "a/server.key"\n'
                    'client_key = "a/alice.key_secret"\n')
    monkeypatch.setenv("INFERNO_CLIENT_CONFIG", str(conf))
    monkeypatch.delenv("INFERNO_ENDPOINT", raising=False)
    assert cli.main(["load", "gemma3-270m"]) == 1  # reached the daemon, as monitor
    assert "forbidden" in capsys.readouterr().err
    assert cli.main(["keys", "--state-dir", str(d.state), "list", "--json"]) == 0
    assert {r["name"]: r["role"] for r in json.loads(capsys.readouterr().out)} == \
        {"alice": "monitor", "bob": "operator"}

    # Revocation: new handshakes refused, and the open connection's requests too.
    assert _keys(d.state, "revoke", "alice") == 0
    assert not _raw_curve_answer(ep, alice.server_public, alice.client_public,
                                 alice.client_secret)
    with pytest.raises(InfernoError) as e:
        a.ping()
    assert e.value.code == "forbidden"
    a.close()
    assert cli.main(["load", "gemma3-270m"]) == 3  # the CLI cannot get in any more
    with Client(ep, curve=bob, timeout=5) as c:
        assert c.ping()["pong"]


def test_replaced_key_loses_its_open_connection(daemon_factory, tmp_path):
    # 'keys add --force NAME' gives NAME a new key pair: a connection made with the old one
    # (a laptop that was stolen, a leaked file) must stop working at once, not keep the name.
    port = _free_port_pair()
    ep = f"tcp://127.0.0.1:{port}"
    d = daemon_factory({"security": {"tcp_endpoint": ep}}, start=False)
    assert _keys(d.state, "init") == 0
    assert _keys(d.state, "add", "carol", "--role", "operator", "--out", str(tmp_path / "old")) == 0
    d.start()
    old_keys = CurveKeys.from_files(str(tmp_path / "old/server.key"),
                                    str(tmp_path / "old/carol.key_secret"))
    with Client(ep, curve=old_keys, timeout=5) as old:
        assert old.hello()["role"] == "operator"
        assert _keys(d.state, "add", "carol", "--role", "operator", "--out",
                     str(tmp_path / "new"), "--force") == 0
        with pytest.raises(InfernoError) as e:
            old.ping()
        assert e.value.code == "forbidden"
        with pytest.raises(InfernoError) as e:
            old.unload("gemma3-270m")
        assert e.value.code == "forbidden"
    assert not _raw_curve_answer(ep, old_keys.server_public, old_keys.client_public,
                                 old_keys.client_secret)
    new_keys = CurveKeys.from_files(str(tmp_path / "new/server.key"),
                                    str(tmp_path / "new/carol.key_secret"))
    with Client(ep, curve=new_keys, timeout=5) as new:
        assert new.hello()["role"] == "operator" and new.ping()["pong"]


def test_allow_list_sees_an_in_place_edit_whatever_the_directory_mtime(tmp_path):
    kdir = tmp_path / "keys"
    keys.init_server(kdir)
    keys.add_client(kdir, "dave", "operator", tmp_path / "out")
    allow = keys.AllowList(kdir / "clients")
    pub = zmq.utils.z85.decode(keys.read_cert(tmp_path / "out" / "dave.key").public)
    assert allow.lookup(pub).role == "operator"
    clients = kdir / "clients"
    before = clients.stat()
    path = clients / "dave.key"
    with open(path, "r+") as f:  # an editor writing in place: the directory does not change
        text = f.read().replace('role = "operator"', 'role = "monitor" ')
        f.seek(0)
        f.write(text)
    os.utime(clients, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert clients.stat().st_mtime_ns == before.st_mtime_ns
    deadline = time.monotonic() + getattr(keys.AllowList, "RECHECK_S", 1.0) + 1
    while allow.lookup(pub).role != "monitor" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert allow.lookup(pub).role == "monitor"
    assert allow.by_name("dave").role == "monitor"

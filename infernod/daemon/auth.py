"""Who is at the other end of a connection, and which role that gives them.

Every handshake on the daemon's sockets goes through ZAP (ZeroMQ RFC 27): libzmq sends a
request to the socket bound at ``inproc://zeromq.zap.01`` and completes the connection only
if that answers 200. Our handler is one ROUTER socket owned by the event loop.

* ``ipc://`` (NULL mechanism, domain ``ipc``): libzmq reads ``SO_PEERCRED`` of the accepted
  Unix socket and puts ``localhost:UID:GID:PID`` in the request's address frame. The kernel
  fills those in, so the peer cannot lie about them. The uid maps to a role from
  ``[security]``; role ``none`` is refused.
* ``tcp://`` (CURVE, domain ``tcp``): the request carries the client's public key, looked up
  in the allow-list directory (``keys.AllowList``); unknown keys are refused.

An accepted connection gets a ZAP user id (``uid:1000`` or ``key:alice``) that libzmq
attaches to every message as ``User-Id`` metadata. The dispatcher maps it to a role *per
request* (``Security.role_of``), so a SIGHUP'd role list or a revoked key applies to
connections that are already open, not only to new ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85

from infernod.apikeys import API_KEYS_FILE, ApiKeyStore
from infernod.keys import AllowList, KeyStoreError, load_server
from infernod.paths import Endpoints
from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.config import SecurityConfig

log = logging.getLogger("infernod.daemon.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
KEY_PROPERTY = "X-Key"  # ZAP metadata libzmq attaches to every message of a CURVE connection
ROLE_RANK = {"none": 0, "monitor": 1, "user": 2, "operator": 3}


def zap_metadata(props: dict[str, bytes]) -> bytes:
    """A ZAP reply's metadata frame (ZMTP property list: name-len, name, value-len, value)."""
    out = b""
    for name, value in props.items():
        out += bytes([len(name)]) + name.encode() + len(value).to_bytes(4, "big") + value
    return out


class SecurityError(Exception):
    """The daemon must not start (e.g. tcp:// configured without CURVE keys)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def parse_ipc_peer(address: str) -> int | None:
    """The uid from libzmq's ipc peer address ``HOST:UID:GID:PID``; None if absent."""
    parts = address.rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return int(parts[1])


def _uids(entries: list[Any], what: str) -> set[int]:
    out = set()
    for e in entries:
        if isinstance(e, int):
            out.add(e)
            continue
        try:
            out.add(pwd.getpwnam(e).pw_uid)
        except KeyError:
            log.warning("security.%s: no user named %r; ignored", what, e)
    return out


class RolePolicy:
    """uid -> role, from one ``SecurityConfig`` (pure apart from the user-name lookup)."""

    def __init__(self, security: SecurityConfig, daemon_uid: int) -> None:
        self.daemon_uid = daemon_uid
        self.operators = _uids(security.operators, "operators")
        self.monitors = _uids(security.monitors, "monitors")
        self.users = _uids(security.users, "users")
        self.default_role = security.default_role

    def role_for_uid(self, uid: int) -> str:
        if uid == self.daemon_uid or uid in self.operators:
            return "operator"
        if uid in self.users:
            return "user"
        if uid in self.monitors:
            return "monitor"
        return self.default_role


class Security:
    """The ZAP handler plus the dispatcher's questions: who sent this, with which role."""

    def __init__(self, get_security: Callable[[], SecurityConfig], keys_dir: Path,
                 log_refusal: Callable[..., None] | None = None) -> None:
        self._get_security = get_security  # re-read on every decision: SIGHUP applies
        self.keys_dir = keys_dir
        self.allow = AllowList(keys_dir / "clients")
        self.api_keys = ApiKeyStore(keys_dir / API_KEYS_FILE)  # HTTP users (the gateway's)
        self._api_key_warned = ""
        self.daemon_uid = os.getuid()
        self._policy: tuple[int, RolePolicy] | None = None
        self._log_refusal = log_refusal or log.warning
        self.zap: Any = None
        self.accepted = 0
        self.refused = 0

    # -- sockets ----------------------------------------------------------------------------
    def start_zap(self, ctx: zmq.Context) -> None:
        """Bind the ZAP handler; must happen before the daemon's sockets bind."""
        self.zap = ctx.socket(zmq.ROUTER)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)

    @staticmethod
    def protect_ipc(sock: zmq.Socket) -> None:
        """Call before binding an ipc endpoint: every handshake then asks ZAP."""
        sock.zap_domain = b"ipc"

    def curve_server(self) -> Any:
        """The server certificate; SecurityError if tcp:// cannot be secured."""
        try:
            cert = load_server(self.keys_dir)
        except KeyStoreError as e:
            raise SecurityError(f"security.tcp_endpoint is set but {e}", e.hint) from e
        len(self.allow)  # read it now, so problems show at start
        for err in self.allow.errors:
            log.warning("allow-list: %s", err)
        return cert

    def bind_tcp(self, control: zmq.Socket, events: zmq.Socket, endpoint: str) -> Endpoints:
        """Bind both sockets on tcp:// with CURVE (options are per listener in libzmq)."""
        try:
            eps = Endpoints.from_control(endpoint)
        except ValueError as e:
            raise SecurityError(f"security.tcp_endpoint: {e}") from e
        if not eps.control.startswith("tcp://"):
            raise SecurityError(f"security.tcp_endpoint must be tcp://host:port, got {endpoint!r}")
        cert = self.curve_server()
        from zmq.utils import z85

        secret = z85.decode(cert.secret)
        for sock, ep in ((control, eps.control), (events, eps.events)):
            sock.curve_server = True
            sock.curve_secretkey = secret
            sock.zap_domain = b"tcp"
            try:
                sock.bind(ep)
            except zmq.ZMQError as e:
                raise SecurityError(f"cannot bind {ep}: {e}") from e
            sock.curve_server = False  # later binds (none today) default to NULL + ipc rules
            sock.zap_domain = b"ipc"
        log.info("remote access on %s (CURVE, %d allowed keys)", eps.control, len(self.allow))
        return eps

    def close(self) -> None:
        if self.zap is not None and not self.zap.closed:
            self.zap.close(0)

    # -- decisions --------------------------------------------------------------------------
    def policy(self) -> RolePolicy:
        sec = self._get_security()
        if self._policy is None or self._policy[0] != id(sec):
            self._policy = (id(sec), RolePolicy(sec, self.daemon_uid))
        return self._policy[1]

    def decide(self, domain: str, address: str, mechanism: str,
               credentials: list[bytes]) -> tuple[str, str, str]:
        """(status code, status text, user id) for one ZAP request."""
        if domain == "ipc" and mechanism == "NULL":
            uid = parse_ipc_peer(address)
            if uid is None:
                return "400", "no peer credentials on this ipc connection", ""
            role = self.policy().role_for_uid(uid)
            if ROLE_RANK.get(role, 0) == 0:
                return "400", f"uid {uid} has no role", ""
            return "200", "OK", f"uid:{uid}"
        if domain == "tcp" and mechanism == "CURVE" and len(credentials) == 1:
            entry = self.allow.lookup(credentials[0])
            if entry is None:
                return "400", "unknown client key", ""
            return "200", "OK", f"key:{entry.name}"
        return "400", f"mechanism {mechanism} not allowed on domain {domain!r}", ""

    async def serve(self) -> None:
        """Answer ZAP requests forever (a task on the loop that owns ``self.zap``).

        A queued request is received without the loop getting a turn (pyzmq returns a done
        future): every few requests we yield, so a burst of connections cannot freeze it."""
        n = 0
        while True:
            try:
                msg = await self.zap.recv_multipart()
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    return
                raise
            n += 1
            if n % 16 == 0:
                await asyncio.sleep(0)
            if len(msg) < 8 or msg[1] != b"":
                continue
            rid, version, request_id = msg[0], msg[2], msg[3]
            domain = msg[4].decode(errors="replace")
            address = msg[5].decode(errors="replace")
            mechanism = msg[7].decode(errors="replace")
            if version != b"1.0":
                code, text, user = "400", "unsupported ZAP version", ""
            else:
                code, text, user = self.decide(domain, address, mechanism, msg[8:])
            metadata = b""
            if code == "200":
                self.accepted += 1
                if mechanism == "CURVE":  # which key, not only which name: see role_of
                    metadata = zap_metadata({KEY_PROPERTY: z85.encode(msg[8])})
            else:
                self.refused += 1
                self._log_refusal("refused %s connection from %s: %s", domain, address, text)
            await self.zap.send_multipart([rid, b"", b"1.0", request_id, code.encode(),
                                           text.encode(), user.encode(), metadata])

    @staticmethod
    def principal_of(frame: zmq.Frame) -> str:
        """``uid:N`` or ``key:NAME`` as ZAP set it; '' if the message carries none."""
        try:
            user = frame.get("User-Id")  # a str property, never an int option
        except (zmq.ZMQError, AttributeError):
            return ""
        return user if isinstance(user, str) else ""

    def role_of(self, frame: zmq.Frame) -> str:
        """The role of a message's sender, evaluated now (reloads and revocations apply)."""
        return self.role_of_principal(self.principal_of(frame), frame)

    def role_of_principal(self, principal: str, frame: zmq.Frame | None = None) -> str:
        """The role of ``uid:N`` or ``key:NAME`` now; ``none`` for anything else. A key's
        role needs the message (``frame``) whose connection used it."""
        kind, _, name = principal.partition(":")
        if kind == "uid" and name.isdigit():
            return self.policy().role_for_uid(int(name))
        if kind == "key":
            # The name's key now, not the one it had: after 'keys add --force NAME' (or a
            # revoke and a new add) a connection made with the old key has no role.
            entry = self.allow.by_name(name)
            if entry is None or frame is None or self.key_of(frame) != entry.public:
                return "none"
            return entry.role
        return "none"  # no ZAP identity: fail closed

    def authenticate(self, api_key: str, principal: str, role: str) -> tuple[str, str]:
        """(principal, role) a request runs as when it carries ``api_key`` (the HTTP user's
        key the gateway forwards), sent over a connection of ``principal`` with ``role``.

        A known key: ``key:NAME`` with that key's role, never more. ``""`` (an HTTP caller
        without a key): the connection's own principal while no API keys exist, else
        ``unauthenticated``; so is a wrong or revoked key. A connection without a role
        stays without one, whatever key it presents."""
        if role == "none":
            return principal, role
        store = self.api_keys
        if store.error and store.error != self._api_key_warned:
            self._api_key_warned = store.error
            self._log_refusal("API keys unusable, every key refused: %s", store.error)
        if api_key == "":
            if store.count() == 0 and not store.error:
                return principal, role
            raise InfernoError("unauthenticated", "this daemon requires an API key",
                               "send 'Authorization: Bearer KEY' (a key from "
                               "'inferno keys add NAME --role ROLE --http')")
        entry = store.verify(api_key)
        if entry is None:
            raise InfernoError("unauthenticated", "unknown or revoked API key",
                               "ask an operator for a key ('inferno keys list' shows them)")
        if self.allow.by_name(entry.name) is not None:  # key:NAME would be two principals
            self._log_refusal("API key %s refused: a CURVE key has the same name", entry.name)
            raise InfernoError("unauthenticated", f"API key {entry.name} is not usable",
                               "an operator must revoke the HTTP or the CURVE key of "
                               "that name")
        return f"key:{entry.name}", entry.role

    @staticmethod
    def key_of(frame: zmq.Frame) -> bytes:
        """The Z85 CURVE public key the connection's handshake used (ZAP metadata)."""
        try:
            value = frame.get(KEY_PROPERTY)
        except (zmq.ZMQError, AttributeError):
            return b""
        return value.encode() if isinstance(value, str) else b""

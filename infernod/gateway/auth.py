"""Who may call the gateway: HTTP callers' API keys, checked by the daemon, not here.

``Authorization: Bearer KEY`` (or an ``api-key`` header, as Azure's clients send it) is
forwarded with every daemon request the HTTP request causes (the header field ``api_key``,
through :func:`infernod.client.api_key`), so the request runs as the key's principal
``key:NAME`` with the key's role: ownership, quotas, rate limits and who-sees-what apply
per HTTP user, a gateway on another host needs no copy of the key file, and a revoked key
fails on its next request. The daemon's ``unauthenticated`` becomes 401, ``forbidden`` 403.

* Listening on loopback (default) without ``--require-key``: while the daemon has no API
  keys, callers are the gateway's own principal and whatever bearer they send is ignored
  (the ``openai`` SDK insists on some key; vLLM does the same without ``--api-key``). Once
  keys exist, every ``/v1/`` request needs a valid one: a keyless one is sent as ``""``,
  which the daemon refuses while it has keys.
* A non-loopback ``--listen`` (or ``--require-key``): a request without a key is 401 here,
  and the key always goes to the daemon, which refuses it if it knows no such key. The
  gateway refuses to start on a non-loopback address unless the daemon has keys.
* ``/health`` and ``/metrics`` need no key (as in vLLM): load balancers and scrapers probe
  them; they show model names and queue figures, never text.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from infernod.client import AsyncClient, Client, CurveKeys, api_key
from infernod.gateway.errors import HttpError
from infernod.paths import Endpoints
from infernod.protocol.errors import InfernoError

KEYS_TTL_S = 2.0  # how long the daemon's "has API keys" answer is reused (loopback mode)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def presented_key(request: web.Request) -> str | None:
    """The caller's key: ``Authorization: Bearer KEY``, else an ``api-key`` header."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    alt = request.headers.get("api-key", "").strip()
    return alt or None


def daemon_has_keys(endpoint: str | Endpoints | None, curve: CurveKeys | None,
                    timeout: float = 10.0) -> bool:
    """Ask the daemon (``hello``'s ``api_keys``) whether API keys exist; raises
    InfernoError when it cannot be asked."""
    with Client(endpoint, timeout=timeout, name="inferno-gateway", curve=curve) as c:
        return int(c.hello().get("api_keys") or 0) > 0


class Auth:
    def __init__(self, require_key: bool = False) -> None:
        self.require_key = require_key  # non-loopback listen or --require-key
        self._has_keys: tuple[float, bool] | None = None

    def keys_configured(self) -> bool:
        """True when every caller must present a key (then any address may be listened on);
        the command checks with :func:`daemon_has_keys` that the daemon has some."""
        return self.require_key

    async def authorize(self, request: web.Request, action: str) -> None:
        """Roles are the daemon's to check (a key's role travels with the key); nothing is
        decided here. Kept for the handlers' calls."""
        return None

    async def _daemon_has_keys(self, client: AsyncClient) -> bool:
        now = time.monotonic()
        if self._has_keys is None or now - self._has_keys[0] > KEYS_TTL_S:
            reply = await client.hello()  # as the gateway itself: no key in this context
            self._has_keys = (now, int(reply.get("api_keys") or 0) > 0)
        return self._has_keys[1]

    async def key_for(self, request: web.Request, client: AsyncClient) -> str:
        """What the daemon requests of this HTTP request carry as ``api_key``."""
        key = presented_key(request)
        if self.require_key:
            if key is None:
                raise HttpError(401, "this gateway requires an API key: send 'Authorization: "
                                "Bearer KEY'", code="unauthenticated")
            return key
        if key is not None:
            try:
                if await self._daemon_has_keys(client):
                    return key
            except InfernoError:
                return key  # cannot tell: let the daemon decide on the key itself
        return ""  # no keys in use: the gateway's own principal (refused once keys exist)

    def middleware(self, client: Callable[[], AsyncClient]) -> Callable[..., Awaitable[
            web.StreamResponse]]:
        """Runs each ``/v1/`` handler with the caller's key attached to its daemon requests
        (tasks it starts inherit it: admission, a cancel after the client left)."""

        @web.middleware
        async def keyed(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith("/v1/"):
                return await handler(request)
            key = await self.key_for(request, client())
            with api_key(key):
                return await handler(request)

        return keyed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--require-key", action="store_true",
                        help="refuse HTTP requests without an API key even on loopback "
                        "(e.g. behind a local reverse proxy)")


def from_args(args: argparse.Namespace) -> Auth:
    return Auth(require_key=bool(getattr(args, "require_key", False)))

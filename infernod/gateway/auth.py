"""Who may call the gateway: the hook API keys plug into.

Without keys every caller is the gateway's own principal (the uid it runs as), which is why
``--listen`` refuses a non-loopback address unless :meth:`Auth.keys_configured` is true.
"""

from __future__ import annotations

import argparse

from aiohttp import web


class Auth:
    """No API keys: every request is allowed and acts as the gateway's own principal."""

    def keys_configured(self) -> bool:
        """True when callers must present a key (then any address may be listened on)."""
        return False

    async def authorize(self, request: web.Request, action: str) -> None:
        """Raise :class:`~infernod.gateway.errors.HttpError` 401 (no or unknown key) or
        403 (the key's role does not allow ``action``: "generate", "embed", "models",
        "health") before the request reaches the daemon."""
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line options that configure :class:`Auth` (none without keys)."""


def from_args(args: argparse.Namespace) -> Auth:
    return Auth()

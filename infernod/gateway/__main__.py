"""`inferno-gateway`: the OpenAI-compatible HTTP front of infernod, a process of its own.

It reaches the daemon like any client (``--endpoint``/``--server-key``/``--client-key``,
``--daemon NAME``, ``$INFERNO_ENDPOINT``, client.toml), so it may run on another host over
CURVE, and a bug in its HTTP handling can stop only the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import sys
from typing import Any

from aiohttp import web

from infernod import __version__
from infernod.client import AsyncClient
from infernod.gateway import auth as auth_mod
from infernod.gateway.app import Gateway
from infernod.protocol.errors import InfernoError

DEFAULT_PORT = 8090
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
log = logging.getLogger("inferno-gateway")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"--listen {value!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {value!r}: the port must be 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferno-gateway",
                                description="OpenAI-compatible HTTP gateway for infernod")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve HTTP on (default {DEFAULT_LISTEN}); a non-loopback "
                   "address needs API keys")
    p.add_argument("--endpoint", help="the daemon: ipc://DIR/control.sock or tcp://host:port "
                   "(default: $INFERNO_ENDPOINT, client.toml, or the local daemon)")
    p.add_argument("--server-key", help="server public key file (tcp:// with CURVE)")
    p.add_argument("--client-key", help="client secret key file (tcp:// with CURVE)")
    p.add_argument("--daemon", metavar="NAME",
                   help="a daemon named in client.toml ([daemons.NAME])")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="daemon request timeout, seconds (generation waits longer)")
    p.add_argument("--default-model", help="model used when a request names none")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--version", action="version", version=f"inferno-gateway {__version__}")
    auth_mod.add_arguments(p)
    return p


async def serve(gateway: Gateway, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints the bound address (port 0 picks a free one)."""
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=5.0)
    await site.start()
    for addr in [s.getsockname() for s in _sockets(runner)]:
        print(f"inferno-gateway: listening on http://{_fmt(addr)}", file=sys.stderr,
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _sockets(runner: web.AppRunner) -> list[socket.socket]:
    out: list[socket.socket] = []
    for site in runner.sites:
        server = getattr(site, "_server", None)
        out += list(getattr(server, "sockets", None) or [])
    return out


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        print(f"inferno-gateway: {e}", file=sys.stderr)
        return 2
    try:
        auth = auth_mod.from_args(args)
    except InfernoError as e:
        print(f"inferno-gateway: {e.message} ({e.hint})", file=sys.stderr)
        return 2
    from infernod.client.config import resolve

    try:
        endpoint, curve = resolve(args.endpoint, args.server_key, args.client_key,
                                  args.daemon)
    except InfernoError as e:
        print(f"inferno-gateway: {e.message} ({e.hint})", file=sys.stderr)
        return 2
    if not is_loopback(host):
        auth.require_key = True  # every HTTP caller needs a key the daemon knows
        try:
            has_keys = auth_mod.daemon_has_keys(endpoint, curve, args.timeout)
            why = "the daemon has no API keys"
        except InfernoError as e:
            has_keys, why = False, f"cannot ask the daemon whether it has API keys ({e})"
        if not has_keys:
            print(f"inferno-gateway: refusing to listen on {host}: {why}; without API keys "
                  "anyone who can reach it could use the daemon as this gateway's user. "
                  "Add one ('inferno keys add NAME --role user --http') or listen on "
                  "127.0.0.1 (behind your own proxy)", file=sys.stderr)
            return 2

    def client() -> AsyncClient:
        return AsyncClient(endpoint, timeout=args.timeout, name="inferno-gateway",
                           curve=curve)

    gateway = Gateway(client, auth, default_model=args.default_model)
    try:
        asyncio.run(serve(gateway, host, port))
    except OSError as e:
        print(f"inferno-gateway: cannot listen on {args.listen}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every ``inferno`` command module shares: exit codes, the command table, output
helpers and how a command gets its client. Command modules import from here, never from
:mod:`infernod.cli.app`, so the parser can import them without a cycle."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from infernod.client import Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = fn
        return fn
    return deco


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _err(msg: str) -> None:
    print(f"inferno: {msg}", file=sys.stderr)


def _client(args: argparse.Namespace, **kw: Any) -> Client:
    from infernod.client.config import resolve  # flags, $INFERNO_ENDPOINT, client.toml

    endpoint, curve = resolve(args.endpoint, getattr(args, "server_key", None),
                              getattr(args, "client_key", None), getattr(args, "daemon", None))
    return Client(endpoint, timeout=args.timeout, name="inferno-cli", curve=curve, **kw)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _bytes(n: Any) -> str:
    """Sizes for people: GiB from 1 GiB up, MiB below; '-' when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"

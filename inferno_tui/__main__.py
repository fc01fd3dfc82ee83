"""``inferno-tui [--endpoint ... [--endpoint ...]] [--daemon NAME] [--server-key F
--client-key F] [--readonly]``."""

from __future__ import annotations

import argparse
import os
import sys

from inferno_tui.connection import Settings
from infernod.client.config import LOCAL, DaemonEntry, fleet, read
from infernod.protocol.errors import InfernoError


def parse_args(argv: list[str] | None = None) -> tuple[Settings, list[DaemonEntry]]:
    p = argparse.ArgumentParser(
        prog="inferno-tui", description="Inferno operations console",
        epilog="Without --endpoint or --daemon the console opens what client.toml names: "
               "a fleet screen when it names two or more daemons ([daemons.NAME] tables).")
    p.add_argument("--endpoint", action="append",
                   help="control endpoint: ipc://DIR/control.sock or tcp://HOST:PORT "
                        "(repeatable: a fleet; default: $INFERNO_ENDPOINT or local)")
    p.add_argument("--daemon", action="append", metavar="NAME",
                   help="a daemon named in client.toml (repeatable)")
    p.add_argument("--server-key", help="server public key file (tcp:// with CURVE)")
    p.add_argument("--client-key", help="client secret key file (tcp:// with CURVE)")
    p.add_argument("--readonly", action="store_true",
                   help="monitor mode: hide every action that changes state")
    p.add_argument("--data-dir", help="where conversations are kept (default: user data dir)")
    a = p.parse_args(argv)
    if bool(a.server_key) != bool(a.client_key):
        p.error("--server-key and --client-key go together")
    try:
        daemons = _daemons(a)
    except InfernoError as e:
        p.error(f"{e.message}" + (f" ({e.hint})" if e.hint else ""))
    first = daemons[0]
    return Settings(endpoint=first.endpoint, server_key=first.server_key,
                    client_key=first.client_key, readonly=a.readonly,
                    data_dir=a.data_dir), daemons


def _daemons(a: argparse.Namespace) -> list[DaemonEntry]:
    """Flags first (keys from the flags, else from client.toml's entry for that endpoint),
    then --daemon names, then what client.toml names, then the local daemon."""
    if a.endpoint:
        out = fleet(a.endpoint)
    elif a.daemon:
        file = read()
        out = [file.entry(name) for name in a.daemon]
    elif os.environ.get("INFERNO_ENDPOINT"):  # as the CLI: the env before the file
        out = [DaemonEntry(LOCAL, None, *_top_keys(read().top))]
    else:
        file = read()
        named = file.fleet()
        chosen = file.chosen()
        if len(named) > 1:
            out = named
        elif chosen is not None:
            out = [chosen]
        else:
            out = [DaemonEntry(LOCAL, None, *_top_keys(file.top))]
    if a.server_key:
        out = [DaemonEntry(d.name, d.endpoint, a.server_key, a.client_key) for d in out]
    return out


def _top_keys(top: DaemonEntry | None) -> tuple[str | None, str | None]:
    return (top.server_key, top.client_key) if top is not None else (None, None)


def main(argv: list[str] | None = None) -> int:
    settings, daemons = parse_args(argv)
    from inferno_tui.app import InfernoApp

    InfernoApp(settings, daemons=daemons).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

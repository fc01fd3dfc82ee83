"""``inferno-tui [--endpoint ...] [--server-key F --client-key F] [--readonly]``."""

from __future__ import annotations

import argparse
import sys

from inferno_tui.connection import Settings


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="inferno-tui", description="Inferno operations console")
    p.add_argument("--endpoint", help="control endpoint: ipc://DIR/control.sock or "
                                      "tcp://HOST:PORT (default: $INFERNO_ENDPOINT or local)")
    p.add_argument("--server-key", help="server public key file (tcp:// with CURVE)")
    p.add_argument("--client-key", help="client secret key file (tcp:// with CURVE)")
    p.add_argument("--readonly", action="store_true",
                   help="monitor mode: hide every action that changes state")
    p.add_argument("--data-dir", help="where conversations are kept (default: user data dir)")
    a = p.parse_args(argv)
    if bool(a.server_key) != bool(a.client_key):
        p.error("--server-key and --client-key go together")
    return Settings(endpoint=a.endpoint, server_key=a.server_key, client_key=a.client_key,
                    readonly=a.readonly, data_dir=a.data_dir)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    from inferno_tui.app import InfernoApp

    InfernoApp(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`infernod`: parse arguments, load and validate the config, run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infernod import __version__
from infernod import config as config_mod
from infernod.auth import SecurityError
from infernod.server import LockError, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infernod", description="Inferno inference daemon")
    parser.add_argument("--config", help="config file (default: $INFERNO_CONFIG, "
                        "/etc/infernod/infernod.toml, ~/.config/inferno/infernod.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit (0 valid, 2 invalid)")
    parser.add_argument("--version", action="version", version=f"infernod {__version__}")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"infernod: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"infernod: config OK ({cfg.source})")
        return 0
    setup_logging(cfg.daemon.log_level)
    from infernod.service import InfernoDaemon

    daemon = InfernoDaemon(cfg)
    try:
        return asyncio.run(daemon.run())
    except LockError as e:
        print(f"infernod: {e}; refusing to start a second daemon on the same endpoint",
              file=sys.stderr)
        return 1
    except SecurityError as e:
        print(f"infernod: {e}" + (f" ({e.hint})" if e.hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

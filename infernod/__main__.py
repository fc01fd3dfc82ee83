"""`infernod`: parse arguments, load and validate the config, run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from infernod import __version__
from infernod import config as config_mod
from infernod.daemon.auth import SecurityError
from infernod.daemon.server import LockError, setup_logging

# models.cpu_wait -> OMP_WAIT_POLICY. Measured on 2 cores (README, "CPU threads under load"):
# spinning is fastest alone and slowest beside busy programs; sleeping the reverse.
CPU_WAIT_POLICIES = {"spin": "ACTIVE", "sleep": "PASSIVE"}


def set_cpu_wait(policy: str) -> None:
    """OpenMP, which runs llama.cpp's CPU threads, reads OMP_WAIT_POLICY once, as it loads:
    this must run before anything imports llama_cpp. 'auto' leaves the environment alone."""
    log = logging.getLogger("infernod")
    value = CPU_WAIT_POLICIES.get(policy)
    if value is not None:
        os.environ["OMP_WAIT_POLICY"] = value
    try:
        with open("/proc/self/maps") as maps:
            loaded = any("libgomp" in line for line in maps)
    except OSError:
        loaded = False
    if loaded:
        log.warning("OpenMP was loaded before models.cpu_wait could apply: it keeps the "
                    "policy it started with (set OMP_WAIT_POLICY in the service's environment)")
    log.info("CPU threads wait by %s (models.cpu_wait = %s)",
             os.environ.get("OMP_WAIT_POLICY", "OpenMP's default"), policy)


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
    set_cpu_wait(cfg.models.cpu_wait)
    from infernod.daemon.core import InfernoDaemon  # loads llama.cpp, and OpenMP with it

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

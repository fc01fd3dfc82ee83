"""`inferno doctor`: can this machine run what is installed?

Probes the local llama.cpp build in a child process (so a build this CPU cannot run is
reported, not suffered) and, when a daemon answers, shows what the daemon found at its start.
Exit 0 when both can run GGUF models, 1 when either cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from infernod.backends.cpu_features import probe_build
from infernod.protocol.errors import DaemonUnavailable, InfernoError


def add_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    add("doctor", "check that this CPU can run the installed llama.cpp build")


def cmd_doctor(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    local = probe_build().to_wire()
    daemon: dict[str, Any] | None = None
    daemon_error = ""
    try:
        with client(args) as c:
            daemon = c.status().get("cpu")
    except (DaemonUnavailable, InfernoError) as e:
        daemon_error = e.message
    ok = bool(local["ok"]) and (daemon is None or bool(daemon.get("ok")))
    if getattr(args, "json", False):
        json.dump({"ok": ok, "local": local, "daemon": daemon, "daemon_error": daemon_error},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if ok else 1
    _show("this install", local)
    if daemon is not None:
        _show("the daemon", daemon)
    else:
        print(f"the daemon: not asked ({daemon_error or 'no cpu report'})")
    return 0 if ok else 1


def _show(who: str, cpu: dict[str, Any]) -> None:
    verdict = "OK" if cpu["ok"] else "CANNOT RUN GGUF MODELS"
    print(f"{who}: {verdict}  (llama-cpp-python {cpu.get('llama_cpp_python') or '?'}, "
          f"{cpu['machine']})")
    print(f"  llama.cpp built for: {' '.join(cpu['build']) or 'baseline only'}")
    print(f"  this CPU has:        {' '.join(cpu['host']) or '-'}")
    if cpu["missing"]:
        print(f"  missing on this CPU: {' '.join(cpu['missing'])}")
    if cpu["unused"]:
        print(f"  unused by the build: {' '.join(cpu['unused'])} (a build for this machine "
              "alone could use them; see docs/operations.md, CPU builds)")
    if cpu["reason"]:
        print(f"  reason: {cpu['reason']}")

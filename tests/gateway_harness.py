"""Start the real `inferno-gateway` as a subprocess on a free 127.0.0.1 port.

It is told ``--listen 127.0.0.1:0`` and prints the port the kernel picked, so two tests
never race for a port. Its log goes to a file (a pipe nobody reads would block it).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon_harness import DaemonProcess

LISTENING = re.compile(r"listening on http://(\S+):(\d+)")


class GatewayProcess:
    def __init__(self, endpoint: str, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "infernod.gateway", "--listen", "127.0.0.1:0",
                     "--endpoint", endpoint, *extra]
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = LISTENING.search(self.log())
            if m:
                self.port = int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"inferno-gateway exited {self.proc.returncode}:\n"
                                   f"{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"inferno-gateway not listening after {timeout}s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self, "_log"):
            self._log.close()
        return self.proc.returncode


def run_gateway(args: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (for refusals that exit at once)."""
    return subprocess.run([sys.executable, "-m", "infernod.gateway", *args],
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def daemon_and_gateway(config: dict[str, Any], log_dir: Path,
                       before_gateway: Callable[[DaemonProcess], None] | None = None,
                       ) -> Iterator[tuple[DaemonProcess, GatewayProcess]]:
    """A real daemon with ``config`` and a gateway in front of it, both stopped at the end
    whatever happened. ``before_gateway`` runs on the started daemon first (a load)."""
    daemon = DaemonProcess(config)
    gateway: GatewayProcess | None = None
    try:
        daemon.start()
        if before_gateway is not None:
            before_gateway(daemon)
        gateway = GatewayProcess(daemon.endpoint, log_dir / "gateway.log").start()
        yield daemon, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        daemon.cleanup()

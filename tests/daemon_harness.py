"""Start the real infernod as a subprocess in a short temporary runtime directory.

ipc:// socket paths are limited to ~107 bytes, so the runtime dir lives directly under /tmp.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from infernod.client import Client
from infernod.paths import Endpoints
from infernod.protocol.errors import DaemonUnavailable

TEST_MODELS = Path(os.environ.get("INFERNO_TEST_CACHE", Path.home() / ".cache" / "inferno-test"))


def test_models_dir(model_file: Path) -> Path:
    """A models dir holding the default model as 'gemma3-270m.gguf' (a hard link, no copy)."""
    d = TEST_MODELS / "models"
    d.mkdir(parents=True, exist_ok=True)
    target = d / "gemma3-270m.gguf"
    if not target.exists():
        try:
            os.link(model_file, target)
        except OSError:
            shutil.copyfile(model_file, target)
    return d


def wait_for(cond: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond()`` until it returns something truthy (returned), failing after
    ``timeout`` seconds with ``what`` in the message: a bounded wait, never a hang."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class DaemonProcess:
    def __init__(self, config: dict[str, Any] | None = None, *, base: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="inf-", dir="/tmp"))
        self.runtime = self.base / "run"
        self.state = self.base / "state"
        cfg: dict[str, Any] = {"daemon": {"runtime_dir": str(self.runtime),
                                          "state_dir": str(self.state)},
                               "models": {"install_default": False}}
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
        self.config_path = self.base / "infernod.toml"
        self.config_path.write_bytes(tomli_w.dumps(cfg).encode())
        self.endpoints = Endpoints.in_dir(self.runtime)
        self.endpoint = self.endpoints.control
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "infernod.log"

    def start(self, wait: bool = True) -> DaemonProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infernod", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"infernod exited {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client(timeout=1.0) as c:
                    c.ping()
                    return
            except DaemonUnavailable:
                time.sleep(0.1)
        raise TimeoutError(f"infernod not ready after {timeout}s:\n{self.log()}")

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 10.0)
        return Client(self.endpoint, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)

"""End to end: the real ``inferno-tui`` console script in tmux at 80x24 against a real daemon.

Needs the ``tmux`` binary (Debian: apt-get install -y tmux); skipped with that reason if absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(TMUX is None, reason="tmux not installed (apt-get install tmux)")]


def test_inferno_tui_in_tmux(daemon, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "inferno-tui"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "inferno_tui"]
    session = f"inferno-tui-test-{os.getpid()}"
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    shell_cmd = f"env {exports} {' '.join(cmd)} --endpoint {daemon.endpoint}"
    subprocess.run([TMUX, "-L", session, "new-session", "-d", "-s", session, "-x", "80",
                    "-y", "24", shell_cmd], check=True)
    sock = ["-L", session]
    try:
        def cap() -> str:
            return subprocess.run([TMUX, *sock, "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, check=True).stdout

        def wait(text: str, timeout: float = 30.0) -> str:
            end = time.monotonic() + timeout
            screen = ""
            while time.monotonic() < end:
                screen = cap()
                if text in screen:
                    return screen
                time.sleep(0.2)
            raise AssertionError(f"{text!r} not on screen after {timeout}s:\n{screen}")

        def keys(*k: str) -> None:
            subprocess.run([TMUX, *sock, "send-keys", "-t", session, *k], check=True)

        screen = wait("connected")
        screen = wait("gemma3-270m")
        assert "m:Models" in screen and "Load" in screen
        keys("g")
        screen = wait("System")
        assert "cpu" in screen
        keys("q")
        screen = wait("backpressure")
        keys("m")
        screen = wait("Remove")
        assert "gemma3-270m" in screen and "avail" in screen
        lines = screen.splitlines()
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
        keys("C-q")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            r = subprocess.run([TMUX, *sock, "has-session", "-t", session], capture_output=True)
            if r.returncode != 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("inferno-tui did not quit on ctrl+q")
    finally:
        subprocess.run([TMUX, *sock, "kill-server"], capture_output=True)

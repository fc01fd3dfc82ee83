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


def test_fleet_of_three_in_tmux(daemon_factory, tmp_path: Path) -> None:
    """The real console with three daemons at 80x24: the fleet screen first, one stopped and
    started again, Enter opens one in the other screens, F6 moves to the next."""
    ds = [daemon_factory() for _ in range(3)]
    conf = tmp_path / "client.toml"
    conf.write_text("".join(f'[daemons.node{i}]\nendpoint = "{d.endpoint}"\n'
                            for i, d in enumerate(ds)))
    script = Path(sys.executable).parent / "inferno-tui"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "inferno_tui"]
    session = f"inferno-fleet-test-{os.getpid()}"
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm-256color",
           "INFERNO_CLIENT_CONFIG": str(conf)}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    subprocess.run([TMUX or "tmux", "-L", session, "new-session", "-d", "-s", session, "-x",
                    "80", "-y", "24", f"env -u INFERNO_ENDPOINT {exports} {' '.join(cmd)}"],
                   check=True, timeout=10)
    sock = ["-L", session]
    try:
        def cap() -> str:
            return subprocess.run([TMUX or "tmux", *sock, "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, check=True,
                                  timeout=10).stdout

        def wait(cond, what: str, timeout: float = 60.0) -> str:
            end = time.monotonic() + timeout
            screen = ""
            while time.monotonic() < end:
                screen = cap()
                if cond(screen):
                    return screen
                time.sleep(0.2)
            raise AssertionError(f"{what}: not on screen after {timeout}s:\n{screen}")

        def keys(*k: str) -> None:
            subprocess.run([TMUX or "tmux", *sock, "send-keys", "-t", session, *k],
                           check=True, timeout=10)

        def rows(screen: str) -> dict[str, str]:  # the table's rows, not the detail line
            return {line.split()[0]: line for line in screen.splitlines()
                    if line.startswith(" node")}

        screen = wait(lambda s: len(rows(s)) == 3 and all(
            "connected" in r for r in rows(s).values()), "three connected daemons")
        assert "0:Fleet" in screen and "Crash" in screen
        lines = screen.splitlines()
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80

        ds[1].stop()
        wait(lambda s: "reconnecting" in rows(s).get("node1", ""), "node1 lost")
        ds[1].start()
        wait(lambda s: "connected" in rows(s).get("node1", "")
             and "reconnecting" not in rows(s).get("node1", ""), "node1 back")

        keys("Down")
        keys("Enter")
        screen = wait(lambda s: "inferno node1" in s and "gemma3-270m" in s, "node1 opened")
        assert "m:Models" in screen
        keys("F6")
        wait(lambda s: "inferno node2" in s, "F6 to node2")
        keys("C-q")
    finally:
        subprocess.run([TMUX or "tmux", *sock, "kill-server"], capture_output=True, timeout=10)

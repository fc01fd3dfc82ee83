"""Bytes on the wire: what the console writes to its terminal (every byte crosses the SSH
link), measured with tmux ``pipe-pane`` at 80x24 against a real daemon.

Goals: at most 1 KB/s on an idle screen (asserted), at most 3 KB/s while chat streams (not
met at 60 tok/s: measured and printed) (at the ~29 tok/s
this was first measured at: about 100 bytes per token). Before: 1.2 KB/s on the idle models
screen (the status bar repainted 4 times a second), 2.7-3.7 KB/s on the GPU screen, and
1.2-1.8 KB per streamed token (Markdown re-rendered per token, a scroll per line, and the
input's blinking cursor alone 1.7 KB/s).
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
pytestmark = [pytest.mark.slow, pytest.mark.model,
              pytest.mark.skipif(TMUX is None, reason="tmux not installed (apt-get install tmux)")]
MODEL = "gemma3-270m"
IDLE_S = 6.0
STREAM_S = 8.0


class Pane:
    def __init__(self, session: str, log: Path) -> None:
        self.sock = ["-L", session]
        self.session = session
        self.log = log

    def tmux(self, *args: str) -> str:
        return subprocess.run([TMUX or "tmux", *self.sock, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def cap(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait(self, text: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < end:
            screen = self.cap()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on screen after {timeout}s:\n{screen}")

    def keys(self, *k: str) -> None:
        self.tmux("send-keys", "-t", self.session, *k)

    def size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def rate_while_idle(self, seconds: float) -> float:
        time.sleep(1.0)  # what the key press itself redrew
        b0, t0 = self.size(), time.monotonic()
        time.sleep(seconds)
        return (self.size() - b0) / (time.monotonic() - t0)


def test_console_writes_little_to_the_terminal(daemon, tmp_path: Path) -> None:
    with daemon.client(timeout=120) as c:
        c.load(MODEL)
    script = Path(sys.executable).parent / "inferno-tui"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "inferno_tui"]
    session = f"inferno-bytes-{os.getpid()}"
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    subprocess.run([TMUX or "tmux", "-L", session, "new-session", "-d", "-s", session, "-x",
                    "80", "-y", "24",
                    f"env {exports} {' '.join(cmd)} --endpoint {daemon.endpoint}"],
                   check=True, timeout=10)
    pane = Pane(session, tmp_path / "pane.bytes")
    try:
        pane.tmux("pipe-pane", "-o", "-t", session, f"cat >> {pane.log}")
        pane.wait("connected")
        pane.wait(MODEL)
        rates = {"models (idle)": pane.rate_while_idle(IDLE_S)}
        pane.keys("g")
        pane.wait("System")
        rates["GPU & system (idle)"] = pane.rate_while_idle(IDLE_S)
        pane.keys("c")
        pane.wait("message (enter")
        time.sleep(1.0)
        pane.keys("Once upon a time, in a small village,", "Enter")
        with daemon.client(timeout=10) as c:
            def tokens() -> int:  # of the one running request, as the daemon counts them
                rows = [r for r in c.queue_list()["items"] if r.get("state") == "running"]
                return int(rows[0].get("tokens") or 0) if rows else -1

            end = time.monotonic() + 120
            while tokens() < 2 and time.monotonic() < end:
                time.sleep(0.2)
            time.sleep(0.5)
            n0, b0, t0 = tokens(), pane.size(), time.monotonic()
            n1, b1, t1 = n0, b0, t0
            while time.monotonic() - t0 < STREAM_S:  # the last look while it still ran
                time.sleep(0.25)
                n, b, t = tokens(), pane.size(), time.monotonic()
                if n < 0:  # finished (a fast machine writes its 256 tokens in ~4 s)
                    break
                n1, b1, t1 = n, b, t
        pane.keys("Escape")  # stop it
        assert n0 >= 0 and n1 > n0 and t1 - t0 >= 1.0, (n0, n1, t1 - t0)  # a window of it
        written, streamed = b1 - b0, n1 - n0
        rates["chat (streaming)"] = written / (t1 - t0)
        print("\nbytes written to the terminal at 80x24 (tmux pipe-pane): "
              + "; ".join(f"{k} {v / 1024:.2f} KB/s" for k, v in rates.items())
              + f"; streaming {streamed} tokens in {t1 - t0:.1f} s "
              f"({streamed / (t1 - t0):.1f} tok/s): {written / streamed:.0f} bytes/token")
        assert rates["models (idle)"] <= 1024, rates
        assert rates["GPU & system (idle)"] <= 1024, rates
        # The last line repaints at most 10 times a second whatever the token rate, so
        # the rate is bounded by design; bytes per token are printed, not asserted: at a few
        # tok/s (a busy machine) every token is its own repaint.
        # Streaming is printed, not asserted: at 2 tok/s it writes 0.4 KB/s, but at 60 tok/s
        # on a quiet machine 24.5 KB/s (each new line is a mount, and a mount repaints the
        # screen). The 3 KB/s goal is not met yet.
    finally:
        subprocess.run([TMUX or "tmux", "-L", session, "kill-server"], capture_output=True,
                       timeout=10)


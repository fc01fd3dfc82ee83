"""Bytes on the wire: what the console writes to its terminal (every byte crosses the SSH
link), measured with tmux ``pipe-pane`` at 80x24 against a real daemon.

Goals (asserted): at most 1 KB/s on an idle screen and at most 3 KB/s while chat streams,
with the log already full so the reply scrolls it as it grows. Before: 1.2 KB/s on the idle
models screen (the status bar repainted 4 times a second), 2.7-3.7 KB/s on the GPU screen,
and while streaming 1.2-1.8 KB per token (Markdown re-rendered per token, a scroll per line,
the input's blinking cursor alone 1.7 KB/s), then 16-24.5 KB/s at 60 tok/s (about 420 bytes
per token: each new line was a widget mounted, and a mount repaints the screen).
The model streams here at whatever rate this machine gives it; bench/tui_bytes.py measures
the same chat screen fed at a set rate (60 tok/s) for the README.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferno_tui.store import ChatSettings, ChatStore

TMUX = shutil.which("tmux")
pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(600),
              pytest.mark.skipif(TMUX is None, reason="tmux not installed (apt-get install tmux)")]
MODEL = "gemma3-270m"
IDLE_S = 6.0
STREAM_S = 10.0  # at least, and until the reply has scrolled
STREAM_MAX_S = 90.0
FILL_MAX_S = 240.0  # the reply outgrows the log after ~70 tokens: at 0.5 tok/s, 140 s
# Short lines: the reply scrolls the log soon even on a busy machine, and often (the case
# that costs most: a scroll repaints the whole log).
PROMPT = "List one hundred animals, numbered, one per line."


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


def a_full_conversation(data_home: Path) -> None:
    """A conversation whose earlier messages already fill the chat log, so the reply
    streamed next scrolls it as it grows (the costly case)."""
    store = ChatStore(data_home / "inferno" / "chats.sqlite3")
    # greedy: the same reply every run, and this model then lists the days again and again
    # until max_tokens, so the reply always outgrows the log
    conv = store.create("bytes", ChatSettings(model=MODEL, max_tokens=600, temperature=0.0))
    store.add_message(conv.id, "user", "Name the days of the week, one per line.")
    store.add_message(conv.id, "assistant", "\n".join(
        f"- {d}" for d in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                           "Saturday", "Sunday")) + "\n\nThat is all seven days.")
    store.close()


def test_console_writes_little_to_the_terminal(daemon, tmp_path: Path) -> None:
    with daemon.client(timeout=120) as c:
        c.load(MODEL)
    a_full_conversation(tmp_path / "data")
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
        assert "Days" not in pane.cap()  # the log is full: its first line is scrolled away
        time.sleep(1.0)
        pane.keys(PROMPT, "Enter")
        with daemon.client(timeout=10) as c:
            def tokens() -> int:  # of the one running request, as the daemon counts them
                rows = [r for r in c.queue_list()["items"] if r.get("state") == "running"]
                return int(rows[0].get("tokens") or 0) if rows else -1

            def log_rows() -> list[str]:  # the chat log's first two rows
                return pane.cap().splitlines()[2:4]

            # Until the reply fills the log (its header on the log's first row, the prompt
            # above it gone): from then on it scrolls, a jump every few lines, and the window
            # measures that.
            end = time.monotonic() + 120
            while tokens() < 2 and time.monotonic() < end:
                time.sleep(0.2)
            end = time.monotonic() + FILL_MAX_S
            while "generating" not in log_rows()[0] and PROMPT in pane.cap():
                assert tokens() >= 0, "the reply ended before it filled the log"
                assert time.monotonic() < end, pane.cap()
                time.sleep(0.25)
            time.sleep(0.5)  # the layout that brought it there
            first = log_rows()[1]
            n0, b0, t0 = tokens(), pane.size(), time.monotonic()
            n1, b1, t1 = n0, b0, t0
            jumps = 0
            while t1 - t0 < STREAM_S or not jumps:  # the last look while it still ran
                time.sleep(0.25)
                n, b, t = tokens(), pane.size(), time.monotonic()
                if n < 0 or t - t0 > STREAM_MAX_S:  # finished, or too slow to wait for
                    break
                n1, b1, t1 = n, b, t
                if (row := log_rows()[1]) != first:
                    jumps, first = jumps + 1, row
            screen = pane.cap()
        pane.keys("Escape")  # stop it
        written, streamed, seconds = b1 - b0, n1 - n0, t1 - t0
        with pane.log.open("rb") as f:  # what the window wrote, to look at when it fails
            f.seek(b0)
            (tmp_path / "streaming.bytes").write_bytes(f.read(written))
        rates["chat (streaming)"] = written / max(seconds, 1e-9)
        print("\nbytes written to the terminal at 80x24 (tmux pipe-pane): "
              + "; ".join(f"{k} {v / 1024:.2f} KB/s" for k, v in rates.items())
              + f"; streaming {streamed} tokens in {seconds:.1f} s "
              f"({streamed / max(seconds, 1e-9):.1f} tok/s): "
              f"{written / max(streamed, 1):.0f} bytes/token"
              + f", {jumps} jumps of the text seen")
        # It streamed during the window (so the figures below cannot pass by streaming
        # nothing), and the reply scrolled as it grew.
        assert n0 >= 0 and seconds >= 1.0 and streamed >= 10, (n0, n1, seconds)
        assert jumps, screen
        assert rates["models (idle)"] <= 1024, rates
        assert rates["GPU & system (idle)"] <= 1024, rates
        assert rates["chat (streaming)"] <= 3 * 1024, rates
        # What a new token costs, whatever the token rate (a busy machine streams a few
        # tokens a second, so the rate alone says little): its text and a cursor move, with
        # the scroll of the log every few lines shared out.
        assert written / streamed <= 200, (written, streamed)
    finally:
        subprocess.run([TMUX or "tmux", "-L", session, "kill-server"], capture_output=True,
                       timeout=10)

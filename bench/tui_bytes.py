"""What the console writes to its terminal while a reply streams at a set token rate, however
fast this machine runs the model.

tests/test_tui_bytes.py measures the real console through tmux against the real daemon, at
whatever rate the model streams here (a few tok/s on a busy 2-core VM). This runs the real
chat screen at 80x24 in process, fed by a stand-in for the client's stream that yields a
fixed text at ``--tok-s`` (a 270M model streams 36-60 tok/s on a quiet machine), and counts
the bytes Textual renders for the terminal, from when the reply fills the log (the costly
case: it scrolls) for ``--seconds``. ``--old DIR`` runs a checkout of the console from
before in its own process, interleaved with this one, round by round.

    python bench/tui_bytes.py --tok-s 60 --rounds 3 --old /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

LIST = "".join(f"{i}. {day}\n" for i in range(1, 200)
               for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")[i % 5:][:1])
PROSE = ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
         "knew every rock of the bay and every story the tide brought in. ") * 60
TEXTS = {"list": LIST, "prose": PROSE}


class Stream:
    """Stands in for the client's AsyncStream: ``text`` in word pieces at ``tok_s``."""

    def __init__(self, text: str, tok_s: float) -> None:
        self.pieces = re.findall(r"\s*\S+|\s+", text)
        self.tok_s = tok_s
        self.stats: dict[str, Any] = {}
        self.request_id = "bench"
        self.state = type("State", (), {"next_seq": 1, "text": "x", "queued": None})()
        self.sent = 0

    async def cancel(self) -> dict[str, Any]:
        return {}

    def __aiter__(self) -> Stream:
        self.t0 = time.monotonic()
        return self

    async def __anext__(self) -> str:
        if self.sent >= len(self.pieces):
            raise StopAsyncIteration
        due = self.t0 + self.sent / self.tok_s
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        self.sent += 1
        return self.pieces[self.sent - 1]


class Client:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def generate(self, model: str, **body: Any) -> Stream:
        return self.stream


async def one_run(text: str, tok_s: float, seconds: float) -> dict[str, float]:
    from rich.control import Control
    from textual.widgets import Input

    from inferno_tui.app import InfernoApp
    from inferno_tui.connection import Settings
    from inferno_tui.store import ChatSettings, ChatStore

    data = Path(tempfile.mkdtemp(prefix="tui-bytes-"))
    store = ChatStore(data / "chats.sqlite3")  # earlier messages fill the log
    conv = store.create("bench", ChatSettings(model="gemma3-270m", max_tokens=4000))
    store.add_message(conv.id, "user", "Name the days of the week, one per line.")
    store.add_message(conv.id, "assistant", "\n".join(f"- day {i}" for i in range(20)))
    store.close()
    app = InfernoApp(Settings(endpoint=f"ipc://{data}/none.sock", data_dir=str(data)),
                     connect=False)
    written = [0]

    def display(screen: Any, renderable: Any) -> None:  # what App._display writes
        if renderable is not None and hasattr(renderable, "render_segments"):
            cursor = Control.move_to(*app.cursor_position).segment.text
            written[0] += len((renderable.render_segments(app.console) + cursor).encode())

    app._display = display  # type: ignore[method-assign]
    stream = Stream(text, tok_s)
    async with app.run_test(size=(80, 24), headless=True) as pilot:
        await pilot.press("c")
        await pilot.pause(0.5)
        chat = app.screen
        app.connection.client = Client(stream)  # type: ignore[assignment]
        chat.query_one("#chat-input", Input).value = "Go on."
        await pilot.press("enter")
        end = time.monotonic() + 60
        while time.monotonic() < end:  # until the reply fills the log
            header = [w for w in chat.query(".message-header")][-1]
            if header.region.y <= 3 and stream.sent > 2:
                break
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        b0, n0, t0 = written[0], stream.sent, time.monotonic()
        await pilot.pause(seconds)
        b1, n1, t1 = written[0], stream.sent, time.monotonic()
        await pilot.press("escape")
    return {"bytes_per_s": (b1 - b0) / (t1 - t0), "tok_s": (n1 - n0) / (t1 - t0),
            "bytes_per_token": (b1 - b0) / max(1, n1 - n0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tok-s", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", choices=sorted(TEXTS), default="list")
    ap.add_argument("--old", help="a checkout of the console from before, run alongside")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(asyncio.run(one_run(TEXTS[a.text], a.tok_s, a.seconds))))
        return
    sides = {"new": str(Path(__file__).resolve().parent.parent)}
    if a.old:
        sides["old"] = a.old
    results: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for r in range(a.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            env = {**os.environ, "PYTHONPATH": sides[name]}
            out = subprocess.run([sys.executable, __file__, "--one", "--tok-s", str(a.tok_s),
                                  "--seconds", str(a.seconds), "--text", a.text],
                                 env=env, capture_output=True, text=True, timeout=300,
                                 cwd=tempfile.gettempdir())
            if out.returncode:
                sys.exit(f"{name}: {out.stderr[-2000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, r, results[name][-1], flush=True)
    for name, rows in results.items():
        print(f"{name}: {a.text} at {median(x['tok_s'] for x in rows):.1f} tok/s: "
              f"{median(x['bytes_per_s'] for x in rows) / 1024:.2f} KB/s "
              f"(range {min(x['bytes_per_s'] for x in rows) / 1024:.2f}-"
              f"{max(x['bytes_per_s'] for x in rows) / 1024:.2f}), "
              f"{median(x['bytes_per_token'] for x in rows):.0f} bytes/token; "
              f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

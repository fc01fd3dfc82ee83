"""Text as it streams, written to the terminal as little as possible.

Over SSH every byte the console writes crosses the link. A Markdown widget re-rendered per
token repaints its whole last paragraph, and a log that scrolls by one line per new line
repaints the whole screen each time: about 1.2-1.8 KB per token. Here

- finished lines are separate one-line widgets that never change again;
- only the last line repaints, at most ``FLUSH_HZ`` times a second whatever the token rate;
- the widget keeps ``reserve`` blank lines below the text (its own background, no widget),
  so a new line costs two repainted lines, and a scroll that follows the text jumps by that
  reserve at once instead of repainting the screen for every line.

When the stream ends the chat replaces this with the message's Markdown, rendered once.
"""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from inferno_tui.widgets.status import update_if_changed

WORD = re.compile(r"\S+\s*|\s+")


def wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap of one paragraph (no newlines) into lines of at most ``width``
    characters; a word longer than a line is cut. Trailing spaces stay with their word, so
    the break of a line never depends on text that arrives after it."""
    lines: list[str] = []
    line = ""
    for m in WORD.finditer(text):
        word = m.group(0)
        while len(word.rstrip()) > width:  # a long word: cut it
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:width])
            word = word[width:]
        if line and len(line) + len(word.rstrip()) > width:
            lines.append(line)
            line = ""
        line += word
    lines.append(line)
    return lines


class StreamingText(Vertical):
    DEFAULT_CSS = """
    StreamingText { height: auto; }
    StreamingText > Static { height: 1; }
    """
    FLUSH_HZ = 10.0

    def __init__(self, reserve: int = 8, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reserve = max(1, reserve)
        self._tail = ""  # text after the last finished line
        self._dirty = False
        self._lines = 0  # finished lines mounted
        self._shown: list[str] = []  # their text
        self._current = Static("", classes="streaming-current")

    def compose(self) -> ComposeResult:
        yield self._current

    def on_mount(self) -> None:
        self._set_height()
        self.set_interval(1 / self.FLUSH_HZ, self.flush)

    @property
    def text_lines(self) -> int:
        """Lines of text so far, the current one included."""
        return self._lines + 1

    @property
    def shown(self) -> str:
        """The text on screen now (as wrapped), the current line included."""
        current = str(self._current.render()) if self.is_mounted else ""
        return "\n".join([*self._shown, current])

    def append(self, text: str) -> None:
        self._tail += text
        self._dirty = True

    def flush(self) -> None:
        """Show what arrived since the last flush: new finished lines are mounted once, the
        current line repaints."""
        if not self._dirty or not self.is_mounted:
            return
        self._dirty = False
        width = max(10, self.content_size.width or 78)
        *paragraphs, last = self._tail.split("\n")
        finished = [line.rstrip() for p in paragraphs for line in wrap(p, width)]
        last_lines = wrap(last, width)
        finished += [line.rstrip() for line in last_lines[:-1]]
        current = last_lines[-1]
        if finished:
            self.mount_all([Static(line) for line in finished], before=self._current)
            self._lines += len(finished)
            self._shown += finished
            self._tail = current
            self._set_height()
        update_if_changed(self._current, current)

    def _set_height(self) -> None:
        """Grow in steps of ``reserve`` lines: the widget's region (and so the screen around
        it) changes once per step, not once per line."""
        # the text plus a blank line at least: a new line lands in the blank, and when the
        # blank is used up the widget grows by ``reserve`` lines at once
        height = -(-(self.text_lines + 1) // self.reserve) * self.reserve
        if self.styles.height is None or self.styles.height.value != height:
            self.styles.height = height

"""Text as it streams, written to the terminal as little as possible.

Over SSH every byte the console writes crosses the link. A Markdown widget re-rendered per
token repaints its whole last paragraph; a widget mounted per new line makes Textual lay out
and repaint the whole screen (about 420 bytes per token at 60 tok/s). Here the live text is
one widget drawn line by line (Textual's Line API):

- lines are cached as wrapped text; a flush (at most ``FLUSH_HZ`` times a second, whatever
  the token rate) refreshes only the cells that changed: usually the end of the last line,
  so what crosses the link is that line up to the new text and a cursor move;
- the widget keeps blank lines below the text and grows ``reserve`` lines at a time up to
  ``max_height`` (the chat log's height). A growth is a layout, and Textual repaints the
  whole log twice for one (~4 KB at 80x24), so past ``max_height`` the widget stops growing
  and scrolls its own lines instead: a jump of ``reserve`` lines repaints the widget once,
  and at most once every ``MOVE_S`` seconds (lines that come faster wait for the next jump),
  so following the text costs the same whatever the token rate. While it streams, the
  reply's earlier lines are off screen; the Markdown that replaces it at the end has them all.

When the stream ends the chat replaces this with the message's Markdown, rendered once.
"""

from __future__ import annotations

import re
import time

from rich.cells import cell_len
from rich.segment import Segment
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

WORD = re.compile(r"\S+\s*|\s+")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # not \t, not \n: they would corrupt the screen


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


def changed_cells(old: str, new: str) -> tuple[int, int]:
    """The cells of a line that differ between two texts: (first column, width)."""
    i, n = 0, min(len(old), len(new))
    while i < n and old[i] == new[i]:
        i += 1
    start = cell_len(old[:i])
    return start, max(cell_len(old), cell_len(new)) - start


class StreamingText(Widget):
    DEFAULT_CSS = "StreamingText { height: auto; }"
    FLUSH_HZ = 10.0
    MOVE_S = 2.0

    def __init__(self, reserve: int = 8, max_height: int = 20, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_height = max(2, max_height)
        self.reserve = max(1, min(reserve, self.max_height - 1))
        self._text = ""  # everything so far
        self._done_chars = 0  # of _text, in finished (never rewrapped) lines
        self._finished: list[str] = []  # lines that no later text can change
        self._rows: list[str] = [""]  # what each line shows: the finished lines, then the rest
        self._width = 0  # that the lines were wrapped at
        self._top = 0  # the first row on screen
        self._dirty = False
        self._moved_at = float("-inf")

    def on_mount(self) -> None:
        self.styles.height = self._height()
        self.set_interval(1 / self.FLUSH_HZ, self.flush)

    @property
    def text_lines(self) -> int:
        """Lines of text so far, the current one included."""
        return len(self._rows)

    @property
    def top(self) -> int:
        """The first line on screen (past ``max_height`` the widget scrolls its lines)."""
        return self._top

    @property
    def shown(self) -> str:
        """The text so far as wrapped, the current line included."""
        return "\n".join(row.rstrip() for row in self._rows)

    def append(self, text: str) -> None:
        self._text += CONTROL.sub("", text.replace("\t", "    "))
        self._dirty = True

    def _wrap_width(self) -> int:
        return max(10, self.content_size.width or 78)

    def _rewrap(self, width: int) -> list[str]:
        """Wrap what is not finished yet; lines before the last paragraph's last line are
        finished (a later token cannot move their breaks)."""
        if width != self._width:  # resized: wrap everything again
            self._width, self._done_chars, self._finished = width, 0, []
        *paragraphs, last = self._text[self._done_chars:].split("\n")
        finished = [line for p in paragraphs for line in wrap(p, width)]
        last_lines = wrap(last, width)
        finished += last_lines[:-1]
        if finished:
            self._finished += finished
            self._done_chars = len(self._text) - len(last_lines[-1])
        return [*self._finished, last_lines[-1]]

    def flush(self) -> None:
        """Show what arrived since the last flush, repainting only the cells that changed."""
        if not self.is_mounted:
            return
        width = self._wrap_width()
        resized = width != self._width
        if self._dirty or resized:
            self._dirty = False
            old, new = self._rows, self._rewrap(width)
            self._rows = new
            if resized:
                full = self.size.height >= self.max_height
                self._top = max(0, len(new) - (self.max_height - self.reserve)) if full else 0
                self.refresh()
            else:
                regions = []
                for y in range(len(old) - 1, len(new)):
                    x, w = changed_cells(old[y] if y < len(old) else "", new[y])
                    if w and 0 <= y - self._top < self.size.height:
                        regions.append(Region(x, y - self._top, w, 1))
                if regions:
                    self.refresh(*regions)
        self._follow()

    def _follow(self) -> None:
        """Keep the last line on screen: grow by ``reserve`` lines up to ``max_height``, then
        jump the lines up by ``reserve``; either at most once every ``MOVE_S``."""
        have = self.styles.height.value if self.styles.height is not None else 0
        below = len(self._rows) - (self._top + int(have))
        now = time.monotonic()
        if below <= 0 or now - self._moved_at < self.MOVE_S:
            return
        self._moved_at = now
        if have < self.max_height:
            self.styles.height = self._height()
        else:
            self._top = len(self._rows) - (self.max_height - self.reserve)
            self.refresh()

    def render_line(self, y: int) -> Strip:
        style = self.rich_style
        row = self._top + y
        text = self._rows[row] if row < len(self._rows) else ""
        return Strip([Segment(text, style)]).crop_extend(0, self.content_size.width, style)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return self._height()

    def _height(self) -> int:
        """The text plus a blank line at least, in steps of ``reserve``, up to ``max_height``."""
        step = -(-(len(self._rows) + 1) // self.reserve) * self.reserve
        return min(self.max_height, step)

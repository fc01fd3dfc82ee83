"""A block of text lines that repaints only the lines that changed.

Textual repaints every line of an updated widget, so a panel of eight lines in one
``Static`` is written to the terminal in full whenever one number in it moves. Over SSH
every byte counts: :class:`Lines` keeps one ``Static`` per line and updates only those whose
text changed.
"""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import Static

from inferno_tui.widgets.status import update_if_changed


class Lines(Vertical):
    DEFAULT_CSS = """
    Lines { height: auto; }
    Lines > Static { height: auto; }
    """

    def set_lines(self, lines: list[Text]) -> None:
        have = list(self.query_children(Static))
        for widget, line in zip(have, lines, strict=False):
            update_if_changed(widget, line)
        if len(lines) > len(have):
            new = [Static() for _ in lines[len(have):]]
            for widget, line in zip(new, lines[len(have):], strict=True):
                update_if_changed(widget, line)
            self.mount_all(new)
        for widget in have[len(lines):]:
            widget.remove()

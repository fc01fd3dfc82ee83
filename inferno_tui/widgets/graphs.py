"""Text sparklines and bars: cheap to redraw, deterministic for snapshots, 256-colour safe."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"


def spark(values: Sequence[float], width: int, lo: float | None = 0.0,
          hi: float | None = None) -> str:
    """The last ``width`` values as block characters, scaled to [lo, hi] (auto if None)."""
    vals = list(values)[-width:]
    if not vals:
        return "·" * width
    low = min(vals) if lo is None else lo
    high = max(vals) if hi is None else hi
    if high <= low:
        high = low + 1.0
    out = []
    for v in vals:
        frac = min(1.0, max(0.0, (v - low) / (high - low)))
        out.append(BLOCKS[max(1, round(frac * (len(BLOCKS) - 1)))])
    return "·" * (width - len(vals)) + "".join(out)


def level_style(pct: float | None) -> str:
    if pct is None:
        return "dim"
    return "red" if pct >= 90 else "yellow" if pct >= 70 else "green"


def bar(pct: float | None, width: int) -> Text:
    """A horizontal gauge for a percentage; None shows an empty dim bar."""
    if pct is None:
        return Text("░" * width, "dim")
    filled = round(min(100.0, max(0.0, pct)) / 100 * width)
    t = Text("█" * filled, level_style(pct))
    t.append("░" * (width - filled), "dim")
    return t


def metric_line(label: str, values: Sequence[float], current: str, width: int,
                lo: float | None = 0.0, hi: float | None = None,
                pct: float | None = None) -> Text:
    """``label  ▁▂▃▅▇  current`` on one line."""
    t = Text(f"{label:<6}", "bold")
    t.append(spark(values, width, lo, hi), level_style(pct) if pct is not None else "cyan")
    t.append(f" {current}")
    return t

"""Formatting helpers: every missing or None value renders as "n/a"."""

from __future__ import annotations

from typing import Any

NA = "n/a"


def num(value: Any) -> float | None:
    """A float, or None for anything that is not a real number (None, str, bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if value != value else float(value)


def size(value: Any) -> str:
    v = num(value)
    if v is None:
        return NA
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return NA  # pragma: no cover


def size_short(value: Any) -> str:
    """Compact size for narrow table columns: 241M, 1.2G."""
    v = num(value)
    if v is None:
        return NA
    for unit in ("B", "K", "M", "G", "T"):
        if abs(v) < 1000 or unit == "T":
            return f"{v:.0f}{unit}" if v >= 10 or unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return NA  # pragma: no cover


def pct(value: Any) -> str:
    v = num(value)
    return NA if v is None else f"{v:.0f}%"


def fixed(value: Any, digits: int = 1, unit: str = "") -> str:
    v = num(value)
    return NA if v is None else f"{v:.{digits}f}{unit}"


def ms(value: Any) -> str:
    v = num(value)
    if v is None:
        return NA
    return f"{v:.0f}ms" if v < 10_000 else f"{v / 1000:.1f}s"


def secs(value: Any) -> str:
    v = num(value)
    if v is None:
        return NA
    if v < 60:
        return f"{v:.0f}s"
    if v < 3600:
        return f"{v // 60:.0f}m{v % 60:02.0f}s"
    return f"{v // 3600:.0f}h{(v % 3600) // 60:02.0f}m"


def count(value: Any) -> str:
    v = num(value)
    if v is None:
        return NA
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def text(value: Any) -> str:
    return NA if value is None or value == "" else str(value)

"""What the console's Pilot tests share: a bounded wait on the app, and a table cell as text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.widgets import DataTable


async def until(pilot: Any, cond: Callable[[], object], timeout: float = 60.0,
                what: str = "condition") -> None:
    """Let the app run until ``cond()`` holds, at most ``timeout`` seconds."""
    for _ in range(int(timeout / 0.1)):
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def cell(table: DataTable[Any], row: int, col: int) -> str:
    value = table.get_row_at(row)[col]
    return getattr(value, "plain", str(value))

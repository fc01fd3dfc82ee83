"""Background work is started from a function, never from a coroutine made in advance.

A worker cancelled before its task first ran (a newer one in its exclusive group, or the
console stopping) never awaits what it was given: a coroutine made in advance is then
collected unawaited and Python warns "coroutine ... was never awaited" at shutdown. A
function is only called once the worker runs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from textual.dom import DOMNode
from textual.worker import Worker


def start(node: DOMNode, work: Callable[[], Coroutine[Any, Any, None]], group: str, *,
          exclusive: bool = False) -> Worker[None]:
    """``node.run_worker`` for async work whose failures the work itself reports."""
    return node.run_worker(work, group=group, exclusive=exclusive, exit_on_error=False)

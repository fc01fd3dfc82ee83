"""A count per second over a sliding window: tokens generated "now", for status and the fleet."""

from __future__ import annotations

import time
from collections import deque


class RateWindow:
    """Events counted into one-second buckets; ``rate`` is their sum over the last
    ``window_s`` seconds divided by it. Memory is bounded by the window, not by traffic."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._buckets: deque[tuple[int, int]] = deque()  # (whole second, count)

    def add(self, n: int, now: float | None = None) -> None:
        sec = int(time.monotonic() if now is None else now)
        if self._buckets and self._buckets[-1][0] == sec:
            self._buckets[-1] = (sec, self._buckets[-1][1] + n)
        else:
            self._buckets.append((sec, n))
        self._prune(sec)

    def rate(self, now: float | None = None) -> float:
        sec = int(time.monotonic() if now is None else now)
        self._prune(sec)
        return sum(n for s, n in self._buckets if s < sec + 1) / self.window_s

    def _prune(self, sec: int) -> None:
        while self._buckets and self._buckets[0][0] <= sec - self.window_s:
            self._buckets.popleft()

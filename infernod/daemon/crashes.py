"""The crash-loop guard: why a model's runner last died and when it died recently.

``ModelManager`` keeps one record per model whose runner died: the n-th reload within
CRASH_WINDOW_S waits 2**(n-1) s (at most BACKOFF_MAX_S); CRASH_LIMIT crashes within the
window refuse loads until it passes or an operator loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infernod.protocol import bodies

CRASH_WINDOW_S = 300.0  # crashes older than this are forgotten
CRASH_LIMIT = 3  # this many crashes within the window: loads are refused
BACKOFF_MAX_S = 30.0  # wait before the n-th reload after a crash: 2**(n-1) s, at most this


@dataclass
class CrashRecord:
    """Why a model's runner last died, and when it died recently (the crash-loop guard)."""

    reason: str
    signal: str
    at: float  # monotonic, the newest crash
    at_wall: float
    times: list[float] = field(default_factory=list)  # monotonic, within CRASH_WINDOW_S
    current: bool = True  # no successful load since: the model shows as "failed"

    def prune(self, now: float) -> int:
        self.times = [t for t in self.times if now - t < CRASH_WINDOW_S]
        return len(self.times)

    def backoff_s(self, now: float) -> float:
        n = self.prune(now)
        if not n:
            return 0.0
        return max(0.0, self.at + min(BACKOFF_MAX_S, 2.0 ** (n - 1)) - now)

    def refused_for_s(self, now: float) -> float:
        """Seconds loads stay refused (0: not refused)."""
        if self.prune(now) < CRASH_LIMIT:
            return 0.0
        return max(0.0, self.times[-CRASH_LIMIT] + CRASH_WINDOW_S - now)

    def to_wire(self, name: str, now: float) -> bodies.ModelFailure:
        return {"name": name, "state": "failed" if self.current else "available",
                "failed_reason": self.reason, "failed_signal": self.signal or None,
                "failed_at": self.at_wall, "crashes": self.prune(now),
                "loads_refused_for_s": round(self.refused_for_s(now), 1)}

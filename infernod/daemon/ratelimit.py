"""Token buckets per client session and per peer (uid or key): pure, time passed in.

A session is cheap to make (a client picks a random one), so the per-peer bucket is what
actually stops one user who opens many sessions; the per-session bucket keeps one noisy
script from using up its user's whole allowance. Both are charged for every message. The
daemon keys a session's bucket by principal *and* session id: session ids are public, and
another user naming yours must spend their own allowance, never yours.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infernod.config import SecurityConfig


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token; return 0.0, or the seconds until one is available (none taken)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full_at(self) -> float:
        return self.stamp + (self.burst - self.tokens) / self.rate


class KeyedBuckets:
    """Buckets by key, bounded: full (idle) buckets are dropped, then the least recent."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, rate: float, burst: float, now: float) -> float:
        if rate <= 0:
            return 0.0
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_keys:
                self.prune(now)
            b = self.buckets[key] = TokenBucket(rate, burst, now)
        else:
            self.buckets.move_to_end(key)
            b.rate, b.burst = rate, burst  # SIGHUP may have changed them
        return b.take(now)

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled (same as new); evict the oldest past max_keys."""
        for key in [k for k, b in self.buckets.items() if b.full_at() <= now]:
            del self.buckets[key]
        while len(self.buckets) >= self.max_keys:
            self.buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self.buckets)


class RateLimiter:
    """Per-peer and per-session buckets; ``security`` is read at each call (SIGHUP applies).

    ``peer`` is charged for every message, parseable or not (a flood of garbage pays too);
    ``session`` once the header names one. Each returns seconds to wait (0.0 = go ahead).
    """

    def __init__(self, get_security: Callable[[], SecurityConfig]) -> None:
        self._get = get_security
        self.peers = KeyedBuckets(10_000)
        self.sessions = KeyedBuckets(100_000)
        self.limited = 0

    def peer(self, key: str, now: float) -> float:
        s = self._get()
        return self._count(self.peers.take(key, s.rate_limit_peer_per_s,
                                           s.rate_limit_peer_burst, now))

    def session(self, key: str, now: float) -> float:
        s = self._get()
        return self._count(self.sessions.take(key, s.rate_limit_per_s, s.rate_limit_burst, now))

    def _count(self, wait: float) -> float:
        if wait:
            self.limited += 1
        return wait

    def prune(self, now: float) -> None:
        self.peers.prune(now)
        self.sessions.prune(now)

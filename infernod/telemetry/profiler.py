"""Per-request profiles: where a request's time went, what it cost, kept and summarised.

The server fills a :class:`RequestProfile` as the request moves through admission, the queue,
model load, tokenize, prefill and decode, then calls :meth:`Profiler.finish`, which keeps it in
a bounded ring buffer (for ``profiles`` queries) and feeds each timing into
:class:`~infernod.telemetry.stats.LatencyStats`. The server publishes ``profile.to_dict()`` on
the ``profiles`` topic. No I/O, no clock reads: ``now`` is passed in.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np

from infernod.protocol.bodies import Profile
from infernod.telemetry.stats import LatencyStats

# Profile fields recorded into the statistics, under the same metric name.
STAT_FIELDS: tuple[str, ...] = (
    "queue_wait_ms",
    "load_wait_ms",
    "tokenize_ms",
    "prefill_ms",
    "decode_ms",
    "detokenize_ms",
    "ttft_ms",
    "e2e_ms",
    "tokens_per_s",
)


def summarize_itl(gaps_ms: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "p50", "p95", "max"}`` of one request's inter-token gaps (None if < 1 gap).

    Exact (numpy), because one request has at most a few thousand gaps.
    """
    if len(gaps_ms) == 0:
        return None
    a = np.asarray(gaps_ms, dtype=float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


@dataclass
class RequestProfile:
    """One finished request. Times in milliseconds, sizes in bytes, energy in joules; a field
    that does not apply (no model load, no GPU, a cancelled request's missing TTFT) is None.
    ``started_at``/``finished_at`` are wall-clock seconds (for display and ordering)."""

    request_id: str
    client: str | None = None
    model: str | None = None
    priority: str | None = None
    queue_wait_ms: float | None = None
    load_wait_ms: float | None = None
    tokenize_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    detokenize_ms: float | None = None
    ttft_ms: float | None = None
    itl_ms: dict[str, float] | None = None  # {"mean", "p50", "p95", "max"}, see summarize_itl
    e2e_ms: float | None = None
    prompt_tokens: int = 0
    prompt_cached_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_s: float | None = None
    finish_reason: str | None = None
    rss_bytes_start: int | None = None
    rss_bytes_end: int | None = None
    gpu_memory_bytes_start: int | None = None
    gpu_memory_bytes_end: int | None = None
    energy_j: float | None = None  # None without NVML power readings
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> Profile:
        """The ``profiles`` topic payload (its fields are bodies.Profile's, in order:
        tests/test_bodies.py checks)."""
        return cast(Profile, asdict(self))


class Profiler:
    """Ring buffer of the last ``ring_size`` profiles plus the statistics they feed.

    Thread-safe (the event loop writes, the Prometheus thread may read via ``stats``).
    """

    def __init__(self, ring_size: int = 1000, stats: LatencyStats | None = None) -> None:
        if ring_size < 1:
            raise ValueError("ring_size must be >= 1")
        self.stats = stats if stats is not None else LatencyStats()
        self._ring: deque[RequestProfile] = deque(maxlen=ring_size)
        self._lock = threading.Lock()
        self.finished_total = 0

    @property
    def ring_size(self) -> int:
        return self._ring.maxlen or 0

    def finish(
        self,
        profile: RequestProfile,
        now: float,
        itl_samples_ms: Sequence[float] | None = None,
    ) -> None:
        """Keep ``profile`` and record its timings at ``now`` (the stats clock).

        ``itl_samples_ms``: the request's individual inter-token gaps; when given they all go
        into the ``itl_ms`` distribution (token-weighted, what ITL percentiles mean) and
        ``profile.itl_ms`` is filled from them if empty. Without them the request's mean ITL
        is recorded once.
        """
        self.keep(profile, itl_samples_ms)
        self.record(profile, now, itl_samples_ms)

    def keep(self, profile: RequestProfile,
             itl_samples_ms: Sequence[float] | None = None) -> None:
        """The cheap half of ``finish``: fill ``profile.itl_ms`` and keep it in the ring."""
        if itl_samples_ms is not None and profile.itl_ms is None:
            profile.itl_ms = summarize_itl(itl_samples_ms)
        with self._lock:
            self._ring.append(profile)
            self.finished_total += 1

    def record(self, profile: RequestProfile, now: float,
               itl_samples_ms: Sequence[float] | None = None) -> None:
        """The costly half of ``finish`` (a sketch update per value, label and window:
        ~1.5 ms for 64 inter-token gaps): the timings into the statistics."""
        labels = {"model": profile.model, "priority": profile.priority}
        for name in STAT_FIELDS:
            self.stats.record(name, getattr(profile, name), labels, now)
        if itl_samples_ms:
            self.stats.record_many("itl_ms", itl_samples_ms, labels, now)
        elif profile.itl_ms is not None:
            self.stats.record("itl_ms", profile.itl_ms.get("mean"), labels, now)

    def recent(self, n: int | None = None) -> list[RequestProfile]:
        """The last ``n`` profiles (all kept when None), oldest first."""
        with self._lock:
            items = list(self._ring)
        if n is None:
            return items
        return items[-n:] if n > 0 else []

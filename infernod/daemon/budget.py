"""Bytes held for requests, per principal and in total: the memory bound ZeroMQ cannot give.

ZeroMQ's high-water marks count messages, not bytes, and ``ZMQ_MAXMSGSIZE`` bounds one
message: 10,000 queued messages of 4 MiB each would be 40 GiB. So the daemon takes every
message out of ZeroMQ at once and charges its size here *before* decoding it; a request
whose bytes would take its principal (or the daemon) over the limit is refused at once
(``busy``, or ``too_large`` when it could never fit) and its frames are freed.

A charge (:class:`Hold`) lasts as long as the request holds memory: while its handler runs,
and for a generation until it finishes (its prompt waits in the queue). Event-loop thread
only, like everything that admits requests.
"""

from __future__ import annotations

from collections.abc import Callable

from infernod.protocol.errors import InfernoError

BUSY_RETRY_MS = 1000  # when held bytes will fall is unknown: a short, honest guess


class Hold:
    """Bytes charged to one principal; :meth:`release` gives them back (once)."""

    __slots__ = ("_ledger", "key", "size")

    def __init__(self, ledger: ByteLedger | None, key: str, size: int) -> None:
        self._ledger = ledger
        self.key = key
        self.size = size

    def release(self) -> None:
        if self._ledger is not None:
            self._ledger._release(self.key, self.size)
            self._ledger = None


class ByteLedger:
    """Bytes of requests received and not finished, per principal and over all of them.

    ``limits()`` returns ``(per_principal, total)`` and is read at every charge, so a SIGHUP
    applies at once; lowering a limit refuses new requests only.
    """

    def __init__(self, limits: Callable[[], tuple[int, int]]) -> None:
        self._limits = limits
        self.by_key: dict[str, int] = {}
        self.total = 0

    def charge(self, key: str, size: int) -> Hold:
        per_key, total = self._limits()
        if size > per_key or size > total:
            limit, name = ((per_key, "daemon.max_held_bytes_per_principal") if per_key <= total
                           else (total, "daemon.max_held_bytes_total"))
            raise InfernoError(
                "too_large", f"a request of {size} bytes is over {name} ({limit} bytes)",
                "send less in one request (split the prompts over several jobs), or ask "
                f"the operator to raise {name}", limit_bytes=limit)
        mine = self.by_key.get(key, 0)
        if mine + size > per_key:
            raise InfernoError(
                "busy", f"your unfinished requests hold {mine} bytes; this one ({size} bytes) "
                        f"would pass your limit of {per_key}",
                "wait for your running and queued requests to finish, then retry",
                retry_after_ms=BUSY_RETRY_MS, held_bytes=mine, limit_bytes=per_key,
                scope="principal")
        if self.total + size > total:
            raise InfernoError(
                "busy", f"the daemon holds {self.total} bytes of unfinished requests; this one "
                        f"({size} bytes) would pass its limit of {total}",
                "the daemon is busy with other clients' large requests; retry shortly",
                retry_after_ms=BUSY_RETRY_MS, held_bytes=self.total, limit_bytes=total,
                scope="total")
        self.by_key[key] = mine + size
        self.total += size
        return Hold(self, key, size)

    def _release(self, key: str, size: int) -> None:
        left = self.by_key.get(key, 0) - size
        if left > 0:
            self.by_key[key] = left
        else:
            self.by_key.pop(key, None)
        self.total = max(0, self.total - size)

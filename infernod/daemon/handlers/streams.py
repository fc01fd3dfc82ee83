"""``stream.fetch``: a request's buffered events, for a client that missed some."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infernod.config import Config
from infernod.daemon.publisher import Publisher
from infernod.daemon.server import Call
from infernod.protocol.errors import InfernoError

FETCH_MAX_EVENTS = 4096  # events per reply; ``more`` says whether the stream holds more


class StreamHandlers:
    def __init__(self, cfg: Callable[[], Config], publisher: Publisher) -> None:
        self.cfg = cfg
        self.publisher = publisher

    async def fetch(self, req: Call) -> dict[str, Any]:
        """A stream's buffered events: its owner's (the principal that started it) or an
        operator's to read. Someone else's stream answers like a missing one, so request
        ids cannot be probed; the check comes before any work."""
        rid = req.body["request_id"]
        stream = self.publisher.fetch(rid)
        if stream is None or (not req.acts_for(stream.owner, stream.via)
                              and req.role != "operator"):
            retention = self.cfg().daemon.stream_retention_s
            raise InfernoError("unknown_request", f"no stream {rid} of yours (finished more "
                               f"than {retention:.0f}s ago, never existed, or another user's)")
        from_seq = req.body.get("from_seq") or 0
        events = [{"seq": seq, "type": h["type"], "body": body}
                  for seq, h, body in stream.since(from_seq, FETCH_MAX_EVENTS)]
        return {"request_id": rid, "events": events, "first_seq": stream.dropped_before,
                "finished": stream.finished_at is not None,
                "more": bool(events) and events[-1]["seq"] < stream.next_seq - 1}

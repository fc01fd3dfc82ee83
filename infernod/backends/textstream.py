"""Turning a stream of token bytes into safe text deltas. Pure Python, no native imports.

A token is a byte string that may end in the middle of a UTF-8 character, and a stop string
may be split over several tokens. :class:`TextStream` sits between the detokenizer and the
client: it only releases text that is complete UTF-8 and cannot be the start of a stop string.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """Finds stop strings across chunk boundaries.

    Text that could still grow into a stop string is held back, so a stop string (or a prefix
    of it) is never emitted to the client.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._held_suffix_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text (the stream ended without completing a stop string)."""
        out, self._held = self._held, ""
        return out

    def _held_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """UTF-8 reassembly plus stop-string hold-back for one generation."""

    def __init__(self, stops: list[str]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopMatcher(stops)
        self.stopped = False

    def seed(self, data: bytes) -> None:
        """Feed bytes that were already delivered (resumed generation): keep only their
        incomplete UTF-8 tail, so the next token completes the character correctly."""
        self._utf8.decode(data)

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return text that is safe to emit now."""
        text = self._utf8.decode(data)
        if not text:
            return ""
        out, self.stopped = self._stop.push(text)
        return out

    def flush(self) -> str:
        """End of stream: release everything held back (broken bytes become U+FFFD)."""
        if self.stopped:
            return ""
        return self._stop.push(self._utf8.decode(b"", final=True))[0] + self._stop.flush()

    def flush_stop_holdback(self) -> str:
        """Release text held back for a possible stop string but keep incomplete UTF-8
        bytes (preemption: the resumed run re-creates those bytes from its tokens)."""
        return self._stop.flush()

"""Errors in words: what failed, why (in the user's terms) and what to do.

Everything the console shows about a failure goes through here, so no exception class name,
Python repr or libzmq string ("Socket operation on non-socket") reaches the screen. A daemon
refusal carries its stable code, message and hint; a lost daemon says since when and how to
check it; a local file problem says which file and why.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from infernod.protocol.errors import DaemonUnavailable, InfernoError

LOST_HINT = "is it running? systemctl status infernod"


@dataclass(frozen=True)
class Words:
    what: str  # what failed: "loading gemma3-270m", "the chat request"
    why: str  # in the user's terms
    todo: str  # what to do
    code: str = ""  # the daemon's stable error code, when it gave one

    @property
    def title(self) -> str:
        return f"{self.what} failed" + (f" ({self.code})" if self.code else "")

    @property
    def body(self) -> str:
        return f"{self.why}\n{self.todo}" if self.todo else self.why

    @property
    def line(self) -> str:
        """One line for a notice or a status: why, then what to do."""
        return f"{self.what} failed: {self.why}" + (f"; {self.todo}" if self.todo else "")

    @property
    def short(self) -> str:
        """A few words for a message header (a chat reply that ended in an error)."""
        return self.code or "daemon lost"


def clock(wall: float | None) -> str:
    return time.strftime("%H:%M", time.localtime(wall if wall is not None else time.time()))


def lost(since: float | None = None) -> str:
    return f"not answering since {clock(since)}; {LOST_HINT}"


def restarted(loading: str | None, after_s: float | None) -> str:
    """Said once a daemon came back with a new boot id."""
    what = f"infernod restarted while loading {loading}" if loading else "infernod restarted"
    if after_s is not None:
        what += f"; it restarted {after_s:.0f} s later"
    return what + " (loaded models and running requests were lost)"


def _os_words(what: str, e: OSError) -> Words:
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    reason = os.strerror(e.errno).lower() if e.errno else "it could not be used"
    todo = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions", errno.EISDIR: "give a file, not a folder",
            errno.ENOSPC: "free some disk space"}.get(e.errno or 0, "check the path")
    return Words(what, f"file{where}: {reason}", todo)


def in_words(e: BaseException, what: str = "the request",
             down_since: float | None = None) -> Words:
    """Turn any exception into words fit for the screen (never its class name)."""
    if isinstance(e, DaemonUnavailable):
        return Words(what, f"the daemon is {lost(down_since).split(';')[0]}",
                     LOST_HINT, e.code)
    if isinstance(e, InfernoError):
        hint = e.hint or ""
        return Words(what, e.message.rstrip("."), hint, e.code)
    if isinstance(e, OSError) and getattr(e, "filename", None):
        return _os_words(what, e)
    try:  # libzmq's strings say nothing to a user: a socket problem means the daemon is gone
        import zmq

        if isinstance(e, zmq.ZMQError):
            return Words(what, "the connection to the daemon broke", LOST_HINT, "unavailable")
    except ImportError:  # pragma: no cover - the client needs pyzmq
        pass
    if isinstance(e, TimeoutError):
        return Words(what, "the daemon did not answer in time", LOST_HINT, "timeout")
    if isinstance(e, ConnectionError | OSError):
        return Words(what, "the connection to the daemon broke", LOST_HINT, "unavailable")
    if isinstance(e, ValueError):
        return Words(what, f"the input was not understood ({e})", "check what you typed")
    return Words(what, "something unexpected went wrong in the console",
                 "try again; if it repeats, report what you did")

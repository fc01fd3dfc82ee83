"""The sd_notify protocol, implemented directly: one datagram to $NOTIFY_SOCKET per message.

No libsystemd binding is needed: the protocol is newline-separated VAR=VALUE pairs sent as a
single datagram to the AF_UNIX socket named in $NOTIFY_SOCKET ('@' = abstract namespace).
Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("infernod.daemon.systemd")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def watchdog_usec(self) -> int:
        """$WATCHDOG_USEC when it is meant for this process, else 0."""
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return 0
        try:
            return int(os.environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return 0

    def notify(self, **fields: object) -> bool:
        """Send e.g. notify(READY=1, STATUS='serving'). Never raises: logs once on failure."""
        if self._sock is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        addr = self.address
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            self._sock.sendto(payload, target)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", addr, e)
                self._warned = True
            return False

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> None:
        self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def stopping(self, status: str = "stopping") -> None:
        self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""Raw ZeroMQ sockets for tests and benches that bypass `Client` on purpose.

Every socket made here has a send and a receive timeout and LINGER 0: a daemon that refuses
the handshake (ZAP), is gone, or never answers makes ``send``/``recv`` raise ``zmq.Again``
within ``timeout_ms`` instead of blocking the test until pytest-timeout kills the whole run.
tests/test_hygiene.py checks that no test or bench creates a zmq socket any other way.
"""

from __future__ import annotations

import zmq

DEFAULT_TIMEOUT_MS = 5000


def raw_socket(endpoint: str | None = None, kind: int = zmq.DEALER, *,
               ctx: zmq.Context | None = None, timeout_ms: int = DEFAULT_TIMEOUT_MS,
               curve: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
    """A socket of ``kind`` with SNDTIMEO/RCVTIMEO ``timeout_ms``, connected to ``endpoint``.

    ``curve`` is (server_public, client_public, client_secret), z85 or raw.
    """
    s = (ctx or zmq.Context.instance()).socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    if endpoint is not None:
        s.connect(endpoint)
    return s


def answered(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 1500) -> bool:
    """Send ``frames``; True if anything comes back within ``timeout_ms``.

    A send that cannot even be queued (no peer: the handshake was refused) counts as no answer.
    """
    try:
        sock.send_multipart(frames)
    except zmq.Again:
        return False
    return bool(sock.poll(timeout_ms))

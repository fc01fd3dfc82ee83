"""The test suite itself must never hang: a hung test blocks CI for its whole timeout.

Every raw ZeroMQ socket in tests/ and bench/ comes from tests/rawsock.py, which gives it
SNDTIMEO/RCVTIMEO, or is made in a function that sets both itself: a DEALER whose handshake the daemon refused otherwise blocks forever in
``send_multipart`` (test_ipc_uid_roles did, for 300 s).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import zmq
from rawsock import answered, raw_socket

ROOT = Path(__file__).resolve().parent.parent


def _is_zmq(node: ast.expr) -> bool:
    """``zmq.X`` or ``zmq.asyncio.X`` (socket types and classes live there)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "zmq"


def _creates_socket(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    f = node.func
    return bool((f.attr == "socket" and node.args and _is_zmq(node.args[0]))  # ctx.socket(zmq.X)
                or (f.attr == "Socket" and _is_zmq(f.value)))  # zmq.Socket(ctx, zmq.X)


def _raw_zmq_sockets(path: Path) -> list[int]:
    """Lines that make a zmq socket in a function that does not set both timeouts."""
    source = path.read_text()
    lines: list[int] = []

    def visit(node: ast.AST, sets_both: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            text = (ast.get_source_segment(source, node) or "").upper()
            sets_both = "SNDTIMEO" in text and "RCVTIMEO" in text
        if _creates_socket(node) and not sets_both:
            lines.append(node.lineno)  # type: ignore[attr-defined]
        for child in ast.iter_child_nodes(node):
            visit(child, sets_both)

    visit(ast.parse(source, str(path)), False)
    return lines


def test_no_test_or_bench_makes_a_zmq_socket_without_timeouts():
    found = {str(p.relative_to(ROOT)): lines
             for p in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")])
             if p.name != "rawsock.py" and (lines := _raw_zmq_sockets(p))}
    assert not found, ("a zmq socket without SNDTIMEO and RCVTIMEO set in the same function; "
                       f"use rawsock.raw_socket: {found}")


def test_raw_socket_send_to_no_peer_fails_fast(tmp_path):
    # IMMEDIATE: no pipe until a connection completes, the state a refused handshake leaves;
    # without SNDTIMEO this send blocks forever.
    ctx = zmq.Context()
    s = raw_socket(ctx=ctx, timeout_ms=200)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.connect(f"ipc://{tmp_path}/nobody-listens.sock")
    try:
        with pytest.raises(zmq.Again):
            s.send_multipart([b"x"])
        assert answered(s, [b"x"], timeout_ms=100) is False
        with pytest.raises(zmq.Again):
            s.recv_multipart()
    finally:
        s.close(0)
        ctx.term()

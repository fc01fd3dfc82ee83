"""The client's public surface: ``events()`` for subscribers, the sans-I/O core's notices,
and no one outside the client modules driving it through its private names."""

from __future__ import annotations

import ast
import asyncio
import json
import time
from pathlib import Path

import pytest

from infernod.client import AsyncClient, ClientCore, Event, Notice
from infernod.protocol.errors import DaemonUnavailable

ROOT = Path(__file__).resolve().parent.parent
CLIENT_MODULES = sorted((ROOT / "infernod" / "client").glob("*.py"))


def _private_names() -> set[str]:
    """Methods and attributes the client modules define with a leading underscore."""
    names: set[str] = set()
    for path in CLIENT_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self" and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_nothing_outside_the_client_uses_its_private_names():
    private = _private_names()
    assert {"_pump", "_streams", "_waiters"} <= private
    found = []
    paths = [*(p for p in ROOT.glob("infernod/**/*.py") if p.parent.name != "client"),
             *ROOT.glob("inferno_tui/**/*.py"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not found, found


def _ev(topic: str, seq: int, boot: str = "b1", type_: str | None = None) -> Event:
    return Event(topic, type_ or topic, seq, boot, {})


def test_the_core_says_when_a_topic_lost_events_and_when_the_daemon_restarted():
    clock = [0.0]
    core = ClientCore(clock=lambda: clock[0])
    core.on_event(_ev("queue", 3))  # before the welcome: its state is newer, no gap
    core.on_event(Event("welcome.s", "welcome", 0, "b1",
                        {"seqs": {"queue": 7, "heartbeat": 40}, "state": {}}))
    core.on_event(_ev("queue", 7))
    core.on_event(_ev("queue", 10))  # 8 and 9 dropped at the high-water mark
    got = core.take_events()
    assert [type(e).__name__ for e in got] == ["Event", "Event", "Notice", "Event"]
    gap = got[2]
    assert isinstance(gap, Notice) and gap.kind == "events_lost" and gap.topic == "queue" \
        and gap.lost == 2
    assert core.take_events() == [] and not core.restarted
    core.on_event(_ev("heartbeat", 0, boot="b2"))  # a new daemon: seqs start again
    core.on_event(_ev("queue", 0, boot="b2"))
    got = core.take_events()
    assert isinstance(got[0], Notice) and got[0].kind == "daemon_restarted"
    assert got[0].boot_id == "b2" and core.restarted
    assert not any(isinstance(e, Notice) and e.kind == "events_lost" for e in got)
    clock[0] += 3.5  # three heartbeats of silence while listening
    core.listened(waited_s=3.5)
    with pytest.raises(DaemonUnavailable):
        core.check_alive()


def test_events_yields_topics_and_the_restart_notice(daemon):
    with daemon.client(topics=("queue", "models")) as c:
        assert c.ping()["pong"]
        first = [ev for ev in c.events(timeout=1.5)]
        assert any(isinstance(ev, Event) and ev.topic == "heartbeat" for ev in first)
        boot = c.boot_id
        daemon.stop()
        daemon.start()
        seen: list[Event | Notice] = []
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(isinstance(e, Notice) for e in seen):
            try:
                seen += c.event_batch(0.2)
            except DaemonUnavailable:
                pass  # the gap between the two daemons may outlast three heartbeats
        notice = next(e for e in seen if isinstance(e, Notice))
        assert notice.kind == "daemon_restarted" and notice.boot_id != boot
        assert c.restarted and c.ping()["pong"]


def test_async_events_iterates_with_a_timeout(daemon):
    async def main() -> list[Event | Notice]:
        async with AsyncClient(daemon.endpoint, timeout=10, topics=("queue",)) as ac:
            return [ev async for ev in ac.events(timeout=1.5)]

    got = asyncio.run(main())
    assert any(isinstance(ev, Event) and ev.topic == "heartbeat" for ev in got)


def test_inferno_watch_prints_events_through_the_public_iterator(daemon, capsys):
    from infernod.cli import app as cli

    assert cli.main(["--endpoint", daemon.endpoint, "watch", "--json", "--topic", "queue",
                     "--duration", "1.5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(line.get("topic") == "heartbeat" for line in lines), lines

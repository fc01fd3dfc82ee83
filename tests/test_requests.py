"""The request record: one state enum whose moves are only the lifecycle's, stamped in time."""

from __future__ import annotations

import pytest

from infernod.daemon.requests import ALLOWED, IllegalTransition, Kind, Request, State


def _req(kind: Kind = Kind.GENERATE) -> Request:
    return Request(request_id="s.1", kind=kind, session="s", model="m", body={},
                   priority="normal", submitted=1.0, deadline=None, timeout_s=30)


def test_the_lifecycle_moves_and_stamps_its_times() -> None:
    r = _req()
    assert r.state is State.QUEUED and r.admitted_at is None
    r.move(State.RUNNING, 2.0)
    assert (r.admitted_at, r.last_event_at) == (2.0, 2.0)
    r.move(State.QUEUED, 3.0)  # preempted
    r.move(State.RUNNING, 4.0)  # resumed: admitted_at is the latest pick
    assert r.admitted_at == 4.0
    r.move(State.DONE, 5.0)
    assert r.finished_at == 5.0


@pytest.mark.parametrize("start,to", [(s, t) for s in State for t in State
                                      if t not in ALLOWED[s]])
def test_every_other_move_is_refused(start: State, to: State) -> None:
    r = _req()
    path = {State.QUEUED: [], State.RUNNING: [State.RUNNING], State.DONE: [State.DONE]}[start]
    for step in path:
        r.move(step, 1.0)
    with pytest.raises(IllegalTransition):
        r.move(to, 2.0)
    assert r.state is start


def test_kinds_differ_only_in_the_runner_and_the_wire_name() -> None:
    assert [k.generates for k in Kind] == [True, True, False, False]
    assert [k.wire for k in Kind] == ["generate", "generate", "embed", "infer"]
    assert _req(Kind.EMBED).op == "embed"
    # the state is a str on the wire (queue rows, msgpack) and compares like one
    assert State.RUNNING == "running" and f"{State.DONE}" == "done"

"""The shared bodies (infernod/protocol/bodies.py) are what the daemon really sends, what the
readers parse and what docs/protocol.md describes: a shape that drifts in any one of the
three fails here. And the vocabulary is declared once."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from infernod.client import Event
from infernod.protocol import bodies, vocabulary
from infernod.protocol.bodies import (
    BODIES,
    LoadedModel,
    MetricsSample,
    ModelFailure,
    ModelState,
    Profile,
    QueuedEvent,
    QueueRow,
    QueueSnapshot,
    missing_fields,
    unknown_fields,
)

MODEL = "gemma3-270m"
DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


# -- the vocabulary ----------------------------------------------------------------------------
def test_vocabulary_is_declared_once_and_used_everywhere():
    from inferno_tui import views
    from infernod import config
    from infernod.cli import jobs as cli_jobs
    from infernod.daemon import generation, jobstore, scheduler
    from infernod.daemon.handlers import jobs
    from infernod.protocol import messages

    P = vocabulary.PRIORITIES
    assert messages.PRIORITIES is P and scheduler.PRIORITIES is P and jobstore.PRIORITIES is P
    assert cli_jobs.PRIORITIES is P and views.PRIORITIES is P
    assert config.SecurityConfig.__dataclass_fields__["max_priority"].metadata["choices"] is P
    assert messages.JOB_STATES is vocabulary.JOB_STATES is jobstore.JOB_STATES
    assert cli_jobs.JOB_STATES is vocabulary.JOB_STATES
    assert generation.SAMPLING_KEYS is vocabulary.SAMPLING_KEYS
    # The request schemas accept exactly the generation parameters, in the same order.
    assert tuple(messages._SAMPLING) == vocabulary.GENERATION_PARAMS
    for type_ in ("generate", "jobs.submit"):
        assert set(vocabulary.GENERATION_PARAMS) <= set(messages.SCHEMAS[type_])
        assert messages.SCHEMAS[type_]["priority"].choices is P
    assert set(jobs.PARAM_KEYS) >= set(vocabulary.GENERATION_PARAMS)


# -- reading: tolerant both ways ---------------------------------------------------------------
def test_queue_rows_of_either_old_spelling_parse_to_the_one_shape():
    old_list = {"id": "s.1", "kind": "generate", "client": "me", "model": "m", "class": "low",
                "effective_class": "normal", "critical": False, "state": "queued",
                "position": 2, "age_s": 1.5, "deadline_in_s": None, "tokens": 0, "job": None,
                "preempted": False}
    old_topic = {"request_id": "s.1", "kind": "generate", "client": "me", "session": "s",
                 "model": "m", "priority": "low", "state": "queued", "age_s": 1,
                 "deadline_in_s": None, "tokens": 0, "job": None, "future_field": [1]}
    for old in (old_list, old_topic):
        row = bodies.queue_row_from_wire(old)
        assert not missing_fields(QueueRow, row), missing_fields(QueueRow, row)
        assert row["request_id"] == row["id"] == "s.1"
        assert row["priority"] == row["class"] == "low"
    assert bodies.queue_row_from_wire(old_topic)["future_field"] == [1]  # passes through
    assert isinstance(bodies.queue_row_from_wire(old_topic)["age_s"], float)
    snap = bodies.queue_snapshot_from_wire({"items": [old_list, old_topic], "running": 0,
                                            "waiting": 2, "level": "healthy"})
    assert not missing_fields(QueueSnapshot, snap) and snap["queued"] == 2


def test_parsers_fill_what_an_older_daemon_did_not_send_and_drop_wrong_types():
    for shape, parse in ((QueueRow, bodies.queue_row_from_wire),
                         (ModelState, bodies.model_state_from_wire),
                         (LoadedModel, bodies.loaded_model_from_wire),
                         (ModelFailure, bodies.model_failure_from_wire),
                         (MetricsSample, bodies.metrics_sample_from_wire),
                         (Profile, bodies.profile_from_wire)):
        for raw in ({}, None, {"name": 5, "state": None, "system": "x", "itl_ms": 3}):
            got = parse(raw)
            assert not missing_fields(shape, got), (shape.__name__, missing_fields(shape, got))
    row = bodies.model_state_from_wire({"name": "m", "runner_pid": "x", "pinned": True})
    assert "runner_pid" not in row and row["pinned"] is True  # optional: dropped, not faked


def test_the_profile_type_is_the_profilers_record():
    from dataclasses import fields

    from infernod.telemetry.profiler import RequestProfile

    assert [f.name for f in fields(RequestProfile)] == bodies.field_names(Profile)
    p = RequestProfile("s.1", client="s", model=MODEL, priority="normal", ttft_ms=3.0,
                       itl_ms={"mean": 1.0, "p50": 1.0, "p95": 2.0, "max": 3.0})
    assert not missing_fields(Profile, p.to_dict()) and not unknown_fields(Profile, p.to_dict())


def test_gpu_samples_match_the_metrics_shape():
    from fake_pynvml import TRACE_PATH

    if not TRACE_PATH.exists():
        pytest.skip(f"NVML trace missing: {TRACE_PATH}")
    from test_telemetry import replay

    from infernod.telemetry.system import SystemReader

    published, _ = replay(__import__("fake_pynvml").load_trace(), SystemReader())
    assert published and published[-1]["gpu"]["gpus"]
    for sample in published[-3:]:
        assert not missing_fields(MetricsSample, sample), missing_fields(MetricsSample, sample)
        assert not unknown_fields(MetricsSample, sample), unknown_fields(MetricsSample, sample)


# -- the docs ----------------------------------------------------------------------------------
def _section(title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^## |\Z)" if title == "Telemetry" else
                  rf"^### {re.escape(title)}\n(.*?)(?=^### |^## |\Z)", DOC, re.M | re.S)
    assert m, f"docs/protocol.md has no '{title}' section"
    return m.group(1)


def _named(text: str) -> set[str]:
    """Every identifier inside a code span, a code block or double quotes."""
    spans = re.findall(r"```(.*?)```", text, re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    spans += re.findall(r"`([^`]*)`", text) + re.findall(r'"([^"\n]*)"', text)
    return {w for s in spans for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s)}


# Where docs/protocol.md describes each body.
DOCUMENTED_IN = {
    "QueueRow": ("queue.list",), "QueueSnapshot": ("queue.list",),
    "QueuedEvent": ("Token streams",),
    "ModelState": ("models.list",), "LoadedModel": ("models.list", "status"),
    "ModelFailure": ("models.list", "status"), "HostCache": ("models.list",),
    "MetricsSample": ("Telemetry",), "SystemSample": ("Telemetry",),
    "ProcessSample": ("Telemetry",), "GpuSample": ("Telemetry",),
    "GpuDevice": ("Telemetry",), "GpuProcess": ("Telemetry",), "Profile": ("Telemetry",),
    "ItlSummary": ("Telemetry",),
}


def test_docs_name_every_field_of_every_body():
    assert set(DOCUMENTED_IN) == set(BODIES)
    missing = []
    for name, shape in BODIES.items():
        named = set().union(*(_named(_section(t)) for t in DOCUMENTED_IN[name]))
        missing += [f"{name}.{f}" for f in bodies.field_names(shape) if f not in named]
    assert not missing, f"fields docs/protocol.md does not name: {missing}"


# -- the real daemon ---------------------------------------------------------------------------
def _topic_bodies(c, topic: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while len(got) < n:
        assert time.monotonic() < end, f"only {len(got)} of {n} '{topic}' events"
        got += [ev.body for ev in c.event_batch(0.1)
                if isinstance(ev, Event) and ev.topic == topic and ev.type == topic]
    return got


def _exact(shape: type, body: Any) -> None:
    assert not missing_fields(shape, body), (shape.__name__, missing_fields(shape, body))
    assert not unknown_fields(shape, body), (shape.__name__, unknown_fields(shape, body))


def test_the_daemon_sends_every_body_in_its_declared_shape(daemon_factory):
    d = daemon_factory({"models": {"slots": 1},
                        "telemetry": {"sample_hz": 10.0, "stats_interval_s": 0.5}})
    topics = ("queue", "models", "metrics", "profiles")
    with d.client(timeout=60, topics=topics) as c:
        c.wait_welcome()
        c.load(MODEL)
        blocker = c.generate(MODEL, "Count slowly:", max_tokens=2000, temperature=0,
                             ignore_eos=True)
        waiting = c.generate(MODEL, "Hi", max_tokens=2, priority="low",
                             deadline=time.time() + 300)

        def both_listed() -> QueueSnapshot | None:
            q = c.queue_list()
            states = {r["id"]: r["state"] for r in q["items"]}
            ok = (states.get(blocker.request_id) == "running"
                  and states.get(waiting.request_id) == "queued")
            return q if ok else None

        end = time.monotonic() + 60
        while (listed := both_listed()) is None:
            assert time.monotonic() < end, "the two requests never ran and waited at once"
            c.listen(0.1)
        end = time.monotonic() + 30
        while not (told := [ev.body for ev in c.stream_events(waiting.request_id)
                            if ev.type == "queued"]):
            assert time.monotonic() < end, "no queued event for the waiting request"
            c.listen(0.1)
        for body in told:
            _exact(QueuedEvent, body)
        published = [q for q in _topic_bodies(c, "queue", 1)]
        # queue.list and the queue topic: one row shape, all of it, nothing undeclared
        _exact(QueueSnapshot, listed)
        for q in published:
            _exact(QueueSnapshot, q)
        rows = listed["items"] + [r for q in published for r in q["items"]]
        assert rows and {frozenset(r) for r in rows} == {frozenset(bodies.field_names(QueueRow))}
        mine = {r["id"]: r for r in listed["items"]}
        assert mine[waiting.request_id]["position"] == 1
        assert mine[waiting.request_id]["deadline_in_s"] is not None
        assert mine[blocker.request_id]["session"] == c.session

        # models.list, status and the models topic
        for row in c.models():
            _exact(ModelState, row)
        status = c.status()
        assert status["models_loaded"]
        for lm in status["models_loaded"]:
            _exact(LoadedModel, lm)
            assert lm["runner_pid"]
        c.cancel(blocker.request_id)
        "".join(waiting)
        c.unload(MODEL)
        events = [ev.body for ev in c.event_batch(0.5) if isinstance(ev, Event)
                  and ev.topic == "models" and ev.type == "models"]
        for ev in events:
            for lm in ev["loaded"]:
                _exact(LoadedModel, lm)
            for f in ev["failed"]:
                _exact(ModelFailure, f)

        # metrics: the topic and metrics.get
        for sample in [*_topic_bodies(c, "metrics", 2), c.metrics()]:
            _exact(MetricsSample, sample)

        # profiles: the topic and profiles.recent
        for p in c.profiles(5):
            _exact(Profile, p)
        assert {p["request_id"] for p in c.profiles(5)} >= {waiting.request_id}


def test_the_console_reads_the_shared_bodies_by_their_declared_names():
    """The console's views of a queue row and a model row hold no field the bodies do not
    declare (a renamed field fails here, not on a user's screen), and read either spelling
    of a queue row alike."""
    from dataclasses import fields

    from inferno_tui import views

    view_only = {"eta_s"}  # from the request's own `queued` events, not the row
    assert {f.name for f in fields(views.QueueRow)} - view_only <= set(
        bodies.field_names(QueueRow))
    assert {f.name for f in fields(views.ModelRow)} <= set(bodies.field_names(ModelState))
    listed = {"id": "s.1", "class": "low", "state": "queued", "model": "m", "client": "c",
              "position": 1, "age_s": 2.0, "tokens": 0, "deadline_in_s": None}
    topic = {"request_id": "s.1", "priority": "low", "state": "queued", "model": "m",
             "client": "c", "position": 1, "age_s": 2.0, "tokens": 0, "deadline_in_s": None}
    assert views.QueueRow.from_wire(listed) == views.QueueRow.from_wire(topic)
    q = views.QueueView.from_wire({"items": [listed], "running": 0, "waiting": 1})
    assert q.queued == 1 and q.rows[0].priority == "low"

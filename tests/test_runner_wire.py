"""The runner's pieces that need no model: the batching sink and the wire encoding."""

from __future__ import annotations

import os

from infernod.backends.base import GenerationRequest, SamplingParams
from infernod.runner import wire
from infernod.runner.main import BatchSink
from infernod.runner.supervisor import describe_exit


def _wakes(sink: BatchSink) -> int:
    try:
        return os.eventfd_read(sink.wake_fd)
    except BlockingIOError:
        return 0


def test_a_decode_step_costs_one_wake_up_and_one_message_whatever_it_emits():
    sink = BatchSink()
    sink.step_started()
    for i in range(8):  # 8 streams' tokens in one step
        sink.on_tokens(f"r{i}", "x", 1)
    sink.on_finished("r0", "length", {"completion_tokens": 1})
    assert _wakes(sink) == 0  # nothing until the step ends
    sink.step_ended()
    assert _wakes(sink) == 1
    events = sink.take()
    assert len(events) == 9 and events[0] == [wire.TOKENS, "r0", "x", 1]
    assert events[-1][0] == wire.FINISHED
    assert sink.take() == []


def test_events_outside_a_step_wake_the_main_thread_at_once():
    sink = BatchSink()
    sink.on_error("r1", "context_exceeded", "too long", None)  # a rejected prompt
    sink.on_started("r2", {"prompt_tokens": 3})
    assert _wakes(sink) == 1  # one wake-up for what is buffered
    assert [e[0] for e in sink.take()] == [wire.ERROR, wire.STARTED]


def test_a_request_survives_the_wire():
    req = GenerationRequest(request_id="s.1", prompt="hi", max_tokens=7, stop=["\n"],
                            sampling=SamplingParams(temperature=0.0, seed=3),
                            resume_tokens=[1, 2], ignore_eos=True, priority="vip")
    msg = wire.unpack(wire.pack("submit", wire.request_to_wire(req)))
    assert msg[0] == "submit" and wire.request_from_wire(msg[1]) == req


def test_exit_statuses_name_the_signal():
    assert describe_exit(-11) == ("SIGSEGV", "SIGSEGV")
    assert describe_exit(-9)[0] == "SIGKILL"
    assert describe_exit(134) == ("SIGABRT", "SIGABRT (exit status 134)")  # via a shell
    assert describe_exit(3) == ("", "exit status 3")

"""A request's ``client`` label goes into queue rows, profiles, job listings and log lines:
every request type that carries one refuses control characters the same way."""

from __future__ import annotations

import pytest

from infernod.protocol.errors import InfernoError
from infernod.protocol.messages import MAX_LABEL_CHARS, SCHEMAS, validate_body

BODIES = {
    "generate": {"model": "m", "prompt": "p"},
    "embed": {"model": "m", "texts": ["t"]},
    "jobs.submit": {"model": "m", "prompts": ["p"]},
    "jobs.list": {},
}


@pytest.mark.parametrize("type_", sorted(BODIES))
@pytest.mark.parametrize("label", ["alice\nINFO forged line", "bob\r", "tab\there", "",
                                   "x" * (MAX_LABEL_CHARS + 1)])
def test_a_bad_label_is_refused_by_every_type(type_: str, label: str) -> None:
    with pytest.raises(InfernoError) as e:
        validate_body(type_, {**BODIES[type_], "client": label}, SCHEMAS)
    assert e.value.code == "bad_request"
    assert f"{type_}.client" in e.value.message or "client" in e.value.message


@pytest.mark.parametrize("type_", sorted(BODIES))
def test_a_printable_label_passes(type_: str) -> None:
    body = validate_body(type_, {**BODIES[type_], "client": "team-a / job 7 (Ünïcode)"}, SCHEMAS)
    assert body["client"] == "team-a / job 7 (Ünïcode)"

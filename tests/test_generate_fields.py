"""generate's body fields end to end, through a real daemon and its runner on the default
model: logprobs, json_schema / grammar, seed, penalties and stop strings."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"]}


def valid_person(doc: Any) -> bool:
    """A tiny validator for PERSON (jsonschema is not a dependency)."""
    return (isinstance(doc, dict) and set(doc) == {"name", "age"}
            and isinstance(doc["name"], str) and len(doc["name"]) <= 12
            and type(doc["age"]) is int and 0 <= doc["age"] <= 150)


@pytest.mark.model
def test_logprobs_through_the_daemon(daemon) -> None:
    """Aligned with the text, finite, <= 0, top sorted, greedy = top-1; only when asked."""
    with daemon.client() as c:
        s = c.generate(MODEL, "The capital of France is", max_tokens=10, temperature=0,
                       logprobs=True, top_logprobs=3)
        text = "".join(s)
        lp = s.logprobs
        assert len(lp) == s.stats["completion_tokens"] > 0
        assert b"".join(bytes(e["bytes"]) for e in lp).decode() == text
        for e in lp:
            assert math.isfinite(e["logprob"]) and e["logprob"] <= 0
            tops = [t["logprob"] for t in e["top"]]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True)
            assert e["top"][0]["id"] == e["id"] and tops[0] == e["logprob"]
        plain = c.generate(MODEL, "The capital of France is", max_tokens=10, temperature=0)
        assert "".join(plain) == text and plain.logprobs == []
        with pytest.raises(InfernoError) as e:
            c.generate(MODEL, "x", top_logprobs=2)
        assert e.value.code == "bad_request"


@pytest.mark.model
def test_json_schema_and_grammar_through_the_daemon(daemon, tmp_path, capsys) -> None:
    from infernod.cli import app as cli

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    rc = cli.main(["--endpoint", daemon.endpoint, "run", MODEL, "A person as JSON:",
                   "--json-schema", str(schema), "--temperature", "0", "--max-tokens", "60",
                   "--logprobs", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and valid_person(json.loads(out["text"])), out["text"]
    assert len(out["logprobs"]) == out["stats"]["completion_tokens"]
    assert all(len(e["top"]) == 2 for e in out["logprobs"])
    with daemon.client() as c:
        s = c.generate(MODEL, "A person as JSON:", max_tokens=60, temperature=1.0, seed=7,
                       json_schema=PERSON)
        out = "".join(s)
        assert s.stats["finish_reason"] == "eos", out
        assert valid_person(json.loads(out)), out
        s = c.generate(MODEL, "Write JSON:", max_tokens=20, temperature=0.7, seed=3,
                       grammar='root ::= "{\\"ok\\": " ("true" | "false") "}"')
        assert json.loads("".join(s)) in ({"ok": True}, {"ok": False})
        # a schema the converter cannot handle: refused at admission with its code
        with pytest.raises(InfernoError) as e:
            c.generate(MODEL, "x", json_schema={"type": "object",
                                                "properties": {"a": {"type": "nope"}}})
        assert e.value.code == "bad_schema" and "nope" in e.value.message
        # a GBNF grammar llama.cpp cannot parse: the stream's error, before any token
        with pytest.raises(InfernoError) as e:
            "".join(c.generate(MODEL, "x", grammar="root ::= undefined-rule"))
        assert e.value.code == "bad_schema"

        # a job's items match its schema too; a bad one is refused at submit
        with pytest.raises(InfernoError) as e:
            c.jobs_submit(MODEL, ["x"], json_schema={"type": "nope"})
        assert e.value.code == "bad_schema"
        job = c.jobs_submit(MODEL, ["A person as JSON:"], max_tokens=60,
                            temperature=0.8, seed=5, json_schema=PERSON)
        deadline = time.monotonic() + 180
        while (got := c.jobs_get(job["job_id"]))["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, got["state"]
            time.sleep(0.2)
        assert got["state"] == "done"
        for item in got["items"]:
            assert valid_person(json.loads(item["text"])), item["text"]


AGED = {"type": "object",
        "properties": {"age": {"type": "integer", "exclusiveMinimum": 199, "maximum": 210},
                       "debt": {"type": "integer", "minimum": -5, "exclusiveMaximum": -1}},
        "required": ["age", "debt"], "additionalProperties": False}


@pytest.mark.model
def test_integer_bounds_through_the_daemon(daemon) -> None:
    """The converter alone let the model write the 25 the prompt suggests; the grammar now
    keeps it in 200..210. A bound it cannot enforce (on a number) is refused by name."""
    with daemon.client() as c:
        for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 21}):
            s = c.generate(MODEL, "A person, 25 years old, as JSON:", max_tokens=40,
                           json_schema=AGED, **kw)
            out = "".join(s)
            assert s.stats["finish_reason"] == "eos", out
            doc = json.loads(out)
            assert set(doc) == {"age", "debt"}, out
            assert 200 <= doc["age"] <= 210 and -5 <= doc["debt"] <= -2, out
        with pytest.raises(InfernoError) as e:
            c.generate(MODEL, "x", json_schema={"type": "object", "properties": {
                "price": {"type": "number", "minimum": 0}}, "required": ["price"]})
        assert e.value.code == "bad_schema"
        assert "minimum" in e.value.message and "/properties/price" in e.value.message
        assert e.value.hint and "integer minimum/maximum" in e.value.hint


@pytest.mark.model
def test_seed_penalties_and_stop_through_the_daemon(daemon) -> None:
    with daemon.client() as c:
        hot = {"max_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        a = "".join(c.generate(MODEL, "Once upon a time", seed=42, **hot))
        b = "".join(c.generate(MODEL, "Once upon a time", seed=42, **hot))
        other = "".join(c.generate(MODEL, "Once upon a time", seed=43, **hot))
        assert a == b and a != other
        prompt = "one, two, one, two, one,"
        base = "".join(c.generate(MODEL, prompt, max_tokens=12, temperature=0))
        pen = "".join(c.generate(MODEL, prompt, max_tokens=12, temperature=0,
                                 presence_penalty=1.5, frequency_penalty=1.5))
        assert pen != base
        cut = base.split()[len(base.split()) // 2] if base.split() else base[:2]
        s = c.generate(MODEL, prompt, max_tokens=12, temperature=0, stop=[cut])
        stopped = "".join(s)
        assert s.stats["finish_reason"] == "stop" and cut not in stopped
        assert base.startswith(stopped)

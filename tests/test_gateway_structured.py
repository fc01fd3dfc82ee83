"""OpenAI's `response_format` (json_object, json_schema) and `logprobs` through the real
gateway and daemon: the output parses and matches the schema, log-probabilities come in
OpenAI's shapes (chat and legacy completions, streamed and not)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_harness import daemon_and_gateway

MODEL = "gemma3-270m"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oai(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    config = {"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 2,
                         "preload": [MODEL]}}
    with daemon_and_gateway(config, tmp_path_factory.mktemp("gw")) as (_, gateway):
        yield openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=180,
                            max_retries=0)


def _matches_person(doc: Any) -> bool:
    return (isinstance(doc, dict) and set(doc) == {"name", "age"}
            and isinstance(doc["name"], str) and len(doc["name"]) <= 12
            and isinstance(doc["age"], int) and not isinstance(doc["age"], bool))


def _greedy_structured(oai: openai.OpenAI, content: str, name: str, schema: dict[str, Any],
                       max_tokens: int) -> Any:
    got = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": name, "schema": schema, "strict": True}})
    return got.choices[0]


def test_json_schema_output_parses_and_matches(oai: openai.OpenAI) -> None:
    choice = _greedy_structured(oai, "Describe a person as JSON.", "person", PERSON, 48)
    assert choice.finish_reason == "stop", choice
    assert _matches_person(json.loads(choice.message.content or "")), choice.message.content


def test_json_object_output_is_an_object_streamed_too(oai: openai.OpenAI) -> None:
    parts = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": '{"a": 1}'}],
        max_tokens=24, temperature=0, stream=True, response_format={"type": "json_object"}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert parts[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict), text


def test_schema_the_converter_cannot_handle_is_400_bad_schema(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "remote", "schema": {"$ref": "https://example.com/schema.json"}}})
    body = e.value.body
    assert isinstance(body, dict) and body["code"] == "bad_schema"
    assert body["param"] == "response_format"


AGED = {"type": "object",
        "properties": {"age": {"type": "integer", "exclusiveMinimum": 199, "maximum": 210},
                       "debt": {"type": "integer", "minimum": -5, "exclusiveMaximum": -1}},
        "required": ["age", "debt"], "additionalProperties": False}


def test_integer_bounds_hold_and_an_unenforceable_bound_is_400(oai: openai.OpenAI) -> None:
    choice = _greedy_structured(oai, "A person, 25 years old, as JSON.", "aged", AGED, 40)
    text = choice.message.content or ""
    assert choice.finish_reason == "stop", text
    doc = json.loads(text)
    assert 200 <= doc["age"] <= 210 and -5 <= doc["debt"] <= -2, text
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "price", "schema": {
                "type": "object", "properties": {"price": {"type": "number", "maximum": 9}},
                "required": ["price"]}}})
    body = e.value.body
    assert isinstance(body, dict) and body["code"] == "bad_schema"
    assert "maximum" in body["message"] and body["param"] == "response_format"


def test_chat_logprobs_non_streaming(oai: openai.OpenAI) -> None:
    got = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3)
    choice = got.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.token == t.top_logprobs[0].token  # greedy: the most likely one
        assert t.bytes is not None and bytes(t.bytes).decode(errors="replace")
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
    assert sum(math.exp(a.logprob) for a in content[0].top_logprobs) <= 1.0001


def test_chat_logprobs_streamed_with_each_delta(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=8,
        temperature=0, logprobs=True, stream=True))
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas
    for c in deltas:
        lp = c.choices[0].logprobs
        assert lp is not None and lp.content
        assert "".join(t.token for t in lp.content) == c.choices[0].delta.content
        assert all(t.top_logprobs == [] for t in lp.content)


def test_completions_logprobs_in_the_legacy_shape(oai: openai.OpenAI) -> None:
    got = oai.completions.create(model=MODEL, prompt="The capital of France is",
                                 max_tokens=5, temperature=0, logprobs=2)
    choice = got.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    top_logprobs=2)  # without logprobs: true

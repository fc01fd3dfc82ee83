"""The JSON Schema subset a grammar enforces (backends/schema_subset.py, grammar.py): integer
ranges as grammar rules, and every keyword the converter would ignore refused by name."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from infernod.backends.grammar import schema_to_gbnf
from infernod.backends.schema_subset import (
    expand_class_escapes,
    int_range_rule,
    integer_bounds,
    json_safe_classes,
)
from infernod.protocol.errors import InfernoError


def _as_regex(rule: str) -> re.Pattern[str]:
    """The digit rules int_range_rule writes (quoted literals, classes, {m,n}, groups, |)
    read as a Python regex: the same language."""
    body = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")
    return re.compile(f"^({body})$")


RANGES = [(0, 150), (1, 9), (-5, 5), (None, -3), (-100, None), (7, None), (123, 456),
          (0, 0), (-12, -3), (99, 1001), (None, 7), (10, 19), (-1, 0), (200, 210)]


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_int_range_rule_is_exactly_the_range(lo: int | None, hi: int | None) -> None:
    rx = _as_regex(int_range_rule(lo, hi))
    for v in range(-1500, 1500):
        assert bool(rx.match(str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), v
    for not_json in ("00", "01", "-0", "-01", "+1", "1.0", ""):
        assert not rx.match(not_json)


def test_int_range_rule_on_random_wide_ranges() -> None:
    rng = random.Random(14)
    for _ in range(200):
        lo = rng.randint(-10**7, 10**7)
        hi = lo + rng.randint(0, 10**7)
        rx = _as_regex(int_range_rule(lo, hi))
        for v in (lo - 1, lo, hi, hi + 1, *(rng.randint(lo - 999, hi + 999) for _ in range(100))):
            assert bool(rx.match(str(v))) == (lo <= v <= hi), (lo, hi, v)


def test_integer_bounds_read_every_spelling() -> None:
    assert integer_bounds({"minimum": 0, "maximum": 150}) == (0, 150)
    assert integer_bounds({"exclusiveMinimum": 0, "exclusiveMaximum": 10}) == (1, 9)
    assert integer_bounds({"minimum": 0, "exclusiveMinimum": True,  # draft 4's flags
                           "maximum": 10, "exclusiveMaximum": True}) == (1, 9)
    assert integer_bounds({"minimum": 1.5, "maximum": 4.5}) == (2, 4)
    assert integer_bounds({"exclusiveMinimum": 1.5, "exclusiveMaximum": 4.5}) == (2, 4)
    assert integer_bounds({"minimum": 3, "exclusiveMinimum": 5}) == (6, None)  # tightest
    with pytest.raises(InfernoError) as e:
        integer_bounds({"minimum": 5, "maximum": 1})
    assert e.value.code == "bad_schema"
    with pytest.raises(InfernoError):
        integer_bounds({"minimum": "5"})


def test_integer_bounds_reach_the_grammar() -> None:
    g = schema_to_gbnf({"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["age"]})
    rule = re.search(r"^age ::= \((.*)\) space$", g, re.M)
    assert rule is not None, g
    rx = _as_regex(rule.group(1))
    assert rx.match("150") and rx.match("0") and not rx.match("151") and not rx.match("-1")
    # a type list keeps its sibling keywords (the converter alone dropped them)
    g = schema_to_gbnf({"type": ["integer", "null"], "minimum": 3, "maximum": 5})
    assert "([3-5]) space" in g and '"null"' in g
    g = schema_to_gbnf({"type": ["string", "null"], "maxLength": 2})
    assert "(char (char)?)?" in g
    assert schema_to_gbnf({"type": ["integer", "null"], "enum": [3, None]}).startswith(
        'root ::= "3" | "null"\n')  # the values, not any integer


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("number bounds", {"type": "number", "minimum": 0}, "minimum"),
    ("number bounds", {"type": "number", "exclusiveMaximum": 1}, "exclusiveMaximum"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, "multipleOf"),
    ("string", {"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
    ("string", {"type": "string", "format": "date", "minLength": 3}, "minLength"),
    ("array", {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
     "uniqueItems"),
    ("array", {"type": "array", "items": {"type": "string"}, "contains": {"const": "a"}},
     "contains"),
    ("array", {"type": "array", "minItems": 2}, "minItems"),
    ("array", {"type": "array", "prefixItems": [{"type": "string"}],
               "items": {"type": "integer"}}, "prefixItems"),
    ("array", {"type": "array", "prefixItems": [{"type": "string"}], "minItems": 2},
     "minItems"),
    ("object", {"type": "object", "properties": {"a": {"type": "string"}},
                "minProperties": 1}, "minProperties"),
    ("object", {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
     "patternProperties"),
    ("object", {"type": "object", "properties": {"a": {"type": "string"}},
                "required": ["b"]}, "'b'"),
    ("object", {"type": "object", "required": ["a"]}, "required"),
    ("composition", {"type": "string", "not": {"const": "x"}}, "not"),
    ("enum", {"type": "integer", "enum": [1, 200], "maximum": 5}, "maximum"),
    ("enum", {"type": "string", "enum": ["a", 1]}, "enum"),
    ("enum", {"const": "abc", "maxLength": 2}, "maxLength"),
    ("composition", {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                               {"type": "integer"}]}, "allOf"),
    ("composition", {"$ref": "#/$defs/a", "maxLength": 2,
                     "$defs": {"a": {"type": "string"}}}, "maxLength"),
    ("pattern", {"type": "string", "pattern": "^a\\bc$"}, "\\b"),
    ("pattern", {"type": "string", "pattern": "^[\\D]$"}, "\\D"),
    ("pattern", {"type": "string", "pattern": '^say "hi"$'}, "double quote"),
    ("pattern", {"type": "string", "pattern": "^a\\\\b$"}, "backslash"),
    ("nested", {"type": "object", "properties": {"x": {"type": "array", "items": {
        "type": "number", "maximum": 1}}}}, "/properties/x/items"),
    ("nested", {"$defs": {"p": {"type": "number", "minimum": 0}}, "$ref": "#/$defs/p"},
     "/$defs/p"),
]


@pytest.mark.parametrize(("family", "schema", "named"), REFUSED,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(REFUSED)])
def test_a_keyword_the_grammar_would_ignore_is_refused_by_name(
        family: str, schema: dict[str, Any], named: str) -> None:
    with pytest.raises(InfernoError) as e:
        schema_to_gbnf(schema)
    assert e.value.code == "bad_schema"
    assert named in e.value.message, e.value.message
    assert e.value.hint
    if family != "pattern":  # what is enforced instead
        assert "minimum/maximum" in e.value.hint


ACCEPTED: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "title": "Name",
                                               "description": "d", "maxLength": 9}},
     "required": ["name"], "additionalProperties": False, "title": "T"},
    {"type": "string", "format": "email"},  # an annotation: a validator asserts nothing
    {"type": "integer", "maxLength": 3},  # a string keyword asserts nothing on an integer
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "string"}, {"const": 1}]},
    {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Opt"},
    {"allOf": [{"$ref": "#/$defs/a"}, {"type": "object", "properties": {
        "b": {"type": "boolean"}}}], "$defs": {"a": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 1}}}}},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
    {"type": "string", "pattern": "^\\d{3}-\\w+\\s\\S[\\d.]*\\D\\W$"},
    {"type": "string", "enum": ["a", "b"]},
    {"type": ["integer", "null"], "const": None},
]


@pytest.mark.parametrize("schema", ACCEPTED)
def test_enforced_keywords_and_annotations_are_accepted(schema: dict[str, Any]) -> None:
    assert "root ::=" in schema_to_gbnf(schema)


def test_pattern_classes_hold_only_what_a_json_string_holds_raw() -> None:
    """The converter copied a regex's . and [^...] as they were: the model could write a raw
    " (closing the string early), a backslash or a control character."""
    g = schema_to_gbnf({"type": "string", "pattern": "^.{2,5}$"})
    assert "dot ::= [^\\x0A\\x0D\\x00-\\x1F\\x22\\x5C]" in g
    g = schema_to_gbnf({"type": "string", "pattern": "^[^@]+@[ -~]+\\.com$"})
    assert '[^@\\x00-\\x1F\\x22\\x5C]+ "@" [\\x20-!#-\\x5B\\x5D-~]+ ".com"' in g, g
    assert json_safe_classes('"\\"" [a"\\\\]' + " space") == '"\\"" [a] space'


def test_a_strings_characters_are_never_raw_control_characters() -> None:
    """The converter's [^"\\\\] let a raw newline into a string: json.loads refuses that."""
    g = schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string"}}})
    char = re.search(r"^char ::= \[\^(.*?)\] \|", g, re.M)
    assert char is not None, g
    assert "\\x00-\\x1F" in char.group(1), g


@pytest.mark.parametrize(("pattern", "matches", "misses"), [
    ("^\\d{3}-\\d{4}$", ["555-1234"], ["55-1234", "555-12a4", "５５５-1234"]),
    ("^\\w+$", ["ab_9Z"], ["a-b", "", "a b"]),
    ("^\\S+\\s\\S+$", ["a b"], ["ab", "a  b", "a\tb"]),  # \s: a space in a JSON string
    ("^[\\d.]+$", ["1.5"], ["1,5"]),
    ("^\\D\\W$", ["a-"], ["1-", "ab"]),
    ("^a\\.b\\\\d$", ["a.b\\d"], ["a.b5"]),  # an escaped backslash, then a plain d
])
def test_class_escapes_become_the_classes_they_stand_for(
        pattern: str, matches: list[str], misses: list[str]) -> None:
    rx = re.compile(expand_class_escapes(pattern).replace(" \\t\\n\\r", " "))
    for m in matches:
        assert rx.fullmatch(m), (pattern, m)
    for m in misses:
        assert not rx.fullmatch(m), (pattern, m)

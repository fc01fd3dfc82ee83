"""Structured output: a request's ``json_schema`` (or raw ``grammar``) as a llama.cpp GBNF grammar.

The daemon converts a JSON Schema at admission, so a schema the converter cannot handle is
refused (``bad_schema``) before anything is queued; the runner checks every sampled token
against the grammar (grammar_sampling.py), so the output stays a prefix of a document that
parses and matches the schema.

The converter is llama-cpp-python's ``llama_grammar.json_schema_to_gbnf`` (a port of
llama.cpp's json_schema_to_grammar.py). That module is plain Python, but importing it as
``llama_cpp.llama_grammar`` would run the package's ``__init__`` and load libllama into the
daemon, which never loads native inference code: it is loaded from its file under a private
name instead. Remote ``$ref`` fetching stays off (the converter's ``allow_fetch=False``).

The converter silently drops keywords it does not understand; schema_subset.check refuses
a schema with one of those first (``bad_schema``), and two of them are enforced here on top
of the converter: integer bounds (minimum/maximum, exclusive too: schema_subset's integer
ranges) and the other keywords of a schema whose ``type`` is a list (the converter keeps
only the types); a ``pattern``'s character classes (``.`` too) are narrowed to what a JSON
string holds unescaped; so is a string's character (no raw control characters).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from infernod.backends import schema_subset
from infernod.protocol.errors import InfernoError

_MODULE = "infernod._llama_grammar"
MAX_GRAMMAR_CHARS = 256 * 1024  # a converted schema larger than this is refused


def _converter() -> ModuleType:
    mod = sys.modules.get(_MODULE)
    if mod is not None:
        return mod
    spec = importlib.util.find_spec("llama_cpp")  # a top-level spec: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise InfernoError("not_supported", "llama-cpp-python is not installed: no JSON "
                           "Schema converter", "install infernod's dependencies")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama_grammar.py"
    file_spec = importlib.util.spec_from_file_location(_MODULE, path)
    if file_spec is None or file_spec.loader is None:
        raise InfernoError("not_supported", f"cannot load the JSON Schema converter {path}")
    mod = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(mod)
    sys.modules[_MODULE] = mod
    return mod


# The converter's string character is [^"\\] or an escape: a raw newline or tab passed, and
# a JSON parser (Python's json.loads, JavaScript's JSON.parse) refuses the document.
JSON_CHAR = (r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
             r"[0-9a-fA-F] [0-9a-fA-F])")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_BRANCHES_FIRST = ("$ref", "oneOf", "anyOf")  # the converter's order
_VALUES = ("const", "enum")


def _to_gbnf(schema_json: str) -> str:
    """The converter's json_schema_to_gbnf, with a SchemaConverter that enforces integer
    bounds and keeps a type list's sibling keywords (const and enum included)."""
    mod = _converter()

    class Converter(mod.SchemaConverter):  # type: ignore[name-defined]
        def visit(self, schema: Any, name: str) -> str:
            if isinstance(schema, dict) and not any(k in schema for k in _BRANCHES_FIRST):
                t = schema.get("type")
                rule_name = name + "-" if name in mod.RESERVED_NAMES else name or "root"
                values = any(k in schema for k in _VALUES)
                if isinstance(t, list) and values:  # the values decide, not the types
                    schema = {k: v for k, v in schema.items() if k != "type"}
                elif isinstance(t, list):
                    alts = [{**schema, "type": one} for one in t]
                    return str(self._add_rule(rule_name, self._generate_union_rule(name, alts)))
                elif t == "integer" and not values and any(k in schema for k in _BOUNDS):
                    lo, hi = schema_subset.integer_bounds(schema)
                    rule = f"({schema_subset.int_range_rule(lo, hi)}) space"
                    return str(self._add_rule(rule_name, rule))
            return str(super().visit(schema, name))

        def _visit_pattern(self, pattern: Any, name: str) -> str:
            schema_subset.check_pattern(pattern)
            pattern = schema_subset.expand_class_escapes(pattern)
            before = dict(self._rules)
            rule_name = super()._visit_pattern(pattern, name)
            for key, rule in list(self._rules.items()):  # the rules this pattern added
                if before.get(key) != rule:
                    self._rules[key] = schema_subset.json_safe_classes(rule)
            return str(rule_name)

    schema = json.loads(schema_json)
    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = converter.resolve_refs(schema, "stdin")
    converter.visit(schema, "")
    if "char" in converter._rules:  # a string's character: never a raw control character
        converter._rules["char"] = JSON_CHAR
    return str(converter.format_grammar())


@functools.lru_cache(maxsize=64)
def _convert(schema_json: str) -> str:
    try:
        schema_subset.check(json.loads(schema_json))
        gbnf = _to_gbnf(schema_json)
    except InfernoError:
        raise
    except RecursionError as e:
        raise InfernoError("bad_schema", "json_schema nests too deeply to convert") from e
    except Exception as e:  # the converter asserts and raises freely on what it cannot do
        raise InfernoError("bad_schema", f"json_schema cannot be turned into a grammar: "
                           f"{type(e).__name__}: {e}") from e
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise InfernoError("bad_schema", f"json_schema converts to a grammar of {len(gbnf)} "
                           f"characters, over {MAX_GRAMMAR_CHARS}", "simplify the schema")
    return gbnf


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF grammar (root rule ``root``) for a JSON Schema; ``bad_schema`` if the
    converter cannot handle it. ``{"type": "object"}`` is any JSON object (OpenAI's
    ``json_object`` response format)."""
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InfernoError("bad_schema", f"json_schema is not JSON: {e}") from e
    return _convert(key)


def request_grammar(body: dict[str, Any]) -> str | None:
    """The grammar a generate body (or a job's parameters) asks for: ``json_schema``
    converted, or ``grammar`` as given, or None. Raises ``bad_schema`` / ``bad_request``."""
    schema, grammar = body.get("json_schema"), body.get("grammar")
    if schema is not None and grammar is not None:
        raise InfernoError("bad_request", "give json_schema or grammar, not both")
    if (schema is not None or grammar is not None) and body.get("ignore_eos"):
        raise InfernoError("bad_request", "ignore_eos cannot go with json_schema or grammar: "
                           "a finished document can only be followed by end-of-generation")
    if schema is not None:
        return schema_to_gbnf(schema)
    if grammar is not None and not grammar.strip():
        raise InfernoError("bad_schema", "grammar is empty")
    return grammar if grammar is not None else None

"""Which JSON Schema keywords a grammar enforces, and integer ranges as grammar rules.

llama-cpp-python's converter (see grammar.py) drops what it does not understand without a
word: ``{"type": "integer", "maximum": 150}`` used to give any integer. A schema that asks
for something the grammar would not enforce is refused instead (``bad_schema`` naming the
keyword and where it is), so a document that completes always validates.

:func:`check` walks a schema the way the converter (with grammar.py's additions) reads it:
for each subschema the branch it takes decides which keywords are enforced; annotations
(``title``, ``description``, an unenforced ``format``...) change nothing a validator checks
and pass; a keyword that asserts something the branch ignores is refused. Keywords of
another type than the one the branch produces are vacuous (``maxLength`` on an integer
asserts nothing) and pass too. Unknown keywords pass, as JSON Schema ignores them.

:func:`int_range_rule` is the GBNF for the integers in a range: grammar.py uses it for
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` on integers.

Pure: no I/O, no native code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from infernod.protocol.errors import InfernoError

NUMBER_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                         "multipleOf"})
STRING_KEYS = frozenset({"minLength", "maxLength", "pattern"})
ARRAY_KEYS = frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems",
                        "contains", "minContains", "maxContains", "unevaluatedItems",
                        "additionalItems"})
OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties", "minProperties",
                         "maxProperties", "patternProperties", "propertyNames",
                         "dependentRequired", "dependentSchemas", "dependencies",
                         "unevaluatedProperties"})
GENERIC_KEYS = frozenset({"type", "enum", "const", "allOf", "anyOf", "oneOf", "not", "if",
                          "then", "else", "$ref", "$dynamicRef"})
_FAMILY = {"integer": NUMBER_KEYS, "number": NUMBER_KEYS, "string": STRING_KEYS,
           "array": ARRAY_KEYS, "object": OBJECT_KEYS, "boolean": frozenset(),
           "null": frozenset()}
ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3",
                              "uuid4", "uuid5"})
_HINT = ("the grammar enforces type, properties, required, additionalProperties, items, "
         "prefixItems, minItems/maxItems, enum, const, anyOf/oneOf, allOf of object schemas, "
         "local $ref, string minLength/maxLength, pattern (^...$) and the formats date, time, "
         "date-time and uuid, integer minimum/maximum (exclusive too); drop the keyword and "
         "check it after the reply")


def check(schema: Any) -> None:
    """Raise ``bad_schema`` for the first keyword of ``schema`` the grammar would not
    enforce. (What the converter cannot read at all it refuses itself.)"""
    _check(schema, "")


def _refuse(path: str, message: str) -> InfernoError:
    return InfernoError("bad_schema", f"json_schema at {path or '/'}: {message}", _HINT)


def _check(s: Any, path: str) -> None:
    if not isinstance(s, dict):
        return  # the converter refuses what is not an object schema (true/false...)
    for key in ("$defs", "definitions"):
        defs = s.get(key)
        if isinstance(defs, dict):
            for name, sub in defs.items():
                _check(sub, f"{path}/{key}/{name}")
    t = s.get("type")
    if "$ref" in s:  # referenced schemas are checked where they live
        _only(s, path, {"$ref"}, "alongside $ref")
    elif "oneOf" in s or "anyOf" in s:
        kind = "oneOf" if "oneOf" in s else "anyOf"
        _only(s, path, {kind}, f"alongside {kind}")
        for i, alt in enumerate(s[kind] or []):
            _check(alt, f"{path}/{kind}/{i}")
    elif isinstance(t, list) and not ("const" in s or "enum" in s):  # as grammar.py does:
        # each type sees the other keywords
        for name in t:
            _check({**s, "type": name}, path)
    elif "const" in s or "enum" in s:  # the grammar writes one of the values as given
        kind = "const" if "const" in s else "enum"
        _only(s, path, {kind}, f"alongside {kind}")
        values = [s["const"]] if kind == "const" else s["enum"] or []
        if "type" in s and not all(_has_type(v, s["type"]) for v in values):
            raise _refuse(path, f"a value of {kind} is not of type {s['type']!r}")
    elif t in (None, "object") and ("properties" in s or (
            "additionalProperties" in s and s["additionalProperties"] is not True)):
        _check_object(s, path)
    elif t in (None, "object") and "allOf" in s:
        _check_all_of(s, path)
    elif t in (None, "array") and ("items" in s or "prefixItems" in s):
        _check_array(s, path)
    elif t in (None, "string") and "pattern" in s:
        _only(s, path, {"pattern"}, "alongside pattern (put lengths into the pattern)",
              family="string")
    elif t in (None, "string") and s.get("format") in ENFORCED_FORMATS:
        _only(s, path, set(), f"alongside format {s['format']!r}", family="string")
    elif t == "string":
        _only(s, path, {"minLength", "maxLength"}, "on a string", family="string")
    elif t == "integer":
        if "multipleOf" in s:
            raise _refuse(path, "multipleOf is not enforced")
        _only(s, path, NUMBER_KEYS - {"multipleOf"}, "on an integer", family="integer")
    elif isinstance(t, str) and t in _FAMILY:
        _only(s, path, set(), f"on {'an' if t[0] in 'aeiou' else 'a'} {t}", family=t)


def _has_type(value: Any, t: Any) -> bool:
    if isinstance(t, list):
        return any(_has_type(value, one) for one in t)
    return {"null": value is None, "boolean": isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "string": isinstance(value, str), "array": isinstance(value, list),
            "object": isinstance(value, dict)}.get(t, False)


def _only(s: dict[str, Any], path: str, enforced: Collection[str], where: str,
          family: str | None = None) -> None:
    """Refuse an asserting keyword of ``s`` outside ``enforced`` (and the type's family)."""
    relevant = GENERIC_KEYS | (_FAMILY[family] if family else
                               NUMBER_KEYS | STRING_KEYS | ARRAY_KEYS | OBJECT_KEYS)
    for key in s:
        if key in relevant and key not in enforced and key != "type":
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                raise _refuse(path, f"{key} is not enforced {where} (only on integers)")
            raise _refuse(path, f"{key} is not enforced {where}")


def _check_object(s: dict[str, Any], path: str) -> None:
    _only(s, path, {"properties", "required", "additionalProperties"}, "on an object",
          family="object")
    props = s.get("properties") or {}
    missing = [k for k in s.get("required") or [] if k not in props]
    if missing:
        raise _refuse(path, f"required {missing[0]!r} is not in properties, so the grammar "
                            "would never write it")
    for name, sub in props.items():
        _check(sub, f"{path}/properties/{name}")
    extra = s.get("additionalProperties")
    if isinstance(extra, dict):
        _check(extra, f"{path}/additionalProperties")


def _check_all_of(s: dict[str, Any], path: str) -> None:
    """The converter merges the properties of allOf's parts into one object (every part's
    properties required) and reads nothing else of them."""
    _only(s, path, {"allOf"}, "alongside allOf", family="object")
    for i, part in enumerate(s["allOf"] or []):
        where = f"{path}/allOf/{i}"
        if not isinstance(part, dict) or not ("properties" in part or "$ref" in part):
            raise _refuse(where, "allOf is enforced only for object schemas with properties")
        if "$ref" in part:
            _only(part, where, {"$ref"}, "alongside $ref")
            continue
        if part.get("type", "object") != "object":
            raise _refuse(where, "allOf is enforced only for object schemas with properties")
        _only(part, where, {"properties", "required", "additionalProperties"},
              "in an allOf part", family="object")
        for name, sub in part["properties"].items():
            _check(sub, f"{where}/properties/{name}")


def _check_array(s: dict[str, Any], path: str) -> None:
    items, prefix = s.get("items"), s.get("prefixItems")
    if isinstance(items, list) or (prefix is not None and not items):  # a fixed tuple
        tup = items if isinstance(items, list) else prefix
        _only(s, path, {"items", "prefixItems", "minItems", "maxItems", "additionalItems"},
              "on a tuple", family="array")
        n = len(tup or [])
        if not s.get("minItems", 0) <= n <= s.get("maxItems", n):
            raise _refuse(path, f"minItems/maxItems exclude the tuple's {n} items")
        for i, sub in enumerate(tup or []):
            _check(sub, f"{path}/{'items' if tup is items else 'prefixItems'}/{i}")
        return
    if prefix is not None:
        raise _refuse(path, "prefixItems is not enforced together with items")
    _only(s, path, {"items", "minItems", "maxItems"}, "on an array", family="array")
    if s.get("uniqueItems") is True:
        raise _refuse(path, "uniqueItems is not enforced")
    _check(items, f"{path}/items")


# ---- integer ranges ------------------------------------------------------------------------

MAX_DIGITS = 16  # the converter's own integers have at most 16 digits


def integer_bounds(s: dict[str, Any]) -> tuple[int | None, int | None]:
    """The inclusive integer range of ``s``'s minimum/maximum/exclusive* (draft 4's boolean
    exclusive flags too); None for an open end. ``bad_schema`` for a non-number bound."""
    lo: int | None = None
    hi: int | None = None
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        v = s.get(key)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise InfernoError("bad_schema", f"json_schema {key} must be a number, not {v!r}")
        exclusive = key.startswith("exclusive") or s.get(
            "exclusive" + key[0].upper() + key[1:]) is True
        if key.endswith("inimum"):
            bound = math.floor(v) + 1 if exclusive else math.ceil(v)
            lo = bound if lo is None else max(lo, bound)
        else:
            bound = math.ceil(v) - 1 if exclusive else math.floor(v)
            hi = bound if hi is None else min(hi, bound)
    if lo is not None and hi is not None and lo > hi:
        raise InfernoError("bad_schema", f"json_schema allows no integer: the range is "
                           f"{lo}..{hi}", "check minimum/maximum")
    return lo, hi


def int_range_rule(lo: int | None, hi: int | None) -> str:
    """GBNF for the integers ``lo..hi`` (either end open) as JSON writes them: no leading
    zeros, no ``-0``, at most :data:`MAX_DIGITS` digits for an open end."""
    alts: list[str] = []
    if lo is None or lo < 0:  # negatives: "-" and the magnitudes max(1, -hi)..-lo
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        alts.append(f'"-" ({_naturals(mag_lo, mag_hi)})')
    if hi is None or hi >= 0:
        alts.append(_naturals(0 if lo is None or lo < 0 else lo, hi))
    return " | ".join(f"({a})" for a in alts) if len(alts) > 1 else alts[0]


def _naturals(lo: int, hi: int | None) -> str:
    """Alternatives for lo..hi (lo >= 0), grouped by digit count; an open end takes every
    longer number in one alternative."""
    n_lo = len(str(lo))
    alts = []
    for n in range(n_lo, n_lo + 1 if hi is None else len(str(hi)) + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10**n - 1 if hi is None else min(hi, 10**n - 1)
        if a <= b:
            alts.append(_same_length(str(a), str(b)))
    if hi is None and n_lo < MAX_DIGITS:
        alts.append(f"[1-9] [0-9]{{{n_lo},{MAX_DIGITS - 1}}}")
    return " | ".join(alts)


def _same_length(a: str, b: str) -> str:
    """GBNF for the numbers a..b written with the same number of digits."""
    if not a:
        return ""
    if a[0] == b[0]:
        rest = _same_length(a[1:], b[1:])
        return f'"{a[0]}"' + (f" ({rest})" if rest else "")
    n = len(a) - 1
    tail = f" [0-9]{{{n}}}" if n > 1 else " [0-9]" if n == 1 else ""
    lo_full = a[1:] == "0" * n  # a's first digit takes every tail
    hi_full = b[1:] == "9" * n
    first = int(a[0]) + (0 if lo_full else 1)
    last = int(b[0]) - (0 if hi_full else 1)
    parts = []
    if not lo_full:
        parts.append(f'"{a[0]}" ({_same_length(a[1:], "9" * n)})')
    if first <= last:
        digits = str(first) if first == last else f"{first}-{last}"
        parts.append(f"[{digits}]{tail}")
    if not hi_full:
        parts.append(f'"{b[0]}" ({_same_length("0" * n, b[1:])})')
    return " | ".join(parts)


# ---- pattern character classes ------------------------------------------------------------

# What may not stand unescaped inside a JSON string: control characters, '"' and '\'.
_NOT_IN_JSON = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "\\": 0x5C, "]": 0x5D, "[": 0x5B,
                   '"': 0x22, "-": 0x2D, "^": 0x5E, "/": 0x2F, ".": 0x2E}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_GBNF_ESCAPES = frozenset('xuUtrn\\"[]')  # what a GBNF literal may escape
_REGEX_PUNCT = frozenset(".^$/-{}()|*+?")  # escaped in a regex, plain in a GBNF literal


_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}


def expand_class_escapes(pattern: str) -> str:
    """``\\d``, ``\\w``, ``\\s`` and their negations ``\\D``, ``\\W``, ``\\S`` written as the
    character classes they stand for (inside a class, the first three as its ranges), which
    the converter copies and :func:`json_safe_classes` narrows. ``\\s`` then means a space:
    tabs and newlines stand in a JSON string only escaped, which the grammar does not write."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            body = _CLASS_ESCAPES.get(e.lower())
            if body is None:
                out.append(pattern[i:i + 2])
            elif in_class and e.isupper():
                raise InfernoError("bad_schema", f"json_schema pattern {pattern!r}: \\{e} "
                                   "inside a character class is not supported",
                                   "write that class out, e.g. [^0-9] for [\\D]")
            elif in_class:
                out.append(body)
            else:
                out.append(("[^" if e.isupper() else "[") + body + "]")
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def check_pattern(pattern: Any) -> None:
    """Refuse a pattern whose literal text has a ``"`` or a backslash: the converter writes
    them raw into the string, which is then no longer JSON."""
    if not isinstance(pattern, str):
        raise InfernoError("bad_schema", "json_schema pattern must be a string")
    outside = re.sub(r"\[(?:\\.|[^\]\\])*\]", "", pattern)  # character classes removed
    if '"' in outside or "\\\\" in outside:
        raise InfernoError("bad_schema", f"json_schema pattern {pattern!r}: a double quote or "
                           "backslash outside a character class is not supported",
                           "a JSON string holds them only escaped, which the grammar does "
                           "not write: drop them from the pattern")


def json_safe_classes(rule: str) -> str:
    """``rule`` (GBNF the converter made from a ``pattern``) with every character class
    narrowed to characters a JSON string holds unescaped: the converter copies a regex's
    ``.`` and ``[^...]`` as they are, which let the model close the string early with a
    raw ``"`` or write a raw backslash or control character, and the document no longer
    parsed. In literals, a regex's escaped punctuation (``\\.``) becomes the character, which
    GBNF would refuse to parse; ``bad_schema`` for an escape it cannot take (``\\b``...): the
    class escapes are expanded before (:func:`expand_class_escapes`)."""
    out: list[str] = []
    i = 0
    while i < len(rule):
        c = rule[i]
        if c == '"':  # a literal: regex escapes GBNF does not know become the character
            j = i + 1
            lit = []
            while j < len(rule) and rule[j] != '"':
                if rule[j] == "\\":
                    e = rule[j + 1 : j + 2]
                    if e not in _GBNF_ESCAPES and e not in _REGEX_PUNCT:
                        raise InfernoError(
                            "bad_schema", f"json_schema pattern: \\{e} is not supported",
                            "spell it out as a class or a literal (\\d, \\w and \\s, and their "
                            "negations, are understood)")
                    lit.append(e if e in _REGEX_PUNCT else rule[j : j + 2])
                    j += 2
                else:
                    lit.append(rule[j])
                    j += 1
            out.append('"' + "".join(lit) + '"')
            i = j + 1
        elif c == "[":
            ranges, negated, i = _parse_class(rule, i + 1)
            out.append(_emit_class(ranges, negated))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _parse_class(rule: str, i: int) -> tuple[list[tuple[int, int]], bool, int]:
    negated = rule.startswith("^", i)
    i += negated
    ranges: list[tuple[int, int]] = []
    while i < len(rule) and rule[i] != "]":
        lo, i = _class_char(rule, i)
        hi = lo
        if rule.startswith("-", i) and i + 1 < len(rule) and rule[i + 1] != "]":
            hi, i = _class_char(rule, i + 1)
        ranges.append((lo, hi))
    if i >= len(rule):
        raise InfernoError("bad_schema", "json_schema pattern has an unclosed [")
    return ranges, negated, i + 1


def _class_char(rule: str, i: int) -> tuple[int, int]:
    if rule[i] != "\\":
        return ord(rule[i]), i + 1
    e = rule[i + 1] if i + 1 < len(rule) else ""
    if e in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[e], i + 2
    n = _HEX_DIGITS.get(e, 0)
    try:
        if n:
            return int(rule[i + 2 : i + 2 + n], 16), i + 2 + n
    except ValueError:
        pass
    raise InfernoError("bad_schema", f"json_schema pattern: the escape \\{e} is not supported "
                       "in a character class", "spell the characters out, or as \\xHH")


def _emit_class(ranges: list[tuple[int, int]], negated: bool) -> str:
    if negated:  # exclude what JSON forbids raw as well
        return "[^" + "".join(_emit_range(r) for r in ranges + _NOT_IN_JSON) + "]"
    kept: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for blo, bhi in _NOT_IN_JSON:  # cut every forbidden span out of [lo, hi]
            if lo <= bhi and blo <= hi:
                if lo < blo:
                    kept.append((lo, blo - 1))
                lo = bhi + 1
        if lo <= hi:
            kept.append((lo, hi))
    if not kept:
        raise InfernoError("bad_schema", "json_schema pattern has a character class of only "
                           "characters a JSON string must escape")
    return "[" + "".join(_emit_range(r) for r in kept) + "]"


def _emit_range(r: tuple[int, int]) -> str:
    lo, hi = r
    return _emit_char(lo) if lo == hi else f"{_emit_char(lo)}-{_emit_char(hi)}"


def _emit_char(cp: int) -> str:
    if 0x20 < cp < 0x7F and chr(cp) not in '"\\]-^[':
        return chr(cp)
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"

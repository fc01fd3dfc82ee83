"""docs/protocol.md must describe every request type, body field, header field and error code
the daemon accepts: a client author works from the document alone."""

from __future__ import annotations

import re
from pathlib import Path

from infernod.protocol.errors import CODES
from infernod.protocol.messages import HEADER, SCHEMAS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^### |^## |\Z)", DOC, re.M | re.S)
    assert m, f"docs/protocol.md has no '### {title}' section"
    return m.group(1)


def test_every_request_type_and_field_is_documented():
    missing = []
    for type_, schema in SCHEMAS.items():
        body = _section(type_)
        for field in schema:
            if f"`{field}`" not in body:
                missing.append(f"{type_}.{field}")
    assert not missing, f"undocumented fields: {missing}"


def test_header_fields_and_error_codes_are_documented():
    for field in HEADER:
        assert f"| `{field}` |" in DOC, field
    for code in CODES:
        assert f"| `{code}` |" in DOC, code


def test_each_request_role_in_the_doc_is_the_handler_tables():
    """The one table the daemon dispatches from (request type -> minimum role, schema,
    handler) covers every request type of the protocol, and each section of the doc names
    the same minimum role."""
    from infernod.daemon.handlers.table import TABLE
    from infernod.daemon.server import ROLES

    assert set(TABLE) == set(SCHEMAS)
    wrong = {}
    for type_, row in TABLE.items():
        assert row.role in ROLES, type_
        m = re.search(r"Role: (\w+)", _section(type_))
        if m is None or m.group(1) != row.role:
            wrong[type_] = (row.role, m and m.group(1))
    assert not wrong, f"table role vs docs/protocol.md: {wrong}"

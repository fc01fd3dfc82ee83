"""The wire contract and the client stay light: importing them loads no backend or UI."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("llama_cpp", "onnxruntime", "textual", "pynvml", "torch")


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys, json; {stmt}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(json.loads(out))


def test_client_and_protocol_import_no_heavy_modules():
    mods = _loaded_after("import infernod.client, infernod.protocol.codec, "
                         "infernod.protocol.messages")
    bad = [m for m in HEAVY if m in mods]
    assert not bad, f"importing the client pulled in {bad}"


def test_cli_imports_no_backend():
    mods = _loaded_after("import infernod.cli")
    assert not [m for m in HEAVY if m in mods]

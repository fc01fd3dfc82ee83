"""llama.cpp's log reaches the daemon's log through the ``llama.cpp`` logger: warnings and
errors at their level, its load-time chatter at debug, lines rebuilt from their pieces."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from infernod.backends import llama_native as native


def test_pieces_become_lines_at_the_right_level(caplog: pytest.LogCaptureFixture) -> None:
    native.route_logs()
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        native._callback(3, b"load: a warning ", None)
        native._callback(5, b"continued\n", None)  # CONT: same line, same level
        native._callback(4, b"decode: an error\n", None)
        native._callback(2, b"print_info: n_layer = 18\n", None)
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llama.cpp"]
    assert got == [(logging.WARNING, "load: a warning continued"),
                   (logging.ERROR, "decode: an error"),
                   (logging.DEBUG, "print_info: n_layer = 18")]


@pytest.mark.model
def test_a_real_load_warning_is_logged_not_printed(
    default_model_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    from infernod.backends.gguf import GgufEngine

    eng = GgufEngine(default_model_path, n_ctx=64, n_slots=1, prefill_chunk=16, park_slots=0)
    with caplog.at_level(logging.WARNING, logger="llama.cpp"):
        eng.start()
    eng.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "llama.cpp"]
    assert any("control-looking token" in w for w in warnings), warnings  # Gemma's vocab
    assert "control-looking token" not in capsys.readouterr().err

"""The console shows a model's runner (pid, memory, CPU) and why a failed model failed."""

from __future__ import annotations

from inferno_tui.screens.models import detail_text, model_cells
from inferno_tui.views import merge_loaded, models_from_list


def test_models_screen_shows_the_runner_and_a_failed_models_reason():
    rows = models_from_list([{"name": "a", "kind": "gguf", "state": "available"},
                             {"name": "b", "kind": "gguf", "state": "available"}])
    loaded = [{"name": "a", "state": "loaded", "memory_bytes": 700 << 20, "runner_pid": 4242,
               "runner_rss_bytes": 450 << 20, "runner_cpu_s": 9.5}]
    failed = [{"name": "b", "state": "failed",
               "failed_reason": "b's runner died with SIGSEGV"}]
    a, b = merge_loaded(rows, loaded, failed)
    assert a.runner_pid == 4242 and b.state == "failed"
    text_a = detail_text(None, a).plain
    assert "pid 4242" in text_a and "rss" in text_a and "9.5" in text_a
    text_b = detail_text(None, b).plain
    assert "failed" in text_b and "SIGSEGV" in text_b
    assert str(model_cells(b)[1]) == "failed"
    # loaded again: the failure is gone
    a2, b2 = merge_loaded((a, b), loaded + [{"name": "b", "state": "loaded",
                                              "runner_pid": 4343}])
    assert b2.state == "loaded" and b2.failed_reason is None and b2.runner_pid == 4343

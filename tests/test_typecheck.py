"""mypy is part of `make check` and of CI, strict where the issue promised it.

`make check` and `.ci/run` run for real against stand-in programs that record how they were
called (the type check itself runs in CI; it takes minutes, too long for a test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STRICT_MODULES = {"infernod.protocol.*", "infernod.client", "infernod.client.base",
                  "infernod.client.core", "infernod.client.stream", "infernod.client.config",
                  "infernod.daemon.scheduler", "infernod.daemon.models", "infernod.daemon.generation",
                  "infernod.daemon.requests", "infernod.daemon.queueitem",
                  "infernod.backends.base", "infernod.runner.*"}
# What mypy's --strict stands for, as per-module settings (see test_strict_is_spelled_out).
STRICT_FLAGS = ("disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls",
                "disallow_untyped_defs", "disallow_incomplete_defs",
                "disallow_untyped_decorators", "warn_return_any")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _mypy_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def _stand_ins(tmp_path: Path, mypy_rc: int = 0) -> tuple[dict[str, str], Path]:
    """A venv whose ruff, mypy and python append their argv to a log; an installed stamp."""
    venv, log, wheels = tmp_path / "venv", tmp_path / "calls.log", tmp_path / "wheels"
    (venv / "bin").mkdir(parents=True)
    wheels.mkdir()
    tools = tmp_path / "tools"  # a tmux, so .ci/run never reaches for apt-get
    tools.mkdir()
    for name, rc in (("ruff", 0), ("mypy", mypy_rc), ("python", 0)):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {rc}\n')
        script.chmod(0o755)
    (tools / "tmux").write_text("#!/bin/sh\nexit 0\n")
    (tools / "tmux").chmod(0o755)
    env = {"PATH": f"{tools}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "VENV": str(venv), "WHEELHOUSE": str(wheels)}
    # Installed: the stamp is newer than everything it depends on (no pip, no llama.cpp).
    (wheels / ".built").touch()
    stamp = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "--eval", "print-stamp: ; @echo $(STAMP)",
         "print-stamp"], env=env, capture_output=True, text=True, timeout=60).stdout.strip()
    assert stamp.startswith(f"{venv}/.installed-"), stamp
    later = time.time() + 60
    Path(stamp).touch()
    os.utime(stamp, (later, later))
    return env, log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@needs_make
def test_make_check_runs_lint_then_mypy_then_the_tests(tmp_path: Path) -> None:
    env, log = _stand_ins(tmp_path)
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "check"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tools = [call.split()[0] for call in _calls(log)]
    assert tools == ["ruff", "mypy", "python"], _calls(log)
    assert _calls(log)[2] == "python -m pytest -q"


@needs_make
def test_a_type_error_fails_make_check_before_the_tests(tmp_path: Path) -> None:
    env, log = _stand_ins(tmp_path, mypy_rc=1)
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "check"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert [call.split()[0] for call in _calls(log)] == ["ruff", "mypy"], _calls(log)


@needs_make
def test_ci_runs_the_type_check(tmp_path: Path) -> None:
    env, log = _stand_ins(tmp_path)
    run = subprocess.run([str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    tools = [call.split()[0] for call in _calls(log)]
    assert "mypy" in tools and tools[-1] == "python", _calls(log)


def test_mypy_checks_both_packages_for_python_3_11() -> None:
    cfg = _mypy_config()
    assert cfg["python_version"] == "3.11"
    assert set(cfg["files"]) == {"infernod", "inferno_tui"}


def test_protocol_client_and_scheduler_are_strict() -> None:
    overrides = _mypy_config()["overrides"]
    strict = [o for o in overrides if all(o.get(flag) is True for flag in STRICT_FLAGS)]
    covered = {m for o in strict for m in o["module"]}
    assert STRICT_MODULES <= covered, STRICT_MODULES - covered


def test_strict_is_spelled_out() -> None:
    """`strict = true` in an override switches strict mode on for every module (mypy
    applies it globally), so the strict modules list its flags one by one instead."""
    for override in _mypy_config()["overrides"]:
        assert "strict" not in override, override["module"]


def test_missing_imports_are_ignored_only_for_named_libraries() -> None:
    cfg = _mypy_config()
    assert not cfg.get("ignore_missing_imports")
    for override in cfg["overrides"]:
        if override.get("ignore_missing_imports"):
            assert not any(m.startswith(("infernod", "inferno_tui")) for m in override["module"])


def test_dev_extra_installs_mypy_and_the_psutil_stubs() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    names = {d.split(">")[0].split("=")[0].split("<")[0] for d in dev}
    assert {"mypy", "types-psutil"} <= names


def test_a_failing_sink_is_logged_and_never_reaches_the_decode_thread(
        caplog: pytest.LogCaptureFixture) -> None:
    from infernod.backends.base import GuardedSink

    class Broken:
        def on_started(self, request_id: str, info: dict) -> None:
            raise RuntimeError("started")

        def on_tokens(self, request_id: str, text: str, n_tokens: int) -> None:
            raise RuntimeError("tokens")

        def on_finished(self, request_id: str, reason: str, stats: dict) -> None:
            raise RuntimeError("finished")

        def on_error(self, request_id: str, code: str, message: str, hint: str | None) -> None:
            raise RuntimeError("error")

    sink = GuardedSink(Broken())
    sink.on_started("r1", {})
    sink.on_tokens("r1", "hi", 1)
    sink.on_finished("r1", "stop", {})
    sink.on_error("r1", "internal", "boom", None)
    assert [r.getMessage() for r in caplog.records] == [
        f"sink.{m} failed for request r1"
        for m in ("on_started", "on_tokens", "on_finished", "on_error")]
    GuardedSink(None).on_tokens("r1", "hi", 1)  # no sink: nothing to call


# Parameters that stay ``Any`` on purpose: an untyped library's module, a native handle.
ANY_ALLOWED = {
    ("infernod/telemetry/nvml.py", "NvmlReader", "nvml_module"),  # pynvml (no types) or a fake
    ("infernod/backends/runstate.py", "Run", "sampler"),  # a llama.cpp sampler pointer
    ("infernod/backends/runstate.py", "Run", "grammar"),  # ... its grammar sampler's
    # llama.cpp model and vocabulary pointers (ctypes, from the lazily imported bindings)
    ("infernod/backends/gguf_embed.py", "GgufEmbedder", "model"),
    ("infernod/backends/gguf_embed.py", "GgufEmbedder", "vocab"),
    ("infernod/backends/llama_native.py", "Pieces", "vocab"),
}


def _any_collaborators(root: Path) -> list[str]:
    """Constructor parameters and dataclass fields annotated ``Any`` (or ``Any | None``)."""
    import ast

    found = []
    for path in sorted([*root.glob("infernod/**/*.py"), *root.glob("inferno_tui/**/*.py")]):
        rel = str(path.relative_to(root))
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            named: list[tuple[str, ast.expr | None]] = []
            for item in cls.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    named += [(a.arg, a.annotation)
                              for a in [*item.args.args[1:], *item.args.kwonlyargs]]
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    named.append((item.target.id, item.annotation))
            for name, annotation in named:
                if annotation is None or (rel, cls.name, name) in ANY_ALLOWED:
                    continue
                if ast.unparse(annotation) in ("Any", "Any | None", "Optional[Any]"):
                    found.append(f"{rel}: {cls.name}.{name}: {ast.unparse(annotation)}")
    return found


def test_no_collaborator_is_typed_any() -> None:
    """What a class is built from is named by its type (a class or a small Protocol), so
    mypy checks every call into it: a ModelManager, a Registry, an EngineSink, not Any."""
    assert _any_collaborators(ROOT) == []

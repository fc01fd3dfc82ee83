"""`make run`, for real, against stand-in programs: what it creates on disk."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", 'umask 022 && exec make -s -C "$0" "$@"', str(ROOT),
                           *argv], env=env, capture_output=True, text=True, timeout=120)


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text + "\n")
    path.chmod(0o755)


def test_make_run_makes_the_state_dir_private(tmp_path: Path) -> None:
    # Stand-ins for the venv's programs: `inferno status` answers once infernod has started.
    venv, started = tmp_path / "venv", tmp_path / "started"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "inferno", f'[ -e "{started}" ]')
    _script(venv / "bin" / "infernod", f'touch "{started}"')
    _script(venv / "bin" / "python", "exit 1")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    stamp = _make("--eval", "print-stamp: ; @echo $(STAMP)", "print-stamp", f"VENV={venv}",
                  env=env).stdout.strip()
    assert stamp.startswith(f"{venv}/.installed-"), stamp
    state = tmp_path / "state" / "inferno"
    for existing_mode in (None, 0o755):  # a fresh start, and a directory an older make left
        if existing_mode is not None:
            state.chmod(existing_mode)
            (state / "infernod.log").chmod(0o644)
            started.unlink()
        # -o: the venv is taken as installed (no pip, no llama.cpp build)
        run = _make("-o", stamp, "run", f"VENV={venv}", env=env)
        assert run.returncode == 0, run.stderr
        assert started.exists(), run.stdout
        assert stat.S_IMODE(state.stat().st_mode) == 0o700, oct(state.stat().st_mode)
        log = state / "infernod.log"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, oct(log.stat().st_mode)

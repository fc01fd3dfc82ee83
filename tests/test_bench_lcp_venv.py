"""bench/lcp_venv.py: llama-cpp-python's server for the benches runs from a venv of its own,
built from the wheel the product venv was installed from, and says why when it cannot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import lcp_venv  # noqa: E402


def wheelhouse(root: Path, key: str, args: str) -> Path:
    house = root / f"llama-cpp-python-9.9.9-{key}"
    house.mkdir(parents=True)
    (house / "cmake-args.txt").write_text(args + "\n")
    wheel = house / "llama_cpp_python-9.9.9-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"")
    return wheel


def test_the_wheel_is_the_one_built_with_the_makefiles_flags(tmp_path, monkeypatch):
    import subprocess

    flags = subprocess.run(["make", "-s", "-C", str(lcp_venv.ROOT), "llama-cmake-args"],
                           capture_output=True, text=True, check=True).stdout.strip()
    wheelhouse(tmp_path, "1", "-DGGML_NATIVE=ON")  # a native build: never the bench's
    portable = wheelhouse(tmp_path, "2", flags)
    monkeypatch.setattr(lcp_venv, "WHEELS", tmp_path)
    assert lcp_venv.portable_wheel("9.9.9") == portable
    assert lcp_venv.portable_wheel("9.9.8") is None


def test_a_missing_venv_or_wheel_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(lcp_venv, "CACHE", tmp_path / "bench")
    monkeypatch.setattr(lcp_venv, "WHEELS", tmp_path / "wheels")
    python, why = lcp_venv.server_python(create=False)
    assert python is None and "bench/lcp_venv.py" in why
    python, why = lcp_venv.server_python(create=True)
    assert python is None and "wheel" in why and "make" in why
    assert not (tmp_path / "bench").exists()  # nothing half-made


def test_a_python_without_the_server_extras_is_named(tmp_path):
    why = lcp_venv.runs_server(Path(sys.executable))
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        assert why is not None and "llama_cpp.server" in why
    else:
        pytest.skip("this python has llama-cpp-python[server]: nothing is missing")
    assert lcp_venv.runs_server(tmp_path / "nope" / "python") is not None

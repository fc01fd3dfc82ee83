"""Flash attention: ``models.flash_attn`` reaches llama.cpp, 'auto' (llama-server's default)
by default, so a side-by-side with llama-server compares the same attention kernels."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from infernod import config as cfgmod
from infernod.backends import llama_native as native
from infernod.backends.gguf import GgufEngine
from infernod.daemon.models import LoadedModel, ModelManager
from infernod.model_settings import SettingsStore


class _Runners:
    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    async def start(self, name: str, kwargs: dict[str, Any], **_: Any) -> str:
        self.kwargs = kwargs
        return "engine"


def _runner_kwargs(cfg: cfgmod.Config, settings: SettingsStore | None = None) -> dict[str, Any]:
    runners = _Runners()
    mm = ModelManager(cfg, cast(Any, None), publish=lambda *a: None, notifier=cast(Any, None),
                      runners=cast(Any, runners), scheduler=cast(Any, None),
                      settings=settings)
    info = SimpleNamespace(path=Path("/models/m.gguf"), name="m")
    lm = LoadedModel(name="m", info=cast(Any, info))
    asyncio.run(asyncio.wait_for(mm._start_runner(lm, cast(Any, info)), 10))
    return runners.kwargs


def test_the_setting_reaches_the_runner_and_defaults_to_auto() -> None:
    assert _runner_kwargs(cfgmod.from_dict({}))["flash_attn"] == "auto"
    off = cfgmod.from_dict({"models": {"flash_attn": "off"}})
    assert _runner_kwargs(off)["flash_attn"] == "off"


def test_the_models_own_setting_wins_over_the_config() -> None:
    store = SettingsStore()
    store.update("m", {"flash_attn": "on", "n_ctx": 512, "slots": 2, "threads": 1})
    kw = _runner_kwargs(cfgmod.from_dict({"models": {"flash_attn": "off"}}), store)
    assert (kw["flash_attn"], kw["n_ctx"], kw["n_slots"], kw["n_threads"]) == ("on", 512, 2, 1)


def test_a_bad_value_is_refused_with_the_choices() -> None:
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.from_dict({"models": {"flash_attn": "yes"}})
    assert "flash_attn" in str(e.value) and "auto" in str(e.value)


class _Sink:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


@pytest.mark.model
@pytest.mark.parametrize("mode,said,used", [("auto", "auto", True),
                                             ("off", "disabled", False)])
def test_llama_cpp_builds_its_graph_with_flash_attention_as_asked(
        default_model_path: Path, caplog: pytest.LogCaptureFixture, mode: str,
        said: str, used: bool) -> None:
    native.route_logs()
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        engine = GgufEngine(default_model_path, n_ctx=512, n_slots=2, sink=cast(Any, _Sink()),
                            flash_attn=mode)
        engine.start()
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "llama.cpp"]
    assert any("flash_attn" in line and said in line for line in lines), lines[:40]
    assert any("FLASH_ATTN_EXT" in line for line in lines) == used

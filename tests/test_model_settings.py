"""Per-model settings in the real daemon: `models.set`/`unset`, validated with the config's
rules, kept in the state directory across restarts, shown with where each value came from,
and in effect: the load uses the model's n_ctx and slots, generation its defaults and system
prompt (a request's own value wins), a role it leaves out is refused."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from test_security import _free_port_pair

from infernod import model_settings
from infernod.cli import app as cli
from infernod.client import Client, CurveKeys
from infernod.paths import MODEL_SETTINGS
from infernod.protocol.errors import InfernoError

M = "gemma3-270m"
PROMPT = "The capital of France is"


def _set(c: Client, **values: Any) -> dict[str, Any]:
    return c.request("models.set", {"model": M, "settings": values})


def _run(c: Client, **kw: Any) -> tuple[str, dict[str, Any]]:
    stream = c.generate(M, **kw)
    text = "".join(stream)
    return text, dict(stream.stats or {})


# -- pure: the declarations reuse the config's and the wire's rules --------------------------
def test_values_are_checked_by_the_configs_and_the_wires_rules() -> None:
    assert model_settings.check("n_ctx", 2048) == 2048
    assert model_settings.check("keep_alive_s", 60) == 60.0
    assert model_settings.check("n_gpu_layers", "auto") == "auto"
    assert model_settings.check("temperature", 0) == 0.0
    assert model_settings.check("allowed_roles", ["operator", "user"]) == ["user", "operator"]
    for key, bad in (("n_ctx", 10), ("slots", 0), ("flash_attn", "yes"), ("temperature", 9),
                     ("top_k", "x"), ("pin", "yes"), ("allowed_roles", ["root"]),
                     ("chat_template", "{% if %}"), ("nonsense", 1), ("n_ctx", None)):
        with pytest.raises(InfernoError) as e:
            model_settings.check(key, bad)
        assert e.value.code == "invalid_setting" and e.value.hint, (key, bad)
    # the config's own message, naming the setting and the range
    with pytest.raises(InfernoError) as e:
        model_settings.check("n_ctx", 10)
    assert "n_ctx" in e.value.message and "64" in e.value.message
    assert model_settings.parse_text("n_gpu_layers", "auto") == "auto"
    assert model_settings.parse_text("n_ctx", "512") == 512
    assert model_settings.parse_text("pin", "true") is True
    assert model_settings.parse_text("stop", "a,b") == ["a", "b"]
    assert model_settings.parse_text("temperature", "0.5") == 0.5


def test_the_store_survives_a_restart_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / MODEL_SETTINGS
    store = model_settings.SettingsStore(path)
    store.update("a.b", {"n_ctx": 512, "system_prompt": "Be brief.", "stop": ["\n"]})
    store.save(store.snapshot())
    old = store.snapshot()
    store.update("a.b", unset=["stop"])
    store.save(store.snapshot())
    store.save(old)  # an older snapshot finishing late never overwrites a newer one
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = model_settings.SettingsStore(path)
    assert again.get("a.b") == {"n_ctx": 512, "system_prompt": "Be brief."}
    path.write_text('["a.b"]\nn_ctx = 1\nslots = 2\n')  # a bad value is dropped, not fatal
    assert model_settings.SettingsStore(path).get("a.b") == {"slots": 2}


# -- the real daemon ----------------------------------------------------------------------------
@pytest.mark.model
def test_load_settings_apply_on_load_show_says_where_from_and_persist(daemon_factory) -> None:
    d = daemon_factory()  # the config: n_ctx 1024, slots 4
    with d.client(timeout=60) as c:
        r = _set(c, n_ctx=512, slots=2, keep_alive_s=120)
        assert r["loaded"] is False and sorted(r["changed"]) == ["keep_alive_s", "n_ctx", "slots"]
        s = c.show(M)["settings"]
        assert s["n_ctx"] == {"value": 512, "source": "model"}
        assert s["slots"] == {"value": 2, "source": "model"}
        assert s["flash_attn"]["source"] == "config" and s["temperature"]["source"] == "default"
        c.load(M)
        (lm,) = c.status()["models_loaded"]
        assert (lm["n_ctx"], lm["slots"], lm["keep_alive_s"]) == (512, 2, 120.0)
        # changed while loaded: the reply and show say it waits for the next load
        r = _set(c, n_ctx=768)
        assert r["loaded"] is True and r["next_load"] == ["n_ctx"]
        s = c.show(M)["settings"]
        assert s["n_ctx"] == {"value": 768, "source": "model", "loaded": 512}
        c.load(M, keep_alive=30)  # a request's keep_alive: source "request"
        assert c.show(M)["settings"]["keep_alive_s"] == {"value": 30.0, "source": "request"}
        _set(c, pin=True)  # acts at once on the loaded model, and a request cannot unpin it
        c.load(M, keep_alive=5)
        (lm,) = c.status()["models_loaded"]
        assert lm["pinned"] is True and lm["keep_alive_left_s"] is None
        c.request("models.unset", {"model": M, "keys": ["pin"]})
        (lm,) = c.status()["models_loaded"]
        assert lm["pinned"] is False and lm["keep_alive_s"] == 120.0  # the model's own again
        # an invalid value: a code and a hint, nothing stored, the daemon serves on
        for bad in ({"slots": 0}, {"n_ctx": "big"}, {"flash_attn": "maybe"}, {"bogus": 1}):
            with pytest.raises(InfernoError) as e:
                _set(c, **bad)
            assert e.value.code == "invalid_setting" and e.value.hint
        assert c.show(M)["settings"]["slots"]["value"] == 2
    settings_file = d.state / MODEL_SETTINGS
    assert stat.S_IMODE(settings_file.stat().st_mode) == 0o600

    d.stop()  # a new daemon on the same state directory
    d2 = daemon_factory(base=d.base)
    with d2.client(timeout=60) as c:
        s = c.show(M)["settings"]
        assert s["n_ctx"] == {"value": 768, "source": "model"}
        assert s["slots"] == {"value": 2, "source": "model"}
        c.load(M)
        (lm,) = c.status()["models_loaded"]
        assert (lm["n_ctx"], lm["slots"]) == (768, 2)
        r = c.request("models.unset", {"model": M, "keys": ["n_ctx", "slots"]})
        assert r["next_load"] == ["n_ctx", "slots"]
        s = c.show(M)["settings"]
        assert s["n_ctx"]["value"] == 1024 and s["n_ctx"]["source"] == "config"
        assert s["slots"]["value"] == 4 and s["slots"]["source"] == "config"
        c.unload(M)
        c.load(M)
        (lm,) = c.status()["models_loaded"]
        assert (lm["n_ctx"], lm["slots"]) == (1024, 4)


@pytest.mark.model
def test_default_sampling_and_system_prompt_apply_and_a_request_value_wins(daemon_factory):
    d = daemon_factory()
    with d.client(timeout=60) as c:
        c.load(M)
        chat = [{"role": "user", "content": "Name a colour."}]
        _, plain = _run(c, messages=chat, max_tokens=1)
        _set(c, max_tokens=5, temperature=0, system_prompt="You answer in one short word.")
        # the model's max_tokens and the request's
        _, st = _run(c, prompt=PROMPT, ignore_eos=True)
        assert st["completion_tokens"] == 5
        _, st = _run(c, prompt=PROMPT, ignore_eos=True, max_tokens=7)
        assert st["completion_tokens"] == 7
        # temperature 0 by the model: the same text as a request asking for greedy; a
        # request's own temperature (with a seed) samples
        greedy = _run(c, prompt=PROMPT, max_tokens=16, ignore_eos=True, temperature=0)[0]
        assert _run(c, prompt=PROMPT, max_tokens=16, ignore_eos=True)[0] == greedy
        hot = _run(c, prompt=PROMPT, max_tokens=16, ignore_eos=True, temperature=2.0,
                   seed=11)[0]
        assert hot != greedy
        # the system prompt goes first in a chat without one; a chat's own system wins
        _, with_model_system = _run(c, messages=chat, max_tokens=1)
        own = [{"role": "system", "content": "Hi."}, *chat]
        _, with_own_system = _run(c, messages=own, max_tokens=1)
        assert with_model_system["prompt_tokens"] > with_own_system["prompt_tokens"] \
            > plain["prompt_tokens"]
        c.request("models.unset", {"model": M, "keys": ["system_prompt", "max_tokens"]})
        _, st = _run(c, messages=chat, max_tokens=1)
        assert st["prompt_tokens"] == plain["prompt_tokens"]
        # a template override: chatml instead of the Gemma fallback
        _set(c, chat_template="chatml")
        assert c.show(M)["chat_template_name"] == "chatml"
        stream = c.generate(M, messages=chat, max_tokens=1)
        list(stream)
        assert stream.reply["chat_template"] == "chatml"


def test_allowed_roles_refuse_a_lower_role(daemon_factory, tmp_path: Path) -> None:
    ep = f"tcp://127.0.0.1:{_free_port_pair()}"
    d = daemon_factory({"security": {"tcp_endpoint": ep}}, start=False)
    assert cli.main(["keys", "--state-dir", str(d.state), "init"]) == 0
    assert cli.main(["keys", "--state-dir", str(d.state), "add", "carol", "--role", "user",
                     "--out", str(tmp_path / "k")]) == 0
    d.start()
    carol = CurveKeys.from_files(str(tmp_path / "k/server.key"),
                                 str(tmp_path / "k/carol.key_secret"))
    with d.client() as op, Client(ep, curve=carol, timeout=10) as user:
        _set(op, allowed_roles=["operator"])
        for type_, body in (("generate", {"model": M, "prompt": "hi", "max_tokens": 1}),
                            ("jobs.submit", {"model": M, "prompts": ["hi"]})):
            with pytest.raises(InfernoError) as e:
                user.request(type_, body)
            assert e.value.code == "forbidden" and "operator" in e.value.message, type_
        with pytest.raises(InfernoError) as e:  # setting is the operator's
            user.request("models.set", {"model": M, "settings": {"allowed_roles": []}})
        assert e.value.code == "forbidden"
        op.request("models.unset", {"model": M, "keys": ["allowed_roles"]})
        r = user.request("jobs.submit", {"model": M, "prompts": ["hi"], "max_tokens": 1})
        assert r["items"] == 1
        op.request("jobs.cancel", {"job_id": r["job_id"]})


def test_the_cli_sets_shows_and_unsets(daemon, capsys) -> None:
    ep = ["--endpoint", daemon.endpoint]
    assert cli.main([*ep, "models", "set", M, "n_ctx=512", "temperature=0.2",
                     "system_prompt=Be brief."]) == 0
    assert "applies when the model is next loaded" in capsys.readouterr().out
    assert cli.main([*ep, "show", M]) == 0
    out = capsys.readouterr().out
    assert "settings:" in out and "memory:" in out
    assert any(ln.strip().startswith("host") and "needs" in ln for ln in out.splitlines())
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("n_ctx"))
    assert "512" in line and "model" in line
    assert cli.main([*ep, "models", "set", M, "n_ctx=1"]) == 1
    assert "invalid_setting" in capsys.readouterr().err
    assert cli.main([*ep, "models", "unset", M, "n_ctx"]) == 0
    capsys.readouterr()
    assert cli.main([*ep, "show", M]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.strip().startswith("n_ctx"))
    assert "1024" in line and "config" in line

"""Config parsing, validation, lookup order, reload rules and `inferno config set`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from infernod import config as cfgmod
from infernod.cli import app as cli

ROOT = Path(__file__).resolve().parent.parent


def test_example_file_is_generated_from_the_declarations():
    text = (ROOT / "etc" / "infernod.toml").read_text()
    assert text == cfgmod.example_toml(), "regenerate etc/infernod.toml from example_toml()"
    key_line = re.compile(r"^# [a-z_]+ = ")
    uncommented = "\n".join(line[2:] if key_line.match(line) else line
                            for line in text.splitlines())
    parsed = cfgmod.from_dict(tomllib.loads(uncommented))
    assert parsed.to_dict() == cfgmod.Config().to_dict()


@pytest.mark.parametrize("toml, key, words", [
    ("[models]\nslots = 0", "models.slots", ["0", "1 .. 256"]),
    ("[models]\nslots = true", "models.slots", ["bool", "int"]),
    ("[daemon]\nlog_level = 'loud'", "daemon.log_level", ["'loud'", "'debug'"]),
    ("[telemetry]\nsample_hz = 1e9", "telemetry.sample_hz", ["out of range"]),
    ("[nope]\nx = 1", "nope", ["unknown section"]),
    ("[models]\nslot = 8", "models.slot", ["models.slots"]),
    ("[security]\noperators = [1.5]", "security.operators", ["1.5"]),
    ("models = 3", "models", ["table"]),
    ("[models]\nrunner_nice = 20", "models.runner_nice", ["20", "0 .. 19"]),
    ("[models]\nrunner_nice = -5", "models.runner_nice", ["-5", "0 .. 19"]),
    ("[models]\nrunner_sched = 'fifo'", "models.runner_sched", ["'fifo'", "'batch'"]),
])
def test_bad_values_name_key_value_and_range(tmp_path, toml, key, words):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.load(str(p))
    msg = str(e.value)
    assert key in msg and str(p) in msg
    for w in words:
        assert w in msg


def test_lookup_order(tmp_path, monkeypatch):
    a = tmp_path / "a.toml"
    a.write_text("[models]\nslots = 3\n")
    b = tmp_path / "b.toml"
    b.write_text("[models]\nslots = 5\n")
    monkeypatch.setenv("INFERNO_CONFIG", str(b))
    assert cfgmod.load(str(a)).models.slots == 3
    assert cfgmod.load(None).models.slots == 5
    monkeypatch.delenv("INFERNO_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", tmp_path / "missing.toml")
    assert cfgmod.load(None).source == "built-in defaults"
    user = tmp_path / "xdg" / "inferno" / "infernod.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[models]\nslots = 7\n")
    assert cfgmod.load(None).models.slots == 7


def test_reload_applies_runtime_keys_and_reports_restart_keys():
    old = cfgmod.Config()
    new = cfgmod.from_dict({"models": {"slots": 2, "keep_alive_s": 5.0},
                            "scheduler": {"aging_interval_s": 1.0}})
    eff, applied, restart = cfgmod.reload_diff(old, new)
    assert set(applied) == {"models.keep_alive_s", "scheduler.aging_interval_s"}
    assert restart == ["models.slots"]
    assert eff.models.slots == 8 and eff.models.keep_alive_s == 5.0


def test_cli_config_set_keeps_every_comment_of_the_shipped_file(tmp_path, capsys):
    shipped = Path(__file__).resolve().parent.parent / "etc" / "infernod.toml"
    p = tmp_path / "infernod.toml"
    p.write_text(shipped.read_text())
    comments = [ln for ln in shipped.read_text().splitlines() if ln.startswith("#")]
    assert len(comments) > 100
    assert cli.main(["config", "set", "models.n_ctx", "2048", "--config", str(p)]) == 0
    assert cli.main(["config", "set", "security.max_priority", "operator=vip,user=high",
                     "--config", str(p)]) == 0
    assert cli.main(["config", "set", "models.n_ctx", "8192", "--config", str(p)]) == 0
    text = p.read_text()
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("#")] == comments  # all kept, in order
    assert lines.index("n_ctx = 8192") > lines.index("[models]")
    data = {k: v for k, v in tomllib.loads(text).items() if v}  # the empty [sections] stay
    assert data == {"models": {"n_ctx": 8192},
                    "security": {"max_priority": {"operator": "vip", "user": "high"}}}
    assert cfgmod.load(str(p)).models.n_ctx == 8192


def test_cli_config_set_writes_valid_toml(tmp_path, capsys):
    p = tmp_path / "infernod.toml"
    p.write_text("[models]\nslots = 4\n")
    assert cli.main(["config", "set", "scheduler.aging_interval_s", "2.5",
                     "--config", str(p)]) == 0
    data = tomllib.loads(p.read_text())
    assert data == {"models": {"slots": 4}, "scheduler": {"aging_interval_s": 2.5}}
    assert cli.main(["config", "set", "models.slots", "999", "--config", str(p)]) == 2
    assert "models.slots" in capsys.readouterr().err
    assert tomllib.loads(p.read_text())["models"]["slots"] == 4  # unchanged on error
    assert cli.main(["config", "set", "models.dirs", "/a,/b", "--config", str(p)]) == 0
    assert tomllib.loads(p.read_text())["models"]["dirs"] == ["/a", "/b"]
    assert cli.main(["config", "get", "models.dirs", "--local", "--config", str(p)]) == 0

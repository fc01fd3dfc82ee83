"""Several daemons from one client.toml: `[daemons.NAME]`, `inferno --daemon NAME`, `inferno fleet`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import wait_for

from infernod.cli import main as cli_main
from infernod.client.config import DaemonEntry, read, resolve
from infernod.protocol.errors import InfernoError

MODEL = "gemma3-270m"


def _conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    conf = tmp_path / "client.toml"
    conf.write_text(text)
    monkeypatch.setenv("INFERNO_CLIENT_CONFIG", str(conf))
    monkeypatch.delenv("INFERNO_ENDPOINT", raising=False)
    return conf


def test_the_single_daemon_form_keeps_working(tmp_path, monkeypatch):
    _conf(tmp_path, monkeypatch, 'endpoint = "ipc:///x/control.sock"\n')
    assert resolve() == ("ipc:///x/control.sock", None)
    assert [e.name for e in read().fleet()] == ["default"]


def test_named_daemons_default_and_relative_key_paths(tmp_path, monkeypatch):
    conf = _conf(tmp_path, monkeypatch, (
        'default = "b"\n'
        '[daemons.a]\nendpoint = "ipc:///a/control.sock"\n'
        '[daemons.b]\nendpoint = "ipc:///b/control.sock"\n'
        '[daemons.gpu1]\nendpoint = "tcp://gpu1:7700"\n'
        'server_key = "keys/gpu1.key"\nclient_key = "keys/me.key_secret"\n'))
    f = read()
    assert [e.name for e in f.fleet()] == ["a", "b", "gpu1"]
    assert f.daemons["gpu1"].server_key == str(conf.parent / "keys/gpu1.key")
    assert resolve() == ("ipc:///b/control.sock", None)  # the default
    assert resolve(daemon="a") == ("ipc:///a/control.sock", None)
    with pytest.raises(InfernoError) as e:  # tcp with key files that are not there
        resolve(daemon="gpu1")
    assert e.value.code == "bad_request" and "CURVE key" in e.value.message


@pytest.mark.parametrize("text, words", [
    ('[daemons.a]\nendpont = "ipc:///a"\n', "unknown key daemons.a.'endpont'"),
    ('[daemons.a]\nserver_key = "k"\n', "daemons.a has no endpoint"),
    ('default = "z"\n[daemons.a]\nendpoint = "ipc:///a"\n', "names no [daemons.NAME]"),
    ('[daemons."a b"]\nendpoint = "ipc:///a"\n', "bad daemon name"),
    ('daemons = 3\n', "must be tables"),
])
def test_bad_client_toml_says_which_key(tmp_path, monkeypatch, text, words):
    _conf(tmp_path, monkeypatch, text)
    with pytest.raises(InfernoError) as e:
        read()
    assert e.value.code == "config_error" and words in e.value.message


def test_unknown_daemon_name_lists_the_known_ones(tmp_path, monkeypatch, capsys):
    _conf(tmp_path, monkeypatch, '[daemons.a]\nendpoint = "ipc:///a/control.sock"\n')
    assert cli_main(["--daemon", "nope", "status"]) == 1
    err = capsys.readouterr().err
    assert "no daemon named 'nope'" in err and "known daemons: a" in err


def test_a_fleet_with_no_file_is_the_local_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERNO_CLIENT_CONFIG", str(tmp_path / "absent.toml"))
    assert read().fleet() == [DaemonEntry("local", None)]


@pytest.mark.model
def test_fleet_of_three_with_one_stopped_and_restarted(daemon_factory, tmp_path, monkeypatch,
                                                       capsys):
    ds = {name: daemon_factory() for name in ("alpha", "beta", "gamma")}
    _conf(tmp_path, monkeypatch, "".join(
        f'[daemons.{n}]\nendpoint = "{d.endpoint}"\n' for n, d in ds.items()))

    def fleet() -> dict[str, dict]:
        capsys.readouterr()
        rc = cli_main(["--timeout", "3", "fleet", "--json"])
        rows = json.loads(capsys.readouterr().out)
        assert [r["name"] for r in rows] == ["alpha", "beta", "gamma"]
        assert rc == (0 if all(r["state"] == "connected" for r in rows) else 1)
        return {r["name"]: r for r in rows}

    # --daemon NAME reaches that daemon, not another
    assert cli_main(["--daemon", "beta", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == ds["beta"].pid

    # alpha generates: its row shows the model and tokens per second now
    with ds["alpha"].client(timeout=120) as c:
        c.load(MODEL)
        assert "".join(c.generate(MODEL, "Once upon a time", max_tokens=24, temperature=0))
        runner_pid = c.status()["models_loaded"][0]["runner_pid"]
    rows = fleet()
    assert all(r["state"] == "connected" for r in rows.values())
    assert rows["alpha"]["models_loaded"] == [MODEL] and rows["beta"]["models_loaded"] == []
    assert rows["alpha"]["tokens_per_s"] > 0 and rows["beta"]["tokens_per_s"] == 0
    assert rows["alpha"]["runner_crashes_1h"] == 0
    boot = rows["gamma"]["boot_id"]

    # a runner killed on alpha is counted; gamma stopped is a row with the reason, and the
    # table does not wait for it longer than its timeout
    os.kill(runner_pid, signal.SIGKILL)
    ds["gamma"].stop()
    wait_for(lambda: fleet()["alpha"]["runner_crashes_1h"] == 1, 15, "the crash counted")
    t0 = time.monotonic()
    rows = fleet()
    assert time.monotonic() - t0 < 15
    assert rows["gamma"]["state"] == "unreachable" and rows["gamma"]["reason"]
    assert rows["alpha"]["state"] == rows["beta"]["state"] == "connected"

    # restarted: connected again, a new boot
    ds["gamma"].start()
    rows = fleet()
    assert rows["gamma"]["state"] == "connected" and rows["gamma"]["boot_id"] != boot

    # the table for people names each daemon and why one is missing
    ds["beta"].stop()
    capsys.readouterr()
    assert cli_main(["--timeout", "3", "fleet"]) == 1
    out = capsys.readouterr().out
    assert "alpha" in out and "gamma" in out and "unreachable" in out
    assert f"beta ({ds['beta'].endpoint}):" in out

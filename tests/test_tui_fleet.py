"""inferno-tui with several daemons: the fleet screen, opening one, switching between them
while every connection keeps its subscriptions; plus how it reads client.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Static
from tui_harness import cell as _cell
from tui_harness import until as _until

from inferno_tui.__main__ import parse_args
from inferno_tui.app import InfernoApp
from inferno_tui.connection import Settings
from inferno_tui.state import Snapshot
from inferno_tui.views import MetricsView
from inferno_tui.widgets.status import StatusBar
from infernod.client.config import DaemonEntry

SIZE = (80, 24)


def test_console_reads_client_toml(tmp_path, monkeypatch) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text('[daemons.a]\nendpoint = "ipc:///a/control.sock"\n'
                    '[daemons.b]\nendpoint = "ipc:///b/control.sock"\n')
    monkeypatch.setenv("INFERNO_CLIENT_CONFIG", str(conf))
    monkeypatch.delenv("INFERNO_ENDPOINT", raising=False)
    _, daemons = parse_args([])
    assert [(d.name, d.endpoint) for d in daemons] == [("a", "ipc:///a/control.sock"),
                                                       ("b", "ipc:///b/control.sock")]
    settings, daemons = parse_args(["--daemon", "b"])
    assert [d.name for d in daemons] == ["b"] and settings.endpoint == "ipc:///b/control.sock"
    _, daemons = parse_args(["--endpoint", "ipc:///x", "--endpoint", "ipc:///a/control.sock"])
    assert [d.name for d in daemons] == ["ipc:///x", "a"]  # known endpoints keep their name
    conf.write_text('endpoint = "ipc:///solo/control.sock"\n')  # the single-daemon form
    settings, daemons = parse_args([])
    assert len(daemons) == 1 and settings.endpoint == "ipc:///solo/control.sock"
    with pytest.raises(SystemExit):
        parse_args(["--daemon", "nope"])


def test_fleet_screen_snapshot(snap_compare, tmp_path: Path) -> None:
    names = ("gpu1", "gpu2", "cpu-box")
    app = InfernoApp(Settings(data_dir=str(tmp_path)), connect=False,
                     daemons=[DaemonEntry(n, f"tcp://{n}:7700") for n in names])
    gpu = MetricsView.from_wire({"gpu": {"available": True, "gpus": [{
        "index": 0, "name": "NVIDIA H100", "utilization_gpu_pct": 87.0,
        "memory_used_bytes": 31 * 2**30, "memory_total_bytes": 80 * 2**30}]}})
    for d, status in zip(app.daemons[:2], (
            {"uptime_s": 93_784, "tokens_per_s": 412.5, "runner_crashes_1h": 0,
             "queue": {"queued": 3, "running": 8, "level": "elevated"}},
            {"uptime_s": 310, "tokens_per_s": 0.0, "runner_crashes_1h": 2,
             "queue": {"queued": 0, "running": 0, "level": "healthy"}}), strict=True):
        d.snapshot = Snapshot(connection="connected", version="0.1.0", role="operator",
                              metrics=gpu)
        d.note_status(status)
    app.daemons[2].snapshot = Snapshot(
        connection="disconnected",
        detail="cannot connect to tcp://cpu-box:7700 (retrying)")

    async def run_before(pilot) -> None:
        await pilot.press("down", "down")  # the unreachable one: why, and what to do
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


@pytest.mark.model
async def test_three_daemons_one_stopped_and_restarted(daemon_factory, tmp_path) -> None:
    ds = {name: daemon_factory() for name in ("alpha", "beta", "gamma")}
    app = InfernoApp(Settings(data_dir=str(tmp_path)),
                     daemons=[DaemonEntry(n, d.endpoint) for n, d in ds.items()])
    async with app.run_test(size=SIZE) as pilot:
        assert app.current_mode == "fleet"  # two or more daemons: the fleet first
        table = app.screen.query_one(DataTable)
        await _until(pilot, lambda: table.row_count == 3 and all(
            _cell(table, i, 1) == "connected" and _cell(table, i, 2) for i in range(3)),
            what="three daemons connected with their status")
        assert [_cell(table, i, 0) for i in range(3)] == ["alpha", "beta", "gamma"]
        alpha_client = app.daemons[0].connection.client

        ds["gamma"].stop()
        await _until(pilot, lambda: _cell(table, 2, 1) == "reconnecting", what="gamma lost")
        await pilot.press("down", "down")
        detail = str(app.screen.query_one("#fleet-detail", Static).render())
        assert "gamma: not answering since" in detail
        assert "systemctl status infernod" in detail
        assert "Error" not in detail and "ZMQ" not in detail

        ds["gamma"].start()
        await _until(pilot, lambda: _cell(table, 2, 1) == "connected", 30, "gamma back")

        await pilot.press("up")  # beta
        await pilot.press("enter")
        await _until(pilot, lambda: app.current_mode == "models", 10, "models screen")
        assert app.current.name == "beta" and app.connection is app.daemons[1].connection
        bar = app.screen.query_one(StatusBar)
        await _until(pilot, lambda: "beta" in str(bar.render()), 10, "beta in the status bar")

        await pilot.press("f6")  # the next daemon, on the same screen
        assert app.current.name == "gamma" and app.current_mode == "models"
        await _until(pilot, lambda: "gamma" in str(bar.render()), 10, "gamma in the bar")
        await pilot.press("0")
        assert app.current_mode == "fleet"
        # alpha was never reconnected: its subscriptions stayed open the whole time
        assert app.daemons[0].connection.client is alpha_client
        assert app.daemons[0].snapshot.connection == "connected"


async def test_one_daemon_has_no_fleet_screen(tmp_path) -> None:
    app = InfernoApp(Settings(data_dir=str(tmp_path)), connect=False,
                     snapshot=Snapshot(connection="connected"))
    async with app.run_test(size=SIZE) as pilot:
        assert app.current_mode == "models"
        await pilot.press("0")
        assert app.current_mode == "models"
        await pilot.press("f6")
        assert app.active == 0

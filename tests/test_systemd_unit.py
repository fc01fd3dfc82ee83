"""The shipped unit verifies and keeps its hardening (exposure score) below a threshold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "infernod.service"
EXPOSURE_MAX = 2.5  # README records the measured score; raise only with a reason

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed on this machine")


def _unit_with_real_binary(tmp_path: Path) -> Path:
    binary = Path(sys.executable).parent / "infernod"
    text = UNIT.read_text().replace("/opt/inferno/venv/bin/infernod", str(binary))
    out = tmp_path / "infernod.service"
    out.write_text(text)
    return out


def test_unit_verifies(tmp_path):
    r = subprocess.run(["systemd-analyze", "verify", str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_unit_is_type_notify_with_watchdog():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "RuntimeDirectory=infernod",
                 "StateDirectory=infernod", "ConfigurationDirectory=infernod",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "NoNewPrivileges=yes", "DevicePolicy=closed", "DeviceAllow=/dev/nvidiactl",
                 "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "UMask="):
        assert line in text, line


def test_unit_bounds_memory(tmp_path):
    """The daemon's own limits (models budget, request bytes) can fail or be misconfigured:
    the unit gives the kernel a hard ceiling below the host's memory."""
    r = subprocess.run(["systemd-analyze", "verify", str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert "MemoryMax" in settings, "systemd/infernod.service sets no MemoryMax="
    max_pct = re.fullmatch(r"(\d+)%", settings["MemoryMax"])
    assert max_pct and 75 < int(max_pct.group(1)) < 100, settings["MemoryMax"]
    assert settings.get("MemorySwapMax") == "0"


def test_exposure_score_below_threshold(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true",
                        str(_unit_with_real_binary(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= EXPOSURE_MAX


def test_runners_under_the_unit_can_lower_their_priority_and_end_at_normal():
    """Runners lower their own priority (models.runner_nice, runner_sched) with setpriority
    and sched_setscheduler, both in @resources, which the unit denies: without the allow line
    they got EPERM and ran at the daemon's priority. The daemon starts at Nice=-10 so that its
    runners, at the default runner_nice, end at 0, level with the host's other programs."""
    from infernod.config import ModelsConfig

    lines = [line.strip() for line in UNIT.read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    filters = [line.split("=", 1)[1].split() for line in lines
               if line.startswith("SystemCallFilter=")]
    denied = next(i for i, f in enumerate(filters) if f[0].startswith("~"))
    allowed_after = {name for f in filters[denied + 1:] if not f[0].startswith("~") for name in f}
    assert {"setpriority", "sched_setscheduler"} <= allowed_after, filters
    nice = int(dict(line.split("=", 1) for line in lines if "=" in line)["Nice"])
    assert nice + ModelsConfig().runner_nice == 0, nice

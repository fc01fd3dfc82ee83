"""docs/operations.md must name the files and the service user the code and unit really use:
an operator backs up, restores and chowns from that page alone."""

from __future__ import annotations

import re
from pathlib import Path

from infernod.daemon.registry import Registry
from infernod.keys import keys_dir
from infernod.paths import DEFAULT_DAEMON_USER, JOBS_DB, MODEL_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "operations.md").read_text()
UNIT = (ROOT / "systemd" / "infernod.service").read_text()


def test_state_dir_entries_in_the_doc_are_the_ones_the_daemon_makes(tmp_path):
    state = tmp_path / "state"
    made = {JOBS_DB, MODEL_SETTINGS, keys_dir(state).name,
            Registry([], state).model_dirs[-1].name}
    unit_state = "/var/lib/" + re.search(r"^StateDirectory=(\S+)", UNIT, re.M).group(1)
    named = set(re.findall(rf"{re.escape(unit_state)}/([\w.-]+)", DOC))
    assert f"{unit_state}/{JOBS_DB}" in DOC
    assert named <= made, f"docs/operations.md names {named - made} under {unit_state}"


def test_the_doc_describes_the_units_user_not_another_scheme():
    user = re.search(r"^User=(\S+)", UNIT, re.M).group(1)
    assert user == DEFAULT_DAEMON_USER  # the client trusts sockets of this user by default
    dynamic = re.search(r"^DynamicUser=(yes|true|1)", UNIT, re.M) is not None
    assert ("DynamicUser" in DOC) == dynamic, "docs/operations.md and the unit disagree"
    assert f"sudo -u {user} inferno keys init" in DOC

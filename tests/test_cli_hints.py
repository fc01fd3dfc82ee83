"""Every ``inferno ...`` command a message or hint of the daemon names exists in the CLI:
a hint that sends the user to a command that is not there (``inferno models import``) is
worse than none."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from infernod.cli.app import build_parser

ROOT = Path(__file__).resolve().parent.parent
QUOTED = re.compile(r"(?:['`]|: )inferno ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(sp: argparse.ArgumentParser) -> set[str] | None:
    """What may follow the command: its first positional's choices or subcommands (None:
    anything, e.g. a model name)."""
    subs = _subparsers(sp)
    if subs:
        return set(subs)
    for action in sp._actions:
        if not action.option_strings and action.dest != "help":
            return set(action.choices) if action.choices else None
    return None


def test_every_quoted_command_exists() -> None:
    commands = _subparsers(build_parser())
    wrong = []
    for path in sorted((ROOT / "infernod").rglob("*.py")):
        for m in QUOTED.finditer(path.read_text()):
            cmd, word = m.groups()
            if cmd not in commands:
                wrong.append(f"{path.relative_to(ROOT)}: inferno {cmd}")
                continue
            allowed = _words(commands[cmd])
            if word and allowed is not None and word not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}: inferno {cmd} {word}")
    assert not wrong, f"hints naming commands the CLI does not have: {wrong}"

"""The ONNX commands of ``inferno``: ``embed`` and ``models convert-onnx``.

Kept apart from cli.py so the main command table stays readable; cli.py registers them.
Like the rest of the CLI this imports no backend: vectors come back as numpy arrays from
the client, and the converter (torch) is imported only when ``convert-onnx`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infernod.protocol.vocabulary import PRIORITIES

if TYPE_CHECKING:
    from infernod.client import Client

DEFAULT_CONVERT_NAME = "all-minilm-l6-v2"


def add_embed_parser(add: Any) -> None:
    """``inferno embed MODEL TEXT... [--json] [--no-normalize] [--priority P]``."""
    sp = add("embed", "embed texts with an ONNX embedding model ('-' reads lines from stdin)")
    sp.add_argument("model")
    sp.add_argument("texts", nargs="+", metavar="TEXT")
    sp.add_argument("--no-normalize", action="store_true",
                    help="raw mean-pooled vectors instead of unit length")
    sp.add_argument("--priority", choices=PRIORITIES)


def embed(args: argparse.Namespace, client: Client) -> int:
    """Print one vector per text: JSON ({model, dim, vectors, truncated, tokens, stats}) with
    --json, else one line per text with its token count and the vector's first values."""
    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with client as c:
        vectors, info = c.embed(args.model, texts, normalize=not args.no_normalize,
                                priority=args.priority)
    if args.json:
        json.dump({**info, "vectors": vectors.tolist()}, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    for text, vec, n, cut in zip(texts, vectors, info["tokens"], info["truncated"], strict=True):
        head = " ".join(f"{x:+.4f}" for x in vec[:6])
        note = " (truncated)" if cut else ""
        print(f"[{head} ...] {n} tokens{note}  {text[:60]}")
    s = info.get("stats") or {}
    print(f"{len(texts)} vectors of {info['dim']} floats in {s.get('total_ms', 0):.0f} ms "
          f"({s.get('provider')})", file=sys.stderr)
    return 0


def default_convert_dir() -> Path:
    """Where ``convert-onnx`` writes by default: the user daemon's own model directory, so
    the model is served without an import step."""
    from infernod.paths import state_dir

    return state_dir() / "models" / DEFAULT_CONVERT_NAME


def convert_onnx(argv: list[str]) -> int:
    """``inferno models convert-onnx [OUT_DIR] [--force] [--opset N]``."""
    from infernod.backends import convert_onnx as conv

    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        if "-h" not in argv and "--help" not in argv:
            argv.insert(0, str(default_convert_dir()))
    out = Path(argv[0]).expanduser() if argv and not argv[0].startswith("-") else None
    rc = conv.main(argv)
    if rc == 0 and out is not None:
        name = out.name
        in_models = out.resolve().parent == default_convert_dir().parent.resolve()
        print("next steps:")
        if not in_models:
            print(f"  inferno import {out} --name {name}   (or --link to serve it in place)")
        print(f"  inferno embed {name} 'a first sentence' 'another one'")
        print(f"  check it: {out / conv.REFERENCE_FILE} holds reference vectors from the "
              "original model")
    return rc

"""`inferno models set|unset|keys`: a model's own settings, and how `inferno show` prints them."""

from __future__ import annotations

import argparse
from typing import Any

from infernod import model_settings
from infernod.cli.common import EXIT_OK, EXIT_USAGE, _client, _err, _print_json


def models_settings(args: argparse.Namespace) -> int:
    """``models set NAME key=value ...``, ``models unset NAME key ...``, ``models keys``."""
    rest = list(args.rest)
    if args.action == "keys":
        rows = model_settings.describe()
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                src = f" (as {r['config_key']})" if r["config_key"] else ""
                print(f"{r['key']:18} {r['applies']:9}  {r['doc']}{src}")
        return EXIT_OK
    if len(rest) < 2:
        _err(f"usage: inferno models {args.action} NAME "
             + ("key=value ..." if args.action == "set" else "key ..."))
        return EXIT_USAGE
    name, items = rest[0], rest[1:]
    if args.action == "set":
        values: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                _err(f"{item!r}: expected key=value")
                return EXIT_USAGE
            values[key] = model_settings.parse_text(key, text)
        body: dict[str, Any] = {"model": name, "settings": values}
    else:
        body = {"model": name, "keys": items}
    with _client(args) as c:
        r = c.request(f"models.{args.action}", body)
    if args.json:
        _print_json(r)
        return EXIT_OK
    verb = "set" if args.action == "set" else "unset"
    print(f"{r['model']}: {verb} {', '.join(r['changed'])}")
    if r.get("next_load"):
        print(f"{r['model']} is loaded now: {', '.join(r['next_load'])} take effect on its "
              f"next load (inferno unload {r['model']}; inferno load {r['model']})")
    elif r.get("loaded"):
        print("applied to the loaded model")
    else:
        print("applies when the model is next loaded")
    return EXIT_OK


def print_settings(settings: dict[str, dict[str, Any]]) -> None:
    """`inferno show`'s settings block: effective value, where it came from, and the value
    a loaded model runs with when its next load would differ."""
    print("settings:")
    for key, s in settings.items():
        value = s["value"]
        shown = repr(value) if isinstance(value, str) else str(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        extra = ""
        if "loaded" in s:
            extra = f"  (loaded with {s['loaded']}; applies on the next load)"
        elif "resolved" in s:
            extra = f"  (resolved to {s['resolved']})"
        print(f"  {key:18} {shown:24} {s['source']}{extra}")


def print_memory(memory: dict[str, Any]) -> None:
    """`inferno show`'s memory block: what a load takes on each device beside its budget."""
    from infernod.cli.common import _bytes

    print(f"memory:                n_gpu_layers {memory.get('n_gpu_layers')}"
          + ("" if memory.get("gpu_offload_supported") is not False
             else " (this llama.cpp cannot offload to a GPU)"))
    for device, d in (memory.get("devices") or {}).items():
        print(f"  {device:18} needs {_bytes(d.get('estimate_bytes')):>9} of "
              f"{_bytes(d.get('budget_bytes'))}, {_bytes(d.get('used_bytes'))} used by "
              "other models" + (f", {_bytes(d['others_bytes'])} by other processes"
                                if "others_bytes" in d else ""))


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """The `models` command's actions and their operands."""
    sp.add_argument("action", nargs="?", choices=("list", "convert-onnx", "set", "unset", "keys"),
                    default="list")
    sp.add_argument("rest", nargs=argparse.REMAINDER,
                    help="convert-onnx: [OUT_DIR] [--force]; set: NAME key=value ...; "
                         "unset: NAME key ...")

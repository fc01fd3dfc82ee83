"""`inferno`: the command line for people and scripts.

Exit codes: 0 success, 1 the request failed, 2 usage or config error, 3 daemon unavailable.
Every read command takes --json and then prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from infernod.cli.common import (  # noqa: F401 (re-exported for tests)
    COMMANDS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    _bytes,
    _client,
    _console,
    _err,
    _print_json,
    command,
)
from infernod.client import Notice
from infernod.protocol.errors import DaemonUnavailable, InfernoError
from infernod.protocol.vocabulary import PRIORITIES


# -- commands -------------------------------------------------------------------------------
@command("status")
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status()
    if args.json:
        _print_json(st)
        return EXIT_OK
    con = _console()
    con.print(f"[bold]infernod {st['version']}[/] pid {st['pid']} up {st['uptime_s']:.0f}s "
              f"on {st['endpoints']['control']}")
    q = st["queue"]
    con.print(f"queue: {q['running']} running, {q['queued']} waiting ({q['level']}); "
              f"loop lag {st['loop_lag_ms']:.1f} ms")
    held = st.get("held")
    if held:
        con.print("held: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in held.items()))
    cpu = st.get("cpu")
    if cpu and not cpu.get("ok"):
        con.print(f"[bold red]GGUF models disabled[/]: {cpu['reason']} (see: inferno doctor)")
    loaded = st["models_loaded"]
    if loaded:
        for m in loaded:
            runner = (f", runner pid {m['runner_pid']} (rss {_bytes(m.get('runner_rss_bytes'))}, "
                      f"cpu {m.get('runner_cpu_s')} s)" if m.get("runner_pid") else "")
            con.print(f"  {m['name']}: {m['state']}, {_bytes(m['memory_bytes'])}, "
                      f"{m['running']} running{runner}")
    else:
        con.print("no model loaded (try: inferno load gemma3-270m)")
    for f in st.get("models_failed") or []:
        from rich.markup import escape

        con.print(f"  [bold red]{escape(str(f['name']))}: failed[/]: "
                  f"{escape(str(f.get('failed_reason')))}")
    return EXIT_OK


@command("models")
def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "convert-onnx":  # local: exports a model, talks to no daemon
        from infernod.cli.onnx import convert_onnx

        return convert_onnx(args.rest)
    if args.action in ("set", "unset", "keys"):
        from infernod.cli.settings import models_settings

        return models_settings(args)
    with _client(args) as c:
        listing = c.model_listing()
    models, skipped = listing["models"], listing.get("skipped") or []
    if args.json:
        _print_json(models)
        for s in skipped:
            print(f"inferno: skipped {s.get('path')}: {s.get('reason')}", file=sys.stderr)
        return EXIT_OK
    from rich.table import Table

    table = Table("name", "kind", "arch", "params", "quant", "size", "ctx", "state")
    for m in models:
        params = m.get("param_count")
        table.add_row(m["name"], str(m.get("kind", "")), str(m.get("architecture", "")),
                      f"{params / 1e6:.0f}M" if isinstance(params, (int, float)) else "-",
                      str(m.get("quantization") or "-"), _bytes(m.get("size_bytes")),
                      str(m.get("context_length") or "-"), m.get("state", ""))
    _console().print(table)
    for m in models:
        if m.get("state") == "failed":
            from rich.markup import escape

            refused = m.get("loads_refused_for_s") or 0
            _console().print(f"{escape(m['name'])} failed: {escape(str(m.get('failed_reason')))}"
                             + (f" (loads refused for {refused:.0f}s)" if refused else ""))
    if skipped:
        from rich.markup import escape

        _console().print(f"skipped {len(skipped)} file(s) in the model directories:")
        for s in skipped:
            _console().print(f"  {escape(str(s.get('path')))}: {escape(str(s.get('reason')))}")
    return EXIT_OK


@command("embed")
def cmd_embed(args: argparse.Namespace) -> int:
    from infernod.cli.onnx import embed

    return embed(args, _client(args))


@command("show")
def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.show(args.model)
    if args.json:
        _print_json(info)
    else:
        from infernod.cli.settings import print_memory, print_settings

        for k, v in info.items():
            if k not in ("metadata", "chat_template", "settings", "memory"):
                print(f"{k:22} {v}")
        if info.get("memory"):
            print_memory(info["memory"])
        if info.get("settings"):
            print_settings(info["settings"])
    return EXIT_OK


@command("load")
def cmd_load(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.load(args.model, keep_alive=args.keep_alive)
    if args.json:
        _print_json(r)
    else:
        print(f"loaded {r['model']} in {r['load_s']:.2f}s ({_bytes(r['memory_bytes'])})")
    return EXIT_OK


@command("unload")
def cmd_unload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.unload(args.model)
    print(json.dumps(r) if args.json else f"unloaded {r['model']}")
    return EXIT_OK


@command("import")
def cmd_import(args: argparse.Namespace) -> int:
    """Sends FILE from this machine (read with your rights); with --daemon-path the daemon
    imports a path on its own host, only from its models.import_dirs."""
    if args.daemon_path or args.link:
        with _client(args) as c:
            r = c.import_path(args.path, args.name, link=args.link)
        print(json.dumps(r) if args.json else f"imported {r['model']} ({r['path']})")
        return EXIT_OK
    path = Path(args.path)
    if path.is_dir():
        _err(f"{path} is a directory: only a .gguf or .onnx file can be sent; copy a "
             "directory model into a model directory on the daemon's host, or use "
             "--daemon-path for one inside models.import_dirs")
        return EXIT_USAGE
    show = sys.stderr.isatty() and not args.json
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if not show:
            return
        rate = done / max(time.monotonic() - started, 1e-3)
        sys.stderr.write(f"\rsending {path.name}: {done * 100 // max(total, 1):3d}% "
                         f"{_bytes(done)} of {_bytes(total)}, {rate / 2**20:,.0f} MiB/s ")
        sys.stderr.flush()

    with _client(args) as c:
        try:
            r = c.upload_model(path, args.name, progress=progress, resume=not args.restart)
        finally:
            if show:
                sys.stderr.write("\n")
    print(json.dumps(r) if args.json else
          f"imported {r['model']} ({r['path']}, {_bytes(r['size'])}, sha256 {r['sha256']})")
    return EXIT_OK


@command("remove")
def cmd_remove(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.request("models.remove", {"model": args.model})
    print(json.dumps(r) if args.json else f"removed {r['model']}")
    return EXIT_OK


def _gen_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
            "stop": args.stop or None, "priority": args.priority,
            "deadline": time.time() + args.deadline if args.deadline else None}


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _gen_params(args)
    if args.json_schema:
        try:
            with open(args.json_schema) as f:
                params["json_schema"] = json.load(f)
        except (OSError, ValueError) as e:
            print(f"inferno: --json-schema {args.json_schema}: {e}", file=sys.stderr)
            return EXIT_USAGE
    if args.logprobs is not None:
        params.update(logprobs=True, top_logprobs=args.logprobs)
    with _client(args) as c:
        stream = c.generate(args.model, prompt, **params)
        try:
            for text in stream:
                if not args.json:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            raise
    if args.json:
        out: dict[str, Any] = {"request_id": stream.request_id, "text": stream.text,
                               "stats": stream.stats}
        if args.logprobs is not None:
            out["logprobs"] = stream.logprobs
        _print_json(out)
    else:
        sys.stdout.write("\n")
        if args.verbose and stream.stats:
            s = stream.stats
            print(f"[{s.get('completion_tokens')} tokens, {s.get('tokens_per_s', 0):.1f} tok/s, "
                  f"ttft {s.get('ttft_ms', 0):.0f} ms, {s.get('finish_reason')}]",
                  file=sys.stderr)
    return EXIT_OK


@command("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {args.model}; empty line or Ctrl-D to quit", file=sys.stderr)
    with _client(args) as c:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            stream = c.generate(args.model, messages=messages, **_gen_params(args))
            try:
                for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                stream.cancel()
                print("\n[stopped]")
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": stream.text})
    return EXIT_OK


@command("cancel")
def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.cancel(args.request_id)
    print(json.dumps(r) if args.json else f"{r['request_id']}: {r['state']}")
    return EXIT_OK


@command("watch")
def cmd_watch(args: argparse.Namespace) -> int:
    topics = tuple(args.topic or ("heartbeat", "metrics", "models", "queue", "stats",
                                  "profiles", "tokens."))
    with _client(args, topics=topics) as c:
        c.wait_welcome()
        for ev in c.events(args.duration or None):
            if isinstance(ev, Notice):  # the library's own: a gap, or a restarted daemon
                if args.json:
                    print(json.dumps({"notice": ev.kind, "topic": ev.topic, "lost": ev.lost,
                                      "message": ev.message}), flush=True)
                else:
                    print(f"{'!':10} {'':7} {ev.kind:12} {ev.message}", flush=True)
            elif args.json:
                print(json.dumps({"topic": ev.topic, "type": ev.type, "seq": ev.seq,
                                  "ts": ev.ts, "body": ev.body}, default=str), flush=True)
            else:
                print(f"{ev.topic:10} #{ev.seq:<6} {ev.type:12} {_brief(ev.body)}",
                      flush=True)
    return EXIT_OK


def _brief(body: dict[str, Any]) -> str:
    text = json.dumps(body, default=str)
    return text if len(text) < 160 else text[:157] + "..."


@command("config")
def cmd_config(args: argparse.Namespace) -> int:
    from infernod import config as cfgmod

    if args.action == "get":
        if args.local:
            cfg = cfgmod.load(args.config)
            value = cfgmod.get_key(cfg, args.key) if args.key else cfg.to_dict()
        else:
            with _client(args) as c:
                r = c.config_get(args.key)
            value = r.get("value") if args.key else r.get("config")
        if args.json or not args.key:
            _print_json(value)
        else:
            print(value)
        return EXIT_OK
    if args.action == "keys":
        rows = cfgmod.describe()
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['key']:34} {r['default']!r:>12}  {r['doc']}")
        return EXIT_OK
    # set: validate with the daemon's own rules, then write valid TOML atomically
    if args.key is None or args.value is None:
        _err("usage: inferno config set KEY VALUE")
        return EXIT_USAGE
    return config_set(args.config, args.key, args.value)


def config_set(explicit: str | None, key: str, text: str) -> int:
    """Set one key in the config file, keeping every comment, blank line and key order
    (tomlkit edits the document in place), after validating the value and the whole file."""
    import os
    import tomllib

    import tomlkit

    from infernod import config as cfgmod

    value = cfgmod.check_value(key, cfgmod.parse_cli_value(key, text))
    path = Path(explicit) if explicit else (cfgmod.find_config() or cfgmod.user_config_path())
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    section, _, name = key.partition(".")
    table = doc.get(section)
    if table is None:
        table = tomlkit.table()
        doc.add(section, table)
    if isinstance(value, dict):  # one line, as the shipped file shows it
        item = tomlkit.inline_table()
        item.update(value)
        table[name] = item
    else:
        table[name] = value
    out = tomlkit.dumps(doc)
    cfgmod.from_dict(tomllib.loads(out), path)  # the whole file must still be valid
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(out)
    os.replace(tmp, path)
    spec = cfgmod.key_spec(key)[1]
    note = "restart infernod to apply" if spec.metadata["restart"] else \
        "send SIGHUP (systemctl reload infernod) to apply"
    print(f"{key} = {value!r} written to {path}; {note}")
    return EXIT_OK


# -- argument parsing -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferno", description="Inferno command line")
    p.add_argument("--endpoint", help="ipc://DIR/control.sock or tcp://host:port "
                   "(default: $INFERNO_ENDPOINT or the local daemon)")
    p.add_argument("--server-key", help="server public key file (tcp:// with CURVE)")
    p.add_argument("--client-key", help="client secret key file (tcp:// with CURVE)")
    p.add_argument("--daemon", metavar="NAME",
                   help="a daemon named in client.toml ([daemons.NAME]); see 'inferno fleet'")
    p.add_argument("--timeout", type=float, default=10.0, help="request timeout, seconds")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    add("status", "daemon status")
    sp = add("models", "list models; 'models set NAME key=value ...' / 'unset NAME key ...' "
                       "a model's own settings ('models keys' lists them); 'models "
                       "convert-onnx [OUT_DIR]' exports all-MiniLM-L6-v2")
    from infernod.cli.settings import add_arguments

    add_arguments(sp)
    from infernod.cli.onnx import add_embed_parser

    add_embed_parser(add)
    add("show", "show one model's details").add_argument("model")
    sp = add("load", "load a model")
    sp.add_argument("model")
    sp.add_argument("--keep-alive", type=float, help="idle seconds before unload; -1 pins")
    add("unload", "unload a model").add_argument("model")
    sp = add("import", "send a .gguf/.onnx file to the daemon as a new model")
    sp.add_argument("path", help="a file on this machine (read with your rights)")
    sp.add_argument("--name", help="model name (default from the file name)")
    sp.add_argument("--restart", action="store_true",
                    help="start over instead of resuming an interrupted upload")
    sp.add_argument("--daemon-path", action="store_true",
                    help="PATH is on the daemon's host, inside its models.import_dirs: the "
                         "daemon copies it itself")
    sp.add_argument("--link", action="store_true",
                    help="with --daemon-path: symlink instead of copying")
    add("remove", "delete an imported model").add_argument("model")
    for name, help_ in (("run", "generate from a prompt ('-' reads stdin)"),
                        ("chat", "interactive chat")):
        sp = add(name, help_)
        sp.add_argument("model")
        if name == "run":
            sp.add_argument("prompt")
            sp.add_argument("-v", "--verbose", action="store_true", help="print stats")
            sp.add_argument("--json-schema", metavar="FILE", help="a JSON Schema file the "
                            "output must match (enforced by a grammar)")
            sp.add_argument("--logprobs", type=int, metavar="N", help="with --json: each "
                            "token's log-probability and its N most likely alternatives")
        else:
            sp.add_argument("--system", help="system prompt")
        sp.add_argument("--max-tokens", type=int, default=256)
        sp.add_argument("--temperature", type=float)
        sp.add_argument("--top-p", type=float)
        sp.add_argument("--top-k", type=int)
        sp.add_argument("--seed", type=int)
        sp.add_argument("--stop", action="append", help="stop string (repeatable)")
        sp.add_argument("--priority", choices=PRIORITIES)
        sp.add_argument("--deadline", type=float, metavar="SECONDS",
                        help="fail with deadline_exceeded unless done within SECONDS")
    add("cancel", "cancel a request").add_argument("request_id")
    sp = add("watch", "print events as they arrive")
    sp.add_argument("--topic", action="append", help="topic prefix (repeatable)")
    sp.add_argument("--duration", type=float, help="stop after this many seconds")
    sp = add("config", "read or change infernod.toml")
    sp.add_argument("action", choices=("get", "set", "keys"))
    sp.add_argument("key", nargs="?")
    sp.add_argument("value", nargs="?")
    sp.add_argument("--config", help="config file to read/write")
    sp.add_argument("--local", action="store_true", help="read the file, not the daemon")
    from infernod.cli import jobs as cli_jobs  # jobs, queue, reprioritize

    cli_jobs.add_parsers(add)
    from infernod.cli import pull as cli_pull  # pull

    cli_pull.add_parser(add)
    from infernod.cli import keys as cli_keys  # keys init/add/list/revoke

    cli_keys.add_parser(sub)
    COMMANDS["keys"] = cli_keys.cmd_keys
    from infernod.cli import doctor as cli_doctor  # doctor

    cli_doctor.add_parser(add)
    COMMANDS["doctor"] = lambda a: cli_doctor.cmd_doctor(a, _client)
    from infernod.cli import telemetry as cli_telemetry  # stats, metrics, bench

    cli_telemetry.add_parsers(add)
    from infernod.cli import fleet as cli_fleet  # fleet

    cli_fleet.add_parser(add)
    COMMANDS["fleet"] = cli_fleet.cmd_fleet
    return p


def main(argv: list[str] | None = None) -> int:
    from infernod import config as cfgmod

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        return COMMANDS[args.cmd](args)
    except DaemonUnavailable as e:
        _err(f"{e.message} ({e.hint})")
        return EXIT_UNAVAILABLE
    except InfernoError as e:
        _err(f"{e.code}: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""))
        return EXIT_FAILED
    except cfgmod.ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


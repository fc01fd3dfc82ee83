"""`inferno keys init|add|list|revoke`: CURVE keys for the daemon's tcp:// endpoint, and
API keys (``--http``) for the users of ``inferno-gateway`` (``infernod.apikeys``).

Run on the daemon's host, as the user that owns its state directory (under systemd:
``sudo -u infernod inferno keys ... --state-dir /var/lib/infernod``, or as root followed by
a chown). Works without a running daemon; the daemon picks up allow-list changes by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infernod import apikeys, keys


def add_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("keys", help="CURVE keys for remote (tcp://) access, API keys for HTTP")
    sp.add_argument("--config", help="the daemon's infernod.toml (to find its state dir)")
    sp.add_argument("--state-dir", help="the daemon's state directory (overrides --config)")
    ks = sp.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    p = ks.add_parser("init", help="create the server key pair")
    p.add_argument("--force", action="store_true", help="replace existing server keys")
    p = ks.add_parser("add", help="make a client key pair and allow it (--http: an API key)")
    p.add_argument("name")
    p.add_argument("--role", choices=keys.CLIENT_ROLES, required=True)
    p.add_argument("--http", action="store_true",
                   help="an API key for the HTTP gateway: printed once, stored as a hash")
    p.add_argument("--out", help="directory for the user's files (default ./inferno-keys-NAME)")
    p.add_argument("--force", action="store_true", help="replace a key of the same name")
    p = ks.add_parser("list", help="list allowed client keys and API keys")
    p.add_argument("--json", action="store_true")
    ks.add_parser("revoke", help="remove a client key or API key").add_argument("name")


def keys_dir(args: argparse.Namespace) -> Path:
    from infernod import config as cfgmod
    from infernod.paths import state_dir

    if args.state_dir:
        return keys.keys_dir(Path(args.state_dir))
    return keys.keys_dir(state_dir(cfgmod.load(args.config).daemon.state_dir))


def cmd_keys(args: argparse.Namespace) -> int:
    kdir = keys_dir(args)
    try:
        return _run(args, kdir)
    except keys.KeyStoreError as e:
        print(f"inferno: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, kdir: Path) -> int:
    if args.keys_cmd == "init":
        pub, sec = keys.init_server(kdir, force=args.force)
        print(f"server keys written: {pub} (give to clients), {sec} (secret, 0600)")
        print("now set security.tcp_endpoint and restart infernod")
        return 0
    if args.keys_cmd == "add" and args.http:
        key, entry = apikeys.add(kdir, args.name, args.role, force=args.force)
        print(key)  # alone on stdout: KEY=$(inferno keys add NAME --role user --http)
        print(f"added API key {entry.name} as {entry.role} (principal key:{entry.name}); "
              "this is the only time it is shown, only its hash is kept in "
              f"{apikeys.path_in(kdir)}", file=sys.stderr)
        print("HTTP clients send it as 'Authorization: Bearer KEY' (OPENAI_API_KEY)",
              file=sys.stderr)
        return 0
    if args.keys_cmd == "add":
        if any(k.name == args.name for k in apikeys.list_keys(kdir)):
            raise keys.KeyStoreError(f"{args.name} already names an API key (principal "
                                     f"key:{args.name})", "pick another name: one name is "
                                     "an HTTP key or a CURVE key")
        out = Path(args.out or f"inferno-keys-{args.name}")
        paths = keys.add_client(kdir, args.name, args.role, out, force=args.force)
        print(f"allowed {args.name} as {args.role} ({paths['allowed']})")
        print(f"give the user the directory {out} (it holds their secret key):")
        print(f"  inferno --endpoint tcp://HOST:PORT --server-key {paths['server_public']} "
              f"--client-key {paths['client_secret']} status")
        print("or in ~/.config/inferno/client.toml:")
        print(f'  endpoint = "tcp://HOST:PORT"\n  server_key = "{paths["server_public"]}"\n'
              f'  client_key = "{paths["client_secret"]}"')
        return 0
    if args.keys_cmd == "list":
        rows: list[dict[str, object]] = [{**r, "kind": "curve"}
                                         for r in keys.list_clients(kdir)]
        rows += [apikeys.to_row(k) for k in apikeys.list_keys(kdir)]
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif not rows:
            print(f"no client keys allowed ({kdir / 'clients'}) and no API keys")
        for r in rows if not args.json else []:
            shown = r["public_key"] if r["kind"] == "curve" else r["hint"]
            print(f"{r['name']:24} {r['role']:9} {r['kind']:5} {shown}")
        return 0
    gone = apikeys.revoke(kdir, args.name)
    if gone is not None:
        print(f"revoked API key {args.name}; requests with it are refused from the next one")
        return 0
    path = keys.revoke(kdir, args.name)
    print(f"revoked {args.name} ({path} removed); new connections and requests are refused from now on")
    return 0

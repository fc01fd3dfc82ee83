"""Where the CPU goes per generated token: infernod (daemon, runner by thread) against
llama-server -np 8, and the load generator itself, while 8 clients stream.

On 2 cores the decode's CPU threads want both cores; every millisecond another process (the
daemon, the client, a runner thread besides the decode) takes from them stalls the decode's
thread barrier too. CPU time per token is also far less sensitive to a busy machine than tok/s,
so this is the evidence to read when the shared VM is noisy. Per side and round: aggregate
tok/s, and CPU ms per token of each thread of the server's processes (/proc/<pid>/task) and
of this process (the clients). Rounds alternate the order of the sides.

    .venv/bin/python bench/cpu_per_token.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from compare import (  # noqa: E402
    CLIENTS,
    N_TOKENS,
    daemon_concurrent,
    llama_bin,
    llama_server_stream,
    model_path,
    run_clients,
    start_daemon,
    start_llama_server,
    summarise,
)

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds per thread of ``pids``, keyed ``process/comm/tid``."""
    out: dict[str, float] = {}
    for n, pid in enumerate(pids):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[f"{n}/{comm}/{task.name}"] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bin")
    args = ap.parse_args()
    args.build_llama = False
    model = model_path()
    ns = argparse.Namespace(daemon_threads=0, host_cache_mib=256, flash_attn=None)
    daemon = start_daemon(ns, model)
    proc, url = start_llama_server(llama_bin(args) / "llama-server", model)
    sides = {
        "infernod": ([daemon.pid, *children(daemon.pid)],
                     lambda base: daemon_concurrent(daemon.endpoint, CLIENTS, base)),
        "llama-server": ([proc.pid], lambda base: summarise(run_clients(
            lambda i, b: llama_server_stream(url, i, b), CLIENTS, base))),
    }
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    base = 70_000
    try:
        for _pids, fn in sides.values():
            fn(base)  # warm
            base += CLIENTS
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                pids, fn = sides[side]
                before, t0 = thread_cpu(pids), os.times()
                res = fn(base)
                base += CLIENTS
                after, t1 = thread_cpu(pids), os.times()
                n = CLIENTS * N_TOKENS
                row = {"tok/s": res["aggregate_tokens_per_s"],
                       "client": ((t1.user + t1.system) - (t0.user + t0.system)) * 1000 / n}
                for key, cpu in after.items():
                    proc_no, rest = key.split("/", 1)
                    comm = rest.rsplit("/", 1)[0]  # a comm may hold "/" (ZMQbg/IO/0)
                    owner = ("daemon" if proc_no == "0" else "runner") if side == "infernod" \
                        else side
                    who = f"{owner}/{comm}"
                    row[who] = row.get(who, 0.0) + (cpu - before.get(key, 0.0)) * 1000 / n
                rows[side].append(row)
    finally:
        daemon.cleanup()
        proc.terminate()
        proc.wait(10)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f},"
          f" {CLIENTS} clients x {N_TOKENS} tokens, {args.rounds} rounds (medians): tok/s and "
          "CPU ms per token by thread (same-named threads summed)\n")
    for side, rs in rows.items():
        keys = sorted({k for r in rs for k in r}, key=lambda k: -statistics.median(
            r.get(k, 0.0) for r in rs) if k != "tok/s" else -1e9)
        total = statistics.median(sum(v for k, v in r.items() if k != "tok/s") for r in rs)
        print(f"{side}: total {total:.2f} ms/token; " + ", ".join(
            f"{k} {statistics.median(r.get(k, 0.0) for r in rs):.2f}" for k in keys
            if statistics.median(r.get(k, 0.0) for r in rs) >= 0.005 or k == "tok/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

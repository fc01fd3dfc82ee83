"""Loop probe for benchmarks (never shipped): with INFERNO_LOOP_PROBE=DIR in the environment
and this folder first on PYTHONPATH, every asyncio callback of the process is timed, and at
exit DIR/loop-<pid>.json gets a histogram of callback durations, the slowest callbacks by
name, the loop's time asleep in select, and (in infernod) how long each ``ping`` took from its
receipt to its reply. ``bench/compare.py --loop-probe DIR`` sets it up for its daemons."""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

DIR = os.environ.get("INFERNO_LOOP_PROBE")


def _install(out_dir: str) -> None:
    import asyncio.events
    import selectors

    ns = time.perf_counter_ns
    edges_us = [50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]
    hist = [0] * (len(edges_us) + 1)
    slow: dict[str, list[float]] = {}
    sums = {"callbacks": 0, "callback_ns": 0, "select_ns": 0, "selects": 0}
    pings: list[float] = []
    orig_run = asyncio.events.Handle._run

    def name_of(handle: asyncio.events.Handle) -> str:
        cb = getattr(handle, "_callback", None)
        owner = getattr(cb, "__self__", None)
        if isinstance(owner, asyncio.Task):
            return f"task {owner.get_coro().__qualname__}"
        return getattr(cb, "__qualname__", repr(cb))

    cpu = time.thread_time_ns

    def run(self: asyncio.events.Handle) -> None:
        t0 = ns()
        c0 = cpu()
        try:
            orig_run(self)
        finally:
            dt = ns() - t0
            sums["callbacks"] += 1
            sums["callback_ns"] += dt
            us = dt / 1000
            i = 0
            while i < len(edges_us) and us >= edges_us[i]:
                i += 1
            hist[i] += 1
            if us >= 1000:  # wall and the loop thread's own CPU time, ms
                slow.setdefault(name_of(self), []).append(
                    (round(us / 1000, 3), round((cpu() - c0) / 1e6, 3)))

    asyncio.events.Handle._run = run  # type: ignore[method-assign]

    for cls in (selectors.EpollSelector, selectors.PollSelector, selectors.SelectSelector):
        orig = cls.select

        def select(self, timeout=None, _orig=orig):  # noqa: ANN001
            t0 = ns()
            try:
                return _orig(self, timeout)
            finally:
                sums["select_ns"] += ns() - t0
                sums["selects"] += 1

        cls.select = select  # type: ignore[method-assign]

    def patch_daemon() -> None:
        try:
            from infernod.daemon import server
        except Exception:
            return
        orig_reply = server.Daemon._reply

        async def reply(self, identity, req_header, kind, body):  # noqa: ANN001
            await orig_reply(self, identity, req_header, kind, body)
            if isinstance(req_header, dict) and req_header.get("type") == "ping":
                recv = getattr(self, "_probe_received", {}).pop(req_header.get("id"), None)
                if recv is not None:
                    pings.append(round((time.monotonic() - recv) * 1000, 3))

        orig_admit = server.Daemon._admit

        def admit(self, frames, header):  # noqa: ANN001
            got = time.monotonic()
            out = orig_admit(self, frames, header)
            if header.get("type") == "ping":
                self.__dict__.setdefault("_probe_received", {})[header.get("id")] = got
            return out

        server.Daemon._reply = reply  # type: ignore[method-assign]
        server.Daemon._admit = admit  # type: ignore[method-assign]

    import gc

    gcs = {"n": 0, "gen2": 0, "max_ms": 0.0, "total_ns": 0, "t0": 0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gcs["t0"] = ns()
            return
        dt = ns() - gcs["t0"]
        gcs["n"] += 1
        gcs["gen2"] += info.get("generation") == 2
        gcs["total_ns"] += dt
        gcs["max_ms"] = max(gcs["max_ms"], round(dt / 1e6, 3))

    gc.callbacks.append(on_gc)
    started = time.monotonic()

    def dump() -> None:
        if not sums["callbacks"]:
            return
        worst = sorted(((max(v), k, len(v), max(c for _, c in v))
                        for k, v in slow.items()), reverse=True)[:25]
        pings.sort()
        out = {"pid": os.getpid(), "argv": sys.argv, "wall_s": time.monotonic() - started,
               "callbacks": sums["callbacks"], "callback_s": sums["callback_ns"] / 1e9,
               "select_s": sums["select_ns"] / 1e9, "selects": sums["selects"],
               "hist_edges_us": edges_us, "hist": hist,
               "slow_ms": [{"name": k, "max_ms": m[0], "cpu_ms_of_max": m[1],
                            "max_cpu_ms": c, "count_over_1ms": n} for m, k, n, c in worst],
               "gc": {"collections": gcs["n"], "gen2": gcs["gen2"], "max_ms": gcs["max_ms"],
                      "total_ms": round(gcs["total_ns"] / 1e6, 3)},
               "ping_in_daemon_ms": {
                   "n": len(pings),
                   **({"p50": pings[len(pings) // 2], "p90": pings[int(0.9 * (len(pings) - 1))],
                       "p99": pings[int(0.99 * (len(pings) - 1))], "max": pings[-1]}
                      if pings else {})}}
        with open(os.path.join(out_dir, f"loop-{os.getpid()}.json"), "w") as f:
            json.dump(out, f, indent=1)

    atexit.register(dump)
    patch_daemon()


if DIR:
    _install(DIR)

"""Long fuzz run of the request envelope (CI runs 10^4 cases in tests/test_hostile.py).

    .venv/bin/python bench/fuzz_envelope.py --cases 1000000            # in process
    .venv/bin/python bench/fuzz_envelope.py --cases 20000 --live       # plus a real daemon

In process: codec.decode_request + validate_header/validate_body must raise nothing but
InfernoError(bad_request|unknown_type). Live: the same envelopes (the ones that are not valid
requests) go to a real infernod over ipc; at the end it must still answer ping, and its RSS
growth is printed. Any other exception stops the run and prints the seed to reproduce it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from envelope_fuzz import check_envelope, random_envelope  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--live", action="store_true", help="also send them to a real daemon")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    daemon = raw = None
    if args.live:
        import psutil
        from daemon_harness import DaemonProcess
        from rawsock import raw_socket

        daemon = DaemonProcess({"security": {"rate_limit_per_s": 0.0,
                                             "rate_limit_peer_per_s": 0.0}}).start()
        raw = raw_socket(daemon.endpoint)
        rss0 = psutil.Process(daemon.pid).memory_info().rss
    t0 = time.monotonic()
    try:
        for i in range(args.cases):
            frames = random_envelope(rng)
            try:
                verdict = check_envelope(frames)
            except Exception:
                print(f"case {i} (seed {seed}) raised: {frames!r}", file=sys.stderr)
                raise
            counts[verdict] = counts.get(verdict, 0) + 1
            if raw is not None and verdict != "ok":
                raw.send_multipart(frames or [b""])
                while raw.poll(0):
                    raw.recv_multipart()
        dt = time.monotonic() - t0
        print(f"{args.cases} cases in {dt:.1f}s ({args.cases / dt:,.0f}/s), seed {seed}: "
              f"{counts}")
        if daemon is not None:
            with daemon.client() as c:
                t = time.perf_counter()
                c.ping()
                print(f"daemon still answers: ping {1000 * (time.perf_counter() - t):.1f} ms, "
                      f"RSS +{(psutil.Process(daemon.pid).memory_info().rss - rss0) / 2**20:.1f}"
                      " MiB")
    finally:
        if daemon is not None:
            raw.close(0)
            daemon.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

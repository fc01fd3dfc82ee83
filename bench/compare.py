"""Inferno vs the servers people use today, side by side in one run on one machine.

Sides (each one skipped, with a message, when its binary or Python is absent):

* ``llama-server`` and ``llama-bench`` built from the llama.cpp that llama-cpp-python vendors,
  with the same CPU flags as the installed wheel (``--build-llama`` builds them once under
  ``~/.cache/inferno/bench/``; ``--llama-bin DIR`` points elsewhere). ``llama-server`` runs
  with ``-np 8`` and its defaults otherwise; ``llama-bench`` gives the bare engine's decode
  speed (``tg64``) as a ceiling;
* infernod through the client library (8 slots, like ``-np 8``);
* llama-cpp-python in process (``Llama``, streaming): single stream only;
* llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, one request
  at a time, same model, threads and context per request) from the bench's own venv
  (bench/lcp_venv.py makes it once) or ``--llama-server-python``: aggregate tok/s with 1
  and 8 clients; skipped with the reason when neither can run it.

Every round measures every server in turn, the order alternating from round to round, so
drift hits all sides; ratios to ``llama-server`` are taken within a round, and the table
shows their median and range. Work: 64-token greedy completions (EOS ignored, a distinct
prompt per request so no side reuses a cached prefix); one stream, then 8 concurrent clients.
While a server's 8 streams run, another client pings it from a process of its own
(infernod: ``ping``; llama-server: ``GET /health``; p99 of the round trip). RSS is read
after each 8-client run (infernod: the daemon and every process under it).

The long-prompt stall: 4 streams decode, then a 3,000-token prompt arrives; the longest gap
between two tokens of those 4 streams, per server (``--stall-rounds``, 0 to skip).

``--only ping`` runs just the 8-client rounds with their pinger (p50/p90/p99 and tok/s), and
``--variant NAME:KEY=VALUE,...`` adds another infernod beside the first, with other settings
(``models.runner_nice=0``) or another checkout (``env.PYTHONPATH=/path/to/old``; run the
bench from a directory without an ``infernod`` package, or Python finds that one), measured
in the same interleaved rounds: an A/B of the daemon against itself.

    .venv/bin/python bench/compare.py --build-llama --reps 5 --json out.json
    .venv/bin/python bench/compare.py --only ping --reps 6 --variant nice0:models.runner_nice=0
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from daemon_harness import DaemonProcess, test_models_dir  # noqa: E402

from infernod.cli.bench import cpu_name  # noqa: E402
from infernod.client import Client  # noqa: E402

N_TOKENS = 64
CLIENTS = 8
N_CTX = 4096  # per slot, on every server: the long prompt must fit
STALL_STREAMS = 4
STALL_PROMPT_TOKENS = 3000
STALL_STREAM_TOKENS = 96
THREADS = os.cpu_count() or 2
WORDS = ["Apples", "Rivers", "Engines", "Castles", "Planets", "Forests", "Cities", "Songs"]
CACHE = Path.home() / ".cache" / "inferno" / "bench"


def prompt(i: int) -> str:
    """Distinct prompts that share at most BOS and 2 tokens with any of the first 1,000
    others (see engine_bench.prompt), so neither side reuses a cached prefix."""
    return f"{str(i).zfill(4)[::-1]} {WORDS[i % len(WORDS)]}: here is a short story about a traveller who"


def model_path() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _default_model_path

    path = _default_model_path()
    test_models_dir(path)  # infernod's models dir beside it (a link named gemma3-270m.gguf)
    return path


def long_prompt(llm: Any, n_tokens: int, tag: int) -> str:
    """A text of about ``n_tokens`` tokens (with BOS) that no other prompt shares."""
    words = [f"{WORDS[k % len(WORDS)].lower()} {k * 7 + tag}" for k in range(n_tokens)]
    text = f"{tag} " + " ".join(words)
    toks = llm.tokenize(text.encode(), add_bos=False)[: n_tokens - 1]
    return llm.detokenize(toks).decode("utf-8", "replace")


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and every process under it (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def p99(xs: list[float]) -> float:
    return pct(xs, 0.99)


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``NAME:KEY=VALUE,...`` (KEY: ``section.key``, a bare key is in ``models``; ``env.X``
    sets the daemon's environment; VALUE: an int, a float, true/false, a JSON list, or
    text)."""
    name, _, spec = text.partition(":")
    out: dict[str, dict[str, Any]] = {}
    for item in re.split(r",(?![^\[]*\])", spec):  # commas inside [...] stay
        if not item:
            continue
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        section, _, key = key.rpartition(".")
        value: Any = raw
        if raw.startswith("["):
            value = json.loads(raw)
        elif raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        out.setdefault(section or "models", {})[key] = value
    return name, out


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def max_gap(times: list[float], since: float = 0.0) -> float:
    """Longest pause between two consecutive token arrivals (the later one after ``since``)."""
    return max((b - a for a, b in itertools.pairwise(times) if b >= since), default=0.0)


def run_clients(fn: Callable[[int, threading.Barrier], dict], clients: int,
                base: int) -> list[dict]:
    """Run ``fn(i, barrier)`` in ``clients`` threads that start together; their results."""
    out: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        try:
            out.append(fn(i, barrier))
        except BaseException as e:  # reported below, not lost in a thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(base + k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    if errors:
        raise errors[0]
    return out


def summarise(results: list[dict]) -> dict[str, float]:
    """Aggregate tok/s over the wall time of the whole group; per-stream medians."""
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": statistics.median(r["ttft_ms"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results)}


def timed(t0: float, times: list[float], n: int) -> dict:
    first, end = times[0], times[-1]
    return {"ttft_ms": (first - t0) * 1000, "tokens": n, "start": t0, "end": end,
            "tokens_per_s": (n - 1) / (end - first) if end > first else 0.0, "times": times}


# -- llama-cpp-python in process ------------------------------------------------------------
def direct_single(llm: Any, i: int) -> dict[str, float]:
    # Llama reuses the longest prefix it still holds from the previous call (here BOS and
    # the first words: a few tokens of 16, ~10 ms of TTFT); start clean, like a new prompt.
    llm.reset()
    t0 = time.perf_counter()
    times = []
    for _ in llm.create_completion(prompt(i), max_tokens=N_TOKENS, temperature=0.0,
                                   stream=True, logit_bias=None):
        times.append(time.perf_counter())
    return timed(t0, times, len(times))


# -- infernod -------------------------------------------------------------------------------
def daemon_stream(endpoint: str, i: int, barrier: threading.Barrier | None,
                  text: str | None = None, max_tokens: int = N_TOKENS) -> dict:
    with Client(endpoint, timeout=120) as c:
        c.wait_welcome()
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        times = []
        stream = c.generate("gemma3-270m", text or prompt(i), max_tokens=max_tokens,
                            temperature=0, ignore_eos=True, stall_timeout_s=600, timeout_s=1800)
        for _ in stream:
            times.append(time.perf_counter())
        return timed(t0, times, (stream.stats or {}).get("completion_tokens", len(times)))


def daemon_concurrent(endpoint: str, clients: int, base: int) -> dict[str, float]:
    return summarise(run_clients(lambda i, b: daemon_stream(endpoint, i, b), clients, base))


PINGER = r"""
import http.client, json, sys, time, urllib.parse
target = sys.argv[1]
if target.startswith("http://"):  # llama-server: GET /health on one kept-alive connection
    u = urllib.parse.urlsplit(target)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    def ping():
        conn.request("GET", u.path)
        conn.getresponse().read()
    ready = ping
else:  # infernod: the ping request
    from infernod.client import Client
    c = Client(target, timeout=30)
    ping = lambda: c.request("ping", timeout=30)
    ready = c.wait_welcome
ready()
print("ready", flush=True)
rtts = []
while not sys.stdin.readline() == "":  # the parent writes a line per ping, EOF to stop
    t0 = time.perf_counter()
    ping()
    rtts.append((time.perf_counter() - t0) * 1000)
    print("", flush=True)
print(json.dumps(rtts), flush=True)
"""


class Pinger:
    """Pings a server every 10 ms from a process of its own, as another user would: the
    round trips (infernod: ``ping``; llama-server: ``GET /health``). (A thread beside the 8 stream clients would measure their GIL, not the
    daemon: a waiting thread can sit up to the 5 ms switch interval before it runs.)"""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.rtts_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = subprocess.Popen([sys.executable, "-c", PINGER, endpoint],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Pinger:
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the pinger could not reach the daemon")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            out, _ = self._proc.communicate(timeout=30)  # EOF on stdin: it prints its RTTs
            self.rtts_ms = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            self._proc.kill()
            self._proc.wait(10)

    def _run(self) -> None:
        """Paces the pinger: one line each 10 ms, after the previous ping's answer."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        while not self._stop.wait(0.01):
            self._proc.stdin.write("\n")
            self._proc.stdin.flush()
            if not self._proc.stdout.readline():
                return


def start_daemon(args: argparse.Namespace, model: Path,
                 variant: dict[str, dict[str, Any]] | None = None) -> DaemonProcess:
    """infernod with the bench's settings; ``variant``: other settings ({section: {key:
    value}}) and environment (its ``env`` section, e.g. PYTHONPATH of another checkout)."""
    cfg: dict[str, dict[str, Any]] = {"models": {
        "dirs": [str(model.parent / "models")], "n_ctx": N_CTX, "slots": CLIENTS,
        "install_default": False, "threads": args.daemon_threads,
        "host_cache_mib": args.host_cache_mib,
        **({"flash_attn": args.flash_attn} if args.flash_attn else {})}}
    env: dict[str, str] = {}
    for section, values in (variant or {}).items():
        if section == "env":
            env.update({k: str(v) for k, v in values.items()})
        else:
            cfg.setdefault(section, {}).update(values)
    d = DaemonProcess(cfg, env=env)
    d.start()
    with d.client(timeout=300) as c:
        c.load("gemma3-270m")
    return d


# -- llama.cpp's llama-server ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(proc: subprocess.Popen, url: str, what: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def start_llama_server(binary: Path, model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "-c", str(N_CTX * CLIENTS),
                             "-np", str(CLIENTS), "-t", str(THREADS), "-tb", str(THREADS),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/health", "llama-server")
    return proc, url


def llama_server_stream(url: str, i: int, barrier: threading.Barrier | None,
                        text: str | None = None, max_tokens: int = N_TOKENS) -> dict:
    """One streamed greedy completion from llama-server's /completion: one event a token."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"prompt": text or prompt(i), "n_predict": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        times: list[float] = []
        n = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            ev = json.loads(line[6:])
            if ev.get("stop"):
                n = int(ev.get("tokens_predicted") or len(times))
                break
            times.append(time.perf_counter())
    finally:
        conn.close()
    return timed(t0, times, n or len(times))


def llama_bench(binary: Path, model: Path, reps: int) -> float:
    """The bare engine's single-stream decode speed (tg64), llama-bench's own average."""
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(THREADS), "-p", "0", "-n",
                          str(N_TOKENS), "-r", str(reps), "-o", "json"], capture_output=True,
                         text=True, check=True, timeout=900).stdout
    return float(json.loads(out)[0]["avg_ts"])


def missing_binaries(bindir: Path) -> dict[str, str]:
    """The llama.cpp sides that cannot run, each with why: the bench skips them."""
    return {name: f"no {name} in {bindir} (build it once with --build-llama)"
            for name in ("llama-server", "llama-bench") if not (bindir / name).is_file()}


def llama_bin(args: argparse.Namespace) -> Path:
    """Where llama-server and llama-bench are: --llama-bin, or the cached portable build."""
    if args.llama_bin:
        return Path(args.llama_bin)
    import llama_cpp

    if args.build_llama:
        sys.path.insert(0, str(ROOT / "bench"))
        from cpu_build_bench import build_vendored

        flags = subprocess.run(["make", "-s", "-C", str(ROOT), "llama-cmake-args"],
                               capture_output=True, text=True, check=True).stdout.split()
        return build_vendored(llama_cpp.__version__, "portable", flags,
                              ["llama-server", "llama-bench"])
    return CACHE / f"build-{llama_cpp.__version__}-portable" / "bin"


# -- llama-cpp-python's server --------------------------------------------------------------
def start_python_server(python: str, model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(model),
                             "--n_ctx", str(N_CTX), "--n_threads", str(THREADS),
                             "--n_threads_batch", str(THREADS), "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/v1/models", "llama-cpp-python's server")
    return proc, url


def python_server(args: argparse.Namespace) -> tuple[str | None, str]:
    """The python that runs llama_cpp.server: --llama-server-python, else the bench venv
    (bench/lcp_venv.py, made on first use); (None, why) if neither can."""
    if args.llama_server_python:
        return str(args.llama_server_python), ""
    sys.path.insert(0, str(ROOT / "bench"))
    from lcp_venv import server_python

    python, why = server_python()
    return (str(python) if python is not None else None), why


def default_example_python(lcp_python: str | None) -> str | None:
    """The bench venv's python for the batched example server, when it has the server's
    imports and the sdist (unpacked by --build-llama) holds the script."""
    import llama_cpp

    script = CACHE / f"llama_cpp_python-{llama_cpp.__version__}" / "examples" / "server"
    if lcp_python is None or not (script / "server.py").is_file():
        return None
    sys.path.insert(0, str(ROOT / "bench"))
    from lcp_venv import runs_example

    return lcp_python if runs_example(Path(lcp_python)) is None else None


def start_example_server(python: str, model: Path,
                         workdir: Path) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's batched example server (its sdist's examples/server/server.py),
    with 8 sequences over a unified KV cache like the others."""
    import llama_cpp

    script = CACHE / f"llama_cpp_python-{llama_cpp.__version__}" / "examples" / "server"
    port = free_port()
    cfg = workdir / "example-server.json"
    cfg.write_text(json.dumps({
        "server": {"host": "127.0.0.1", "port": port},
        "model": {"path": str(model), "alias": "gemma3-270m", "n_ctx": N_CTX * CLIENTS,
                  "n_seq_max": CLIENTS, "threads": THREADS, "threads_batch": THREADS,
                  "kv_unified": True}}))
    proc = subprocess.Popen([python, str(script / "server.py"), "-C", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/v1/models", "llama-cpp-python's example server")
    return proc, url


def python_server_one(url: str, i: int, barrier: threading.Barrier | None) -> dict:
    body = json.dumps({"prompt": prompt(i), "max_tokens": N_TOKENS, "temperature": 0,
                       "stream": False}).encode()
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
    end = time.perf_counter()
    n = reply["usage"]["completion_tokens"]
    return {"tokens": n, "start": t0, "end": end, "ttft_ms": 0.0,
            "tokens_per_s": n / (end - t0)}


# -- one side per server ----------------------------------------------------------------------
class Side:
    """A server under test: how to stream one completion from it, and its processes."""

    def __init__(self, name: str, stream: Callable[..., dict], pid: int,
                 tree: bool = False, pinger: Callable[[], Pinger] | None = None,
                 streaming: bool = True) -> None:
        self.name, self.stream, self.pid = name, stream, pid
        self.tree, self.pinger = tree, pinger
        self.streaming = streaming  # token by token: single-stream decode speed measurable

    def rss(self) -> int:
        return tree_rss_bytes(self.pid) if self.tree else process_rss_bytes(self.pid)

    def single(self, i: int) -> dict:
        return self.stream(i, None)

    def concurrent(self, base: int) -> tuple[dict, list[float]]:
        if self.pinger is None:
            return summarise(run_clients(self.stream, CLIENTS, base)), []
        with self.pinger() as ping:
            res = summarise(run_clients(self.stream, CLIENTS, base))
        return res, ping.rtts_ms

    def stall(self, base: int, text: str) -> dict[str, float]:
        """4 streams run; once each has tokens, the long prompt arrives: the longest gap."""
        results: list[dict] = []
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                results.append(self.stream(i, None, max_tokens=STALL_STREAM_TOKENS))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(base + k,)) for k in range(STALL_STREAMS)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # every stream admitted and decoding
        sent = time.perf_counter()
        long = self.stream(base + STALL_STREAMS, None, text=text, max_tokens=1)
        for t in threads:
            t.join(900)
        if errors:
            raise errors[0]
        return {"max_gap_s": max(max_gap(r["times"], sent) for r in results),
                "long_ttft_s": long["ttft_ms"] / 1000,
                "streams_outlived_prompt": all(r["end"] > sent + long["ttft_ms"] / 1000
                                               for r in results)}


def loop_probe(out: Path, variant: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``variant`` with bench/loopprobe first on the daemon's PYTHONPATH, writing to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(variant.get("env", {}))
    path = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench" / "loopprobe"), path]))
    env["INFERNO_LOOP_PROBE"] = str(out)
    return {**variant, "env": env}


def daemon_side(name: str, d: DaemonProcess) -> Side:
    endpoint = d.endpoint
    return Side(name, lambda i, b, **kw: daemon_stream(endpoint, i, b, **kw), d.pid,
                tree=True, pinger=lambda: Pinger(endpoint))


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--stall-rounds", type=int, default=1,
                    help="rounds of the long-prompt stall bench (0: skip it)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--llama-bin", help="folder with llama-server and llama-bench "
                    "(default: the cached portable build)")
    ap.add_argument("--build-llama", action="store_true",
                    help="build llama-server and llama-bench first if not cached (~10 min)")
    ap.add_argument("--llama-server-python", help="python with llama-cpp-python[server] "
                    "(its llama_cpp.server, which serialises requests; default: the bench's "
                    "own venv, made once by bench/lcp_venv.py)")
    ap.add_argument("--no-llama-cpp-python", action="store_true",
                    help="leave llama-cpp-python's server out")
    ap.add_argument("--example-server-python", help="python that runs llama-cpp-python's "
                    "batched example server (examples/server in its sdist)")
    ap.add_argument("--daemon-threads", type=int, default=0,
                    help="infernod models.threads (decode threads; 0 = its default)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"),
                    help="infernod's models.flash_attn (default: the daemon's own default)")
    ap.add_argument("--host-cache-mib", type=int, default=256,
                    help="infernod models.host_cache_mib (0 = idle cells stay in the KV cache)")
    ap.add_argument("--only", choices=("ping",),
                    help="ping: only the 8-client rounds and their pinger (no single streams, "
                         "llama-bench, in-process llama-cpp-python or long-prompt stall)")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant,
                    metavar="NAME:KEY=VALUE,...",
                    help="another infernod side, interleaved with the first: its settings "
                         "(section.key, bare keys are models.*) or env.VAR (env.PYTHONPATH="
                         "DIR: another checkout's code); repeatable")
    ap.add_argument("--loop-probe", type=Path, metavar="DIR",
                    help="time every asyncio callback of each infernod (bench/loopprobe): "
                         "DIR/<side>/loop-<pid>.json at its exit")
    ap.add_argument("--no-llama-server", action="store_true",
                    help="leave llama-server out (with --variant: infernod against itself)")
    args = ap.parse_args()
    model = model_path()
    ping_only = args.only == "ping"
    if ping_only:
        args.stall_rounds = 0

    llm: Any = None
    if not ping_only:
        from llama_cpp import Llama

        llm = Llama(str(model), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                    verbose=False, seed=1)
    bindir = llama_bin(args)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "tokens": N_TOKENS, "clients": CLIENTS, "reps": args.reps, "skipped": {},
        "only": args.only, "variants": {name: v for name, v in args.variant},
    }
    result["skipped"].update(missing_binaries(bindir))
    if ping_only:
        result["skipped"].pop("llama-bench", None)
    if args.no_llama_server:
        result["skipped"]["llama-server"] = "--no-llama-server"
    if "llama-bench" not in result["skipped"] and not ping_only:
        print("llama-bench tg64 ...", file=sys.stderr)
        result["llama_bench_tg64"] = llama_bench(bindir / "llama-bench", model, args.reps)
    procs: list[subprocess.Popen] = []
    daemons: list[DaemonProcess] = []
    sides: list[Side] = []
    try:
        if "llama-server" not in result["skipped"]:
            proc, url = start_llama_server(bindir / "llama-server", model)
            procs.append(proc)
            sides.append(Side("llama-server", lambda i, b, **kw: llama_server_stream(
                url, i, b, **kw), proc.pid, pinger=lambda: Pinger(url + "/health")))
        for name, variant in [("infernod", {}), *args.variant]:
            if args.loop_probe:
                variant = loop_probe(args.loop_probe / name, variant)
            d = start_daemon(args, model, variant)
            daemons.append(d)
            sides.append(daemon_side(name, d))
        daemon = daemons[0]
        lcp_python, why = (None, "") if ping_only else (
            (None, "--no-llama-cpp-python") if args.no_llama_cpp_python else python_server(args))
        if why:
            result["skipped"]["llama-cpp-python server"] = why
        if lcp_python is not None:
            proc, purl = start_python_server(lcp_python, model)
            procs.append(proc)
            sides.append(Side("llama-cpp-python server",
                              lambda i, b, **kw: python_server_one(purl, i, b), proc.pid,
                              streaming=False))
        example_python = args.example_server_python or default_example_python(lcp_python)
        if ping_only:
            pass
        elif example_python:
            proc, eurl = start_example_server(example_python, model,
                                              Path(daemon.base))
            procs.append(proc)
            sides.append(Side("llama-cpp-python example server",
                              lambda i, b, **kw: python_server_one(eurl, i, b), proc.pid,
                              streaming=False))
        else:
            result["skipped"]["llama-cpp-python example server"] = (
                "no --example-server-python given and the bench venv cannot run it (it "
                "needs fastapi, uvicorn, openai, jinja2, safetensors, websockets and "
                "llama-cpp-python, and the sdist --build-llama unpacks)")
        for why in result["skipped"].values():
            print(f"skipped: {why}", file=sys.stderr)
        runs = measure(args, llm, sides, singles=not ping_only)
        if args.stall_rounds:
            runs["stall"] = measure_stall(args, llm, [s for s in sides if s.name in (
                "llama-server", "infernod")])
    finally:
        for d in daemons:
            d.cleanup()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update(report(runs))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def measure(args: argparse.Namespace, llm: Any, sides: list[Side],
            singles: bool = True) -> dict[str, Any]:
    """Every round runs every side in turn (the order alternating). ``singles``: one
    stream per side (and llama-cpp-python in process) before its 8 clients."""
    runs: dict[str, Any] = {s.name: {"single": [], "clients": [], "rss": []} for s in sides}
    if singles:
        runs["llama-cpp-python in process"] = {"single": []}
        direct_single(llm, 10_000)  # warm up every side once
    runs["ping_ms"] = {s.name: [] for s in sides if s.pinger is not None}
    base = 0
    for s in sides:
        s.single(10_001)
    for rep in range(args.reps):
        print(f"round {rep + 1}/{args.reps}", file=sys.stderr)
        order = sides if rep % 2 == 0 else list(reversed(sides))
        if singles:
            runs["llama-cpp-python in process"]["single"].append(direct_single(llm, base))
            base += 1
        for s in order:
            if s.streaming and singles:
                runs[s.name]["single"].append(s.single(base))
                base += 1
            res, rtts = s.concurrent(base)
            base += CLIENTS
            runs[s.name]["clients"].append(res)
            runs[s.name]["rss"].append(s.rss())
            if rtts:
                runs["ping_ms"][s.name].append(rtts)
            if rtts:
                print(f"  {s.name}: {res['aggregate_tokens_per_s']:.1f} tok/s, ping p50 "
                      f"{statistics.median(rtts):.1f} p90 {pct(rtts, 0.9):.1f} p99 "
                      f"{p99(rtts):.1f} ms", file=sys.stderr)
    return runs


def measure_stall(args: argparse.Namespace, llm: Any, sides: list[Side]) -> dict[str, list]:
    out: dict[str, list] = {s.name: [] for s in sides}
    base = 20_000
    for rep in range(args.stall_rounds):
        print(f"long-prompt stall {rep + 1}/{args.stall_rounds}", file=sys.stderr)
        for s in sides if rep % 2 == 0 else list(reversed(sides)):
            out[s.name].append(s.stall(base, long_prompt(llm, STALL_PROMPT_TOKENS, base)))
            base += STALL_STREAMS + 1
    return out


def report(runs: dict[str, Any]) -> dict[str, Any]:
    """Medians per side; per-round ratios to llama-server (median and range)."""
    ref = runs.get("llama-server")
    sides: dict[str, Any] = {}
    for name, r in runs.items():
        if name in ("ping_ms", "stall"):
            continue
        row: dict[str, Any] = {}
        if r["single"]:
            single = [x["tokens_per_s"] for x in r["single"]]
            row["single_tokens_per_s"] = statistics.median(single)
            row["single_ttft_ms"] = statistics.median(x["ttft_ms"] for x in r["single"])
            if ref is not None and name != "llama-server":
                row["single_vs_llama_server"] = spread(
                    [a / b["tokens_per_s"] for a, b in zip(single, ref["single"], strict=True)])
        if r.get("clients"):
            agg = [x["aggregate_tokens_per_s"] for x in r["clients"]]
            row["clients_tokens_per_s"] = statistics.median(agg)
            if ref is not None and name != "llama-server":
                row["clients_vs_llama_server"] = spread(
                    [a / b["aggregate_tokens_per_s"]
                     for a, b in zip(agg, ref["clients"], strict=True)])
            row["rss_mib"] = max(r["rss"]) / 2**20
        sides[name] = row
    out: dict[str, Any] = {"sides": sides}
    # A second client's round trip while a side's 8 streams run (infernod: ping,
    # llama-server: GET /health): both sides carry the same pinger, so their throughput is
    # measured under the same extra load.
    out["ping_ms_under_8_streams"] = {
        name: {"p50": statistics.median(xs), "p90": pct(xs, 0.9), "p99": p99(xs),
               "n": len(xs), "p99_per_round": [round(p99(r), 2) for r in rounds]}
        for name, rounds in runs["ping_ms"].items()
        if (xs := [x for r in rounds for x in r])}
    if "stall" in runs:
        out["stall"] = {name: {"max_gap_s": max(x["max_gap_s"] for x in xs),
                               "long_prompt_ttft_s": statistics.median(
                                   x["long_ttft_s"] for x in xs),
                               "streams_outlived_prompt": all(
                                   x["streams_outlived_prompt"] for x in xs)}
                        for name, xs in runs["stall"].items()}
    return out


def fmt_ratio(s: dict[str, float] | None) -> str:
    if s is None:
        return ""
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, "
          f"{r['tokens']}-token greedy completions, {r['reps']} interleaved rounds "
          "(medians; ratios: median and range of each round's own ratio)\n")
    print("| side | 1 stream tok/s | vs llama-server | 8 clients tok/s | vs llama-server "
          "| RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in r["sides"].items():
        one = f"{s['single_tokens_per_s']:.1f}" if "single_tokens_per_s" in s else ""
        many = f"{s['clients_tokens_per_s']:.1f}" if "clients_tokens_per_s" in s else ""
        rss = f"{s['rss_mib']:.0f}" if "rss_mib" in s else ""
        ref = name == "llama-server"
        print(f"| {name} | {one} | {'1.00' if ref else fmt_ratio(s.get('single_vs_llama_server'))}"
              f" | {many} | {'1.00' if ref else fmt_ratio(s.get('clients_vs_llama_server'))}"
              f" | {rss} |")
    if "llama_bench_tg64" in r:
        print(f"| llama-bench tg{r['tokens']} (no server) | {r['llama_bench_tg64']:.1f} | | | | |")
    for name, p in r.get("ping_ms_under_8_streams", {}).items():
        what = "`GET /health`" if name == "llama-server" else "`ping`"
        rounds = ", ".join(f"{x:.1f}" for x in p["p99_per_round"])
        print(f"\n{name} {what} while its {r['clients']} streams run: p50 {p['p50']:.1f} ms, "
              f"p90 {p['p90']:.1f} ms, p99 {p['p99']:.1f} ms ({p['n']} pings; p99 per "
              f"round: {rounds})")
    if "stall" in r:
        print(f"\n| {STALL_PROMPT_TOKENS}-token prompt arrives while {STALL_STREAMS} streams run "
              "| longest gap in the streams, s | the long prompt's TTFT, s |")
        print("| --- | ---: | ---: |")
        for name, s in r["stall"].items():
            print(f"| {name} | {s['max_gap_s']:.2f} | {s['long_prompt_ttft_s']:.2f} |")
    for name, why in r["skipped"].items():
        print(f"\nskipped {name}: {why}")


if __name__ == "__main__":
    sys.exit(main())

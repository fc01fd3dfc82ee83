"""What the portable llama.cpp build costs against a -march=native one, on this machine.

Inferno installs llama.cpp built for x86-64-v3 (AVX2, FMA, F16C, BMI2: the Makefile's
LLAMA_CMAKE_ARGS) because a native build crashes on other CPUs. This measures the price:

* builds llama.cpp's shared libraries natively, once, from the llama.cpp that the installed
  llama-cpp-python vendors (its sdist's ``vendor/llama.cpp``), cached under
  ``~/.cache/inferno/bench/``;
* starts two daemons on the default model, one on the installed portable libraries and one
  with ``LLAMA_CPP_LIB_PATH`` pointing at the native ones (the same Python package loads
  either), and loads the model in both;
* measures, interleaved rep by rep so drift hits both: single-stream decode tok/s and the
  aggregate tok/s of 8 concurrent clients (64-token greedy completions, distinct prompts).

    .venv/bin/python bench/cpu_build_bench.py [--reps 5] [--json out.json]

On a CPU without AVX-512 or AMX the two builds use the same instructions, and the ratio
shows only noise; on a Xeon with AVX-512 it shows what the portable default gives up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from compare import daemon_concurrent, model_path  # noqa: E402
from daemon_harness import DaemonProcess  # noqa: E402

from infernod.backends.cpu_features import probe_build  # noqa: E402
from infernod.cli.bench import cpu_name  # noqa: E402

CACHE = Path.home() / ".cache" / "inferno" / "bench"


def vendored_source(version: str) -> Path:
    """llama-cpp-python's sdist unpacked once; its vendor/llama.cpp is what the wheel built."""
    src = CACHE / f"llama_cpp_python-{version}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "-d", str(CACHE), f"llama-cpp-python=={version}"],
                   check=True, timeout=1800)
    with tarfile.open(CACHE / f"llama_cpp_python-{version}.tar.gz") as tar:
        tar.extractall(CACHE, filter="data")
    return src


def build_vendored(version: str, name: str, cmake_args: list[str],
                   targets: list[str]) -> Path:
    """cmake-build ``targets`` of the vendored llama.cpp with ``cmake_args``; return bin/."""
    build = CACHE / f"build-{version}-{name}"
    stamp = build / f".built-{'-'.join(targets)}"
    if stamp.exists():
        return build / "bin"
    src = vendored_source(version) / "vendor" / "llama.cpp"
    print(f"building {', '.join(targets)} ({name}) from {src} ...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    *cmake_args], check=True, timeout=600, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
                    "--target", *targets], check=True, timeout=3600, stdout=subprocess.DEVNULL)
    stamp.touch()
    return build / "bin"


def start(models_dir: Path, env: dict[str, str]) -> DaemonProcess:
    d = DaemonProcess({"models": {"dirs": [str(models_dir)], "n_ctx": 1024, "slots": 8,
                                  "install_default": False}}, env=env)
    d.start()
    with d.client(timeout=300) as c:
        c.load("gemma3-270m")
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import llama_cpp

    native_lib = build_vendored(llama_cpp.__version__, "native", ["-DGGML_NATIVE=ON"],
                                ["llama"])
    native_env = {"LLAMA_CPP_LIB_PATH": str(native_lib)}
    builds = {"portable": probe_build(), "native": _probe_with(native_env)}
    models_dir = model_path().parent / "models"
    daemons = {"portable": start(models_dir, {}), "native": start(models_dir, native_env)}
    runs: dict[str, dict[str, list[float]]] = {k: {"single": [], "clients8": []}
                                               for k in daemons}
    base = 0
    try:
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
            order = list(daemons) if rep % 2 == 0 else list(reversed(daemons))
            for kind in order:
                endpoint = daemons[kind].endpoint
                runs[kind]["single"].append(
                    daemon_concurrent(endpoint, 1, base)["tokens_per_s"])
                base += 1
                runs[kind]["clients8"].append(
                    daemon_concurrent(endpoint, 8, base)["aggregate_tokens_per_s"])
                base += 8
    finally:
        for d in daemons.values():
            d.cleanup()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "reps": args.reps,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "arch": platform.machine()},
        "builds": {k: sorted(b.build) for k, b in builds.items()},
        "median": {k: {m: statistics.median(v) for m, v in r.items()} for k, r in runs.items()},
        # per rep native/portable: drift between reps cancels out
        "paired_ratio": {m: statistics.median(n / p for n, p in zip(
            runs["native"][m], runs["portable"][m], strict=True)) for m in ("single", "clients8")},
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _probe_with(env: dict[str, str]) -> Any:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return probe_build()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, "
          f"median of {r['reps']} interleaved reps\n")
    print("| llama.cpp build | instruction set | 1 stream tok/s | 8 clients tok/s |")
    print("| --- | --- | ---: | ---: |")
    for kind in ("portable", "native"):
        m = r["median"][kind]
        print(f"| {kind} | {' '.join(r['builds'][kind])} | {m['single']:.1f} | "
              f"{m['clients8']:.1f} |")
    pr = r["paired_ratio"]
    print(f"| native / portable (paired) | | {pr['single']:.2f} | {pr['clients8']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

"""llama-cpp-python's own server for the benches, in a virtual environment of its own.

``python -m llama_cpp.server`` needs ``llama-cpp-python[server]`` (fastapi, uvicorn,
sse-starlette, ...), which Inferno does not depend on and never should. The benches run it
from ``~/.cache/inferno/bench/lcp-server-venv-<version>``, made once: the same portable
llama-cpp-python wheel the product venv was installed from (the wheelhouse whose CMake flags
are the Makefile's), plus the server's extra dependencies from the package index. When that
cannot be done, :func:`server_python` says why and the bench skips that side.

    .venv/bin/python bench/lcp_venv.py        # make it (or print why it cannot be made)
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "inferno" / "bench"
WHEELS = Path.home() / ".cache" / "inferno" / "wheels"
# What the sdist's batched example server (examples/server/server.py) imports beyond
# llama-cpp-python[server]: compare.py runs it from the same venv.
EXAMPLE_EXTRAS = ("openai", "jinja2", "safetensors", "websockets")


def venv_dir(version: str) -> Path:
    return CACHE / f"lcp-server-venv-{version}"


def runs_server(python: Path) -> str | None:
    """None when ``python`` can start llama_cpp.server, else why not."""
    if not python.is_file():
        return f"{python} does not exist"
    r = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True,
                       text=True, timeout=120)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"{python} cannot import llama_cpp.server.app ({last})"


def runs_example(python: Path) -> str | None:
    """None when ``python`` has what the batched example server imports, else why not."""
    r = subprocess.run([str(python), "-c", "import " + ", ".join(EXAMPLE_EXTRAS)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["?"])[-1]
    return f"{python} lacks the example server's imports ({last})"


def ready(python: Path) -> bool:
    return runs_server(python) is None and runs_example(python) is None


def portable_wheel(version: str) -> Path | None:
    """The llama-cpp-python wheel built with the Makefile's CMake flags (what the product
    venv runs), from the wheelhouse ``make`` fills."""
    flags = subprocess.run(["make", "-s", "-C", str(ROOT), "llama-cmake-args"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    for house in sorted(WHEELS.glob(f"llama-cpp-python-{version}-*")):
        args = house / "cmake-args.txt"
        if args.is_file() and args.read_text().split() == flags:
            return next(iter(sorted(house.glob(f"llama_cpp_python-{version}-*.whl"))), None)
    return None


def server_python(create: bool = True) -> tuple[Path | None, str]:
    """(the venv's python, "") when llama_cpp.server can run from it, else (None, why).
    ``create``: make the venv first if it is missing (a few seconds to a minute)."""
    import llama_cpp

    version = llama_cpp.__version__
    venv = venv_dir(version)
    python = venv / "bin" / "python"
    if ready(python):
        return python, ""
    if not create:
        return None, f"no {venv} (make it with bench/lcp_venv.py)"
    wheel = portable_wheel(version)
    if wheel is None:
        return None, (f"no llama-cpp-python {version} wheel with the Makefile's CMake flags "
                      f"under {WHEELS} (`make` builds it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benches starting at once make it once
        if ready(python):
            return python, ""
        print(f"making {venv} (llama-cpp-python[server] from {wheel.name}) ...",
              file=sys.stderr)
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  "--find-links", str(wheel.parent), "--only-binary", "llama-cpp-python",
                  f"llama-cpp-python[server]=={version}", *EXAMPLE_EXTRAS]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                return None, f"making {venv} failed: {' '.join(cmd[:4])} ...: {last}"
    why = runs_server(python)
    return (python, "") if why is None else (None, why)


if __name__ == "__main__":
    py, reason = server_python()
    print(py if py is not None else f"cannot: {reason}")
    sys.exit(0 if py is not None else 1)

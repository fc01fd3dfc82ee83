"""Which x86 instructions the installed llama.cpp was built to use, and whether this CPU has them.

A llama.cpp built with ``-march=native`` on one server dies on the next: SIGILL where an
instruction is missing, a general protection fault where AMX is advertised but not usable
(seen on Xeon VMs). Inferno builds it portable (the Makefile's ``LLAMA_CMAKE_ARGS``), and this
module says what the installed build needs and what the host offers.

The build is probed in a child process (:func:`probe_build`), never in the caller: a build that
cannot run on this CPU kills the child, and the daemon (or ``inferno doctor``) reports it
instead of dying. ggml reports its features from compile-time macros (``__AVX2__`` ...), so
the probe lists what the library was compiled for, not what the CPU has.
"""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ggml's feature names (llama_print_system_info) -> the flag /proc/cpuinfo shows for it.
GGML_TO_CPUINFO = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}

# Runs in the child: prints one JSON line, or dies trying (that is the point).
_PROBE = r"""
import json, llama_cpp
info = llama_cpp.llama_print_system_info()
info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
print(json.dumps({"system_info": info, "llama_cpp_python": llama_cpp.__version__,
                  "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload())}))
"""


def host_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU flags of the first processor in /proc/cpuinfo (the kernel's view: a flag the
    kernel or hypervisor hides is absent, which is what we want)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def build_features(system_info: str) -> set[str]:
    """ggml CPU features named ``= 1`` in llama_print_system_info's ``CPU : ...`` part."""
    out: set[str] = set()
    for part in system_info.split("|"):
        name, _, value = part.partition("=")
        name = name.strip().rsplit(":", 1)[-1].strip()  # "CPU : SSE3" -> "SSE3"
        if value.strip() == "1" and name in GGML_TO_CPUINFO:
            out.add(name)
    return out


@dataclass(frozen=True)
class CpuSupport:
    """What the build needs against what the host has. ``ok`` is False when the build needs an
    instruction the host lacks, or when the probe itself died (``probe_error``)."""

    machine: str
    host: frozenset[str]  # ggml feature names the host supports
    build: frozenset[str]  # ggml feature names llama.cpp was compiled for
    probe_error: str = ""
    probe_signal: str = ""  # e.g. "SIGILL" when loading llama.cpp killed the probe
    llama_cpp_python: str = ""
    gpu_offload_supported: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return sorted(self.build - self.host)

    @property
    def unused(self) -> list[str]:
        """Features the host has that the build does not use (speed left on the table)."""
        return sorted(self.host - self.build)

    @property
    def ok(self) -> bool:
        return not self.probe_error and not self.missing

    @property
    def code(self) -> str:
        """The error code a refused GGUF load carries: the CPU, or a broken install."""
        if self.missing or self.probe_signal:
            return "cpu_unsupported"
        return "backend_unavailable" if self.probe_error else ""

    def reason(self) -> str:
        if self.probe_error:
            return f"llama.cpp cannot start here: {self.probe_error}"
        if self.missing:
            return (f"this llama.cpp build uses {', '.join(self.missing)}, which this CPU "
                    "does not have")
        return ""

    def hint(self) -> str:
        return ("rebuild llama-cpp-python portable: `make clean test` with the default "
                "LLAMA_CMAKE_ARGS, or see docs/operations.md (CPU builds)")

    def to_wire(self) -> dict[str, Any]:
        return {"machine": self.machine, "ok": self.ok, "build": sorted(self.build),
                "host": sorted(self.host), "missing": self.missing, "unused": self.unused,
                "probe_error": self.probe_error, "code": self.code, "reason": self.reason(),
                "llama_cpp_python": self.llama_cpp_python}


def compare(system_info: str, cpuinfo: str | None = None, **kw: Any) -> CpuSupport:
    flags = host_flags(cpuinfo)
    host = frozenset(n for n, flag in GGML_TO_CPUINFO.items() if flag in flags)
    return CpuSupport(platform.machine(), host, frozenset(build_features(system_info)), **kw)


def probe_build(python: str | None = None, timeout_s: float = 120.0) -> CpuSupport:
    """Load llama.cpp in a child process and compare what it was built for with this CPU.

    Blocking (a process start and a library load, ~0.5 s): call it from a worker thread."""
    cmd = [python or sys.executable, "-c", _PROBE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return compare("", probe_error=f"loading llama.cpp took over {timeout_s:.0f} s")
    except OSError as e:
        return compare("", probe_error=f"cannot start {cmd[0]}: {e}")
    if proc.returncode != 0:
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            return compare("", probe_signal=sig,
                           probe_error=f"loading llama.cpp killed the process with {sig}")
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return compare("", probe_error=f"loading llama.cpp failed (exit {proc.returncode}): "
                                       f"{tail}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return compare("", probe_error=f"unexpected probe output: {proc.stdout[-200:]!r}")
    return compare(data["system_info"], llama_cpp_python=data["llama_cpp_python"],
                   gpu_offload_supported=data["gpu_offload_supported"])

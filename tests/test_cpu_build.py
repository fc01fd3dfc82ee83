"""llama.cpp is built portable, and Inferno says so when a build cannot run on this CPU.

A wheel built with -march=native on one server crashes on the next (AMX kernels fault on some
Xeon VMs with ``ldtilecfg``, AVX-512 is missing on AMD and older Intel). These tests check the
build the Makefile installs, the comparison of build against host, and that a llama.cpp that
cannot start is reported by the daemon and ``inferno doctor`` instead of killing them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infernod.backends import cpu_features
from infernod.backends.cpu_features import build_features, compare, host_flags, probe_build
from infernod.protocol.errors import InfernoError

ROOT = Path(__file__).resolve().parents[1]

# The "CPU :" part of llama_print_system_info on a portable x86-64-v3 build.
PORTABLE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
                 "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
NATIVE_SPR_INFO = PORTABLE_INFO + "AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 |"
SAPPHIRE_RAPIDS = ("processor : 0\nflags : fpu sse pni ssse3 fma avx f16c avx2 bmi2 avx512f "
                   "avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16\n")
EPYC_ROME = "processor : 0\nflags : fpu sse pni ssse3 fma avx f16c avx2 bmi2\n"
OLD_XEON = "processor : 0\nflags : fpu sse pni ssse3 avx\n"  # Sandy Bridge: no AVX2/FMA


def test_build_features_reads_the_cpu_part_of_system_info():
    assert build_features(PORTABLE_INFO) == {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA",
                                             "BMI2"}
    assert "AMX_INT8" in build_features(NATIVE_SPR_INFO)
    assert build_features("CPU : AVX2 = 0 | FMA = 1") == {"FMA"}


def test_portable_build_runs_everywhere_a_native_one_does_not():
    spr = compare(PORTABLE_INFO, SAPPHIRE_RAPIDS)
    assert spr.ok and spr.missing == []
    assert "AMX_INT8" in spr.unused and "AVX512" in spr.unused  # speed left, said plainly
    # a wheel built natively on the Xeon, installed on an EPYC: refused with the reason
    epyc = compare(NATIVE_SPR_INFO, EPYC_ROME)
    assert not epyc.ok
    assert epyc.missing == ["AMX_INT8", "AVX512", "AVX512_BF16", "AVX512_VNNI"]
    assert epyc.code == "cpu_unsupported" and "AMX_INT8" in epyc.reason()
    old = compare(PORTABLE_INFO, OLD_XEON)
    assert old.missing == ["AVX2", "BMI2", "F16C", "FMA"] and not old.ok


def test_host_flags_reads_proc_cpuinfo():
    assert "avx2" in host_flags(EPYC_ROME)
    assert host_flags("no flags here") == set()
    if Path("/proc/cpuinfo").exists():
        assert host_flags()  # this machine has some


def _fake_python(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "python-that-crashes"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


def test_a_build_that_dies_loading_is_reported_not_suffered(tmp_path):
    """What the AMX Xeon did: loading llama.cpp killed the process. The probe runs in a child,
    so the caller lives and reports the signal."""
    sigill = probe_build(_fake_python(tmp_path, "kill -ILL $$"), timeout_s=30)
    assert not sigill.ok and sigill.probe_signal == "SIGILL"
    assert sigill.code == "cpu_unsupported" and "SIGILL" in sigill.reason()
    broken = probe_build(_fake_python(tmp_path, "echo 'OSError: libllama.so: cannot open' >&2;"
                                                " exit 1"), timeout_s=30)
    assert broken.code == "backend_unavailable" and "libllama.so" in broken.reason()


def test_installed_build_is_portable_and_runs_here():
    """The wheel the Makefile installs: x86-64-v3, no AVX-512 or AMX compiled in, whatever
    the machine that built it had."""
    if not cpu_features.host_flags():
        pytest.skip("no /proc/cpuinfo")
    cpu = probe_build(timeout_s=120)
    assert cpu.ok, cpu.reason()
    assert {"AVX2", "FMA", "F16C"} <= cpu.build
    assert not cpu.build & {"AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX512_VBMI", "AMX_INT8"}


def test_installed_library_has_no_avx512_or_amx_instructions():
    """ggml's feature report comes from macros; this reads the machine code itself: no zmm
    registers (AVX-512) and no tile instructions (AMX) anywhere in the CPU backend."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    import llama_cpp

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    assert libs, "libggml-cpu not found beside llama_cpp"
    for lib in libs:
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)],
                             capture_output=True, text=True, timeout=240, check=True).stdout
        assert not re.search(r"%zmm\d|ldtilecfg|tdpb[su][su]d", asm), f"{lib.name} needs " \
            "AVX-512 or AMX: it will not run on every x86 server"


def test_makefile_builds_portable_and_keys_the_wheel_by_its_flags(tmp_path):
    """A wheel pip cached from a -march=native build must never be reused: the Makefile
    builds into a folder named by version and flags, with pip's wheel cache off."""
    env = {**os.environ, "HOME": str(tmp_path)}  # no wheel built here: make shows the build

    def dry_run(*extra: str) -> str:
        return subprocess.run(["make", "-n", "llama-wheel", f"VENV={tmp_path}/venv", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                              check=True).stdout

    default = dry_run()
    assert "-DGGML_NATIVE=OFF" in default and "-DGGML_AMX_INT8=OFF" in default
    assert "--no-cache-dir" in default
    native = dry_run("LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON")

    def wheelhouse(text: str) -> str:
        return re.search(r"-w (\S+)", text).group(1)

    assert wheelhouse(default) != wheelhouse(native)


@pytest.mark.model
def test_daemon_reports_cpu_and_refuses_gguf_loads_it_cannot_run(daemon_factory):
    """A llama.cpp the daemon cannot load (here: the library path points nowhere) disables
    GGUF models with a clear error; the daemon itself keeps serving."""
    good = daemon_factory()
    with good.client() as c:
        st = _status_with_cpu(c)
    assert st["cpu"]["ok"] and "AVX2" in st["cpu"]["build"] and st["cpu"]["missing"] == []

    bad = daemon_factory(env={"LLAMA_CPP_LIB_PATH": "/nonexistent-llama-lib"})
    with bad.client(timeout=30) as c:
        st = _status_with_cpu(c)
        assert not st["cpu"]["ok"] and st["cpu"]["code"] == "backend_unavailable"
        with pytest.raises(InfernoError) as e:
            c.load("gemma3-270m")
        assert e.value.code == "backend_unavailable" and e.value.hint
        assert c.ping()["pong"]
    assert bad.proc.poll() is None
    out = subprocess.run([sys.executable, "-m", "infernod.cli", "--endpoint", bad.endpoint,
                          "doctor", "--json"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMA_CPP_LIB_PATH": "/nonexistent-llama-lib"})
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert not report["local"]["ok"] and not report["daemon"]["ok"]


def test_doctor_says_ok_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "infernod.cli", "--endpoint",
                          "ipc:///nonexistent/inferno/control.sock", "--timeout", "1",
                          "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "this install: OK" in out.stdout and "AVX2" in out.stdout


def _status_with_cpu(c) -> dict:
    """The probe runs right after start: wait (bounded) until status carries it."""
    import time

    end = time.monotonic() + 60
    while time.monotonic() < end:
        st = c.status()
        if st.get("cpu") is not None:
            return st
        time.sleep(0.2)
    raise AssertionError("status never reported the cpu probe")

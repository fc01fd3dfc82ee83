"""The one place in Inferno that calls NVML (the ``pynvml`` module of nvidia-ml-py).

Why a single choke point (as nvitop does): NVML errors, unit conversions and "this GPU does
not support that field" are handled once, here, and every consumer (sampler, profiler,
Prometheus, TUI) sees plain numbers in SI-ish units or ``None``.

Rules this module keeps:

* ``pynvml`` is imported lazily inside :class:`NvmlReader`, never at module import, so the
  protocol/client side never pulls it in and a machine without the package still runs.
* No driver, no library, no package: the reader is ``available=False`` with a ``reason`` and
  :meth:`NvmlReader.sample` returns ``{"available": False, "reason": ..., "gpus": []}``.
  Nvitop exits there; Inferno keeps serving on the CPU.
* A field the GPU does not support (``NVMLError_NotSupported``, e.g. fan speed on an H100)
  becomes ``None`` and is logged once per (gpu, field), never per sample.
* :meth:`NvmlReader.sample` never raises.

Units: NVML reports power in milliwatts; we publish watts. Memory is in bytes, clocks in MHz,
temperatures in degrees Celsius, utilisation in percent.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import psutil

log = logging.getLogger(__name__)

# Keys of one GPU entry in a sample, in a stable order (the TUI and Prometheus rely on them).
GPU_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "uuid",
    "utilization_gpu_pct",
    "utilization_memory_pct",
    "memory_used_bytes",
    "memory_total_bytes",
    "memory_free_bytes",
    "memory_reserved_bytes",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "clock_sm_mhz",
    "clock_mem_mhz",
    "performance_state",
    "fan_pct",
    "encoder_util_pct",
    "decoder_util_pct",
    "processes",
)

_MISSING = object()


def _text(value: Any) -> str:
    """pynvml returns ``str`` in current releases and ``bytes`` in old ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _call_text(getter: Callable[[Any], Any], handle: Any) -> str:
    return _text(getter(handle))


class NvmlReader:
    """Reads every GPU through NVML; degrades to ``available=False`` instead of raising.

    ``nvml_module`` lets tests inject a stand-in with pynvml's function names and error
    classes; by default ``pynvml`` is imported here, lazily. ``own_pid`` (default: this
    process) marks the daemon's own entry in the per-process GPU memory lists.
    Thread-safe: the sampler thread calls :meth:`sample`, the daemon calls :meth:`close`.
    """

    def __init__(self, nvml_module: Any | None = None, own_pid: int | None = None) -> None:
        self.available: bool = False
        self.reason: str | None = None
        self.driver_version: str | None = None
        self.own_pid: int = os.getpid() if own_pid is None else own_pid
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._static: list[dict[str, Any]] = []
        self._logged: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._memory_v2: bool = True  # cleared once the driver refuses nvmlMemory_v2
        self._open(nvml_module)

    # ----------------------------------------------------------------------- setup
    def _open(self, nvml_module: Any | None) -> None:
        """Load the library and enumerate GPUs; any failure means "no GPU", never a crash."""
        if nvml_module is None:
            try:
                import pynvml  # noqa: PLC0415 - lazy on purpose
            except Exception as e:  # ImportError, or a broken install
                self._unavailable(f"no NVIDIA driver (pynvml not importable: {e})")
                return
            nvml_module = pynvml
        self._nvml = nvml_module
        nvml_error = getattr(nvml_module, "NVMLError", Exception)
        try:
            nvml_module.nvmlInit()
        except nvml_error as e:
            self._unavailable(f"no NVIDIA driver ({e})")
            return
        except Exception as e:  # e.g. NVMLLibraryMismatchError, OSError from ctypes
            self._unavailable(f"no NVIDIA driver ({type(e).__name__}: {e})")
            return
        try:
            count = int(nvml_module.nvmlDeviceGetCount())
            self._handles = [nvml_module.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as e:
            self._shutdown_quietly()
            self._unavailable(f"NVML initialised but GPUs could not be listed ({e})")
            return
        try:
            self.driver_version = _text(nvml_module.nvmlSystemGetDriverVersion())
        except Exception:
            self.driver_version = None
        for i, handle in enumerate(self._handles):
            self._static.append(
                {
                    "index": i,
                    "name": self._read(
                        i, "name", partial(_call_text, nvml_module.nvmlDeviceGetName, handle)
                    ),
                    "uuid": self._read(
                        i, "uuid", partial(_call_text, nvml_module.nvmlDeviceGetUUID, handle)
                    ),
                }
            )
        self.available = True
        log.info(
            "NVML: %d GPU(s), driver %s: %s",
            len(self._handles),
            self.driver_version,
            ", ".join(str(s["name"]) for s in self._static) or "none",
        )

    def _unavailable(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        self._nvml = None
        log.info("GPU telemetry off: %s", reason)

    def _shutdown_quietly(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown failed: %s", e)

    @property
    def gpu_count(self) -> int:
        """Number of GPUs NVML listed at start (0 when unavailable)."""
        return len(self._handles) if self.available else 0

    # ----------------------------------------------------------------------- reads
    def _read(self, gpu: int, field: str, fn: Callable[[], Any]) -> Any:
        """Call one NVML getter; an NVML error becomes ``None``, logged once per (gpu, field)."""
        nvml = self._nvml
        try:
            return fn()
        except nvml.NVMLError as e:
            key = (gpu, field)
            if key not in self._logged:
                self._logged.add(key)
                if isinstance(e, nvml.NVMLError_NotSupported):
                    log.info("GPU %d: %s is not supported (%s); reported as null", gpu, field, e)
                else:
                    log.warning("GPU %d: reading %s failed (%s); reported as null", gpu, field, e)
            return None

    def _memory(self, gpu: int, handle: Any) -> dict[str, int | None]:
        """Memory in bytes. Prefer nvmlMemory_v2 so ``used`` matches nvidia-smi (it excludes
        the driver's reserved memory); older drivers only answer the v1 struct, whose ``used``
        includes the reservation (about 480 MiB on an idle H100)."""
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if self._memory_v2 and version is not None:
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                return {
                    "memory_used_bytes": int(mem.used),
                    "memory_total_bytes": int(mem.total),
                    "memory_free_bytes": int(mem.free),
                    "memory_reserved_bytes": int(mem.reserved),
                }
            except nvml.NVMLError as e:
                log.info("GPU %d: nvmlMemory_v2 unavailable (%s); using v1 memory info", gpu, e)
                self._memory_v2 = False
        mem = self._read(gpu, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if mem is None:
            return dict.fromkeys(
                (
                    "memory_used_bytes",
                    "memory_total_bytes",
                    "memory_free_bytes",
                    "memory_reserved_bytes",
                )
            )
        return {
            "memory_used_bytes": int(mem.used),
            "memory_total_bytes": int(mem.total),
            "memory_free_bytes": int(mem.free),
            "memory_reserved_bytes": None,
        }

    def _processes(self, gpu: int, handle: Any) -> list[dict[str, Any]] | None:
        """Compute and graphics processes merged by pid; name from psutil when visible."""
        nvml = self._nvml
        merged: dict[int, dict[str, Any]] = {}
        answered = False
        for kind, getter in (
            ("compute", "nvmlDeviceGetComputeRunningProcesses"),
            ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
        ):
            fn = getattr(nvml, getter, None)
            if fn is None:
                continue
            procs = self._read(gpu, f"processes_{kind}", partial(fn, handle))
            if procs is None:
                continue
            answered = True
            for p in procs:
                pid = int(p.pid)
                used = getattr(p, "usedGpuMemory", None)  # None: not available (e.g. WDDM)
                used = None if used is None else int(used)
                entry = merged.get(pid)
                if entry is None:
                    merged[pid] = {
                        "pid": pid,
                        "name": _process_name(pid),
                        "used_memory_bytes": used,
                        "kind": kind,
                        "is_daemon": pid == self.own_pid,
                    }
                else:
                    entry["kind"] = "both"
                    if used is not None and (entry["used_memory_bytes"] or 0) < used:
                        entry["used_memory_bytes"] = used
        if not answered:
            return None
        return sorted(merged.values(), key=lambda e: e["pid"])

    def _gpu(self, index: int, handle: Any) -> dict[str, Any]:
        nvml = self._nvml
        read = self._read
        util = read(index, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        power_mw = read(index, "power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = read(
            index, "power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        )
        enc = read(index, "encoder_util_pct", lambda: nvml.nvmlDeviceGetEncoderUtilization(handle))
        dec = read(index, "decoder_util_pct", lambda: nvml.nvmlDeviceGetDecoderUtilization(handle))
        entry: dict[str, Any] = dict(self._static[index])
        entry.update(
            {
                "utilization_gpu_pct": None if util is None else int(util.gpu),
                "utilization_memory_pct": None if util is None else int(util.memory),
            }
        )
        entry.update(self._memory(index, handle))
        entry.update(
            {
                "temperature_c": read(
                    index,
                    "temperature_c",
                    lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                ),
                "power_w": None if power_mw is None else power_mw / 1000.0,
                "power_limit_w": None if limit_mw is None else limit_mw / 1000.0,
                "clock_sm_mhz": read(
                    index,
                    "clock_sm_mhz",
                    lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                ),
                "clock_mem_mhz": read(
                    index,
                    "clock_mem_mhz",
                    lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
                ),
                "performance_state": read(
                    index, "performance_state", lambda: nvml.nvmlDeviceGetPerformanceState(handle)
                ),
                "fan_pct": read(index, "fan_pct", lambda: nvml.nvmlDeviceGetFanSpeed(handle)),
                # Encoder/decoder getters return [utilisation %, sampling period us].
                "encoder_util_pct": None if enc is None else int(enc[0]),
                "decoder_util_pct": None if dec is None else int(dec[0]),
                "processes": self._processes(index, handle),
            }
        )
        return {k: entry.get(k) for k in GPU_FIELDS}

    def sample(self) -> dict[str, Any]:
        """One reading of every GPU. Never raises.

        ``{"available": True, "reason": None, "driver_version": str|None, "daemon_pid": int,
        "gpus": [{index, name, uuid, utilization_gpu_pct, ..., processes}]}``, or
        ``{"available": False, "reason": str, "gpus": []}`` without NVML.
        """
        with self._lock:
            if not self.available or self._closed:
                return {"available": False, "reason": self.reason or "NVML closed", "gpus": []}
            gpus: list[dict[str, Any]] = []
            for i, handle in enumerate(self._handles):
                try:
                    gpus.append(self._gpu(i, handle))
                except Exception as e:  # a bug or an unexpected library answer: skip, don't die
                    key = (i, "__sample__")
                    if key not in self._logged:
                        self._logged.add(key)
                        log.exception("GPU %d: sampling failed (%s); GPU skipped", i, e)
            return {
                "available": True,
                "reason": None,
                "driver_version": self.driver_version,
                "daemon_pid": self.own_pid,
                "gpus": gpus,
            }

    def close(self) -> None:
        """Shut NVML down (idempotent). Later samples report NVML as unavailable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.available and self._nvml is not None:
                self._shutdown_quietly()
            self.available = False
            if self.reason is None:
                self.reason = "NVML closed"


def _process_name(pid: int) -> str | None:
    """Best effort: another user's process, or one in another PID namespace, has no name."""
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None

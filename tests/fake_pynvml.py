"""A stand-in ``pynvml`` that replays a recorded NVML trace (tests only, never the product).

It exposes pynvml's real function names, returns pynvml's real ctypes structures and
``nvmlFriendlyObject`` process entries, and raises pynvml's real error classes: an error
recorded in the trace as ``{"error": "Not Supported"}`` (``str()`` of the exception that
nvidia-ml-py raised) is raised again as ``pynvml.NVMLError(<that code>)``, which pynvml maps to
``NVMLError_NotSupported``. Importing the real ``pynvml`` module loads no library, so this
works on machines without a driver.

The trace (``h100_trace.json``) recorded v1 memory info only (``used`` includes the driver's
reserved memory). Like a driver without ``nvmlDeviceGetMemoryInfo_v2``, the fake answers
``version=nvmlMemory_v2`` with ``NVMLError_FunctionNotFound`` unless ``memory_reserved_bytes``
is given, in which case it derives the v2 struct (used = v1 used - reserved).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml as _real

TRACE_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nvml" / "h100_trace.json"
)

# Error message -> NVML return code, from nvidia-ml-py's own table.
_CODE_BY_MESSAGE = {msg: code for code, msg in _real.NVMLError._errcode_to_string.items()}


def load_trace(path: Path = TRACE_PATH) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


class FakePynvml:
    """Module-like object: ``NvmlReader(nvml_module=FakePynvml(trace))`` or put it in
    ``sys.modules["pynvml"]``. ``index`` selects the recorded sample every getter answers
    from; :meth:`advance` moves to the next one (clamped at the last)."""

    def __init__(
        self,
        trace: dict[str, Any],
        *,
        init_error: int | None = None,
        memory_reserved_bytes: int | None = None,
    ) -> None:
        # The real error classes and constants, so `except pynvml.NVMLError_NotSupported` works.
        for name in dir(_real):
            if name.startswith(("NVMLError", "NVML_", "nvmlMemory_v")):
                setattr(self, name, getattr(_real, name))
        self.trace = trace
        self.samples: list[list[dict[str, Any]]] = trace["samples"]
        self.index = 0
        self.init_error = init_error
        self.memory_reserved_bytes = memory_reserved_bytes
        self.initialized = 0
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: dict[str, int] = {}

    # ------------------------------------------------------------------ replay control
    def advance(self) -> None:
        self.index = min(self.index + 1, len(self.samples) - 1)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _check_init(self) -> None:
        if self.initialized <= 0:
            raise _real.NVMLError(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Any) -> dict[str, Any]:
        self._check_init()
        if not isinstance(handle, int) or not 0 <= handle < self.trace["device_count"]:
            raise _real.NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return self.samples[self.index][handle]

    def _field(self, handle: Any, key: str) -> Any:
        value = self._gpu(handle)[key]
        if isinstance(value, dict) and "error" in value:
            raise _real.NVMLError(_CODE_BY_MESSAGE[value["error"]])
        return value

    # ------------------------------------------------------------------ init / system
    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        self.init_calls += 1
        if self.init_error is not None:
            raise _real.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")
        self._check_init()
        self.shutdown_calls += 1
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.trace["driver_version"]

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return int(self.trace["device_count"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check_init()
        if not 0 <= index < self.trace["device_count"]:
            raise _real.NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return index  # opaque to callers, like the real c_nvmlDevice_t pointer

    # ------------------------------------------------------------------ device getters
    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._gpu(handle)
        return self.trace["devices"][handle]["name"]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._gpu(handle)
        return self.trace["devices"][handle]["uuid"]

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        self._count("nvmlDeviceGetUtilizationRates")
        u = self._field(handle, "utilization")
        return _real.c_nvmlUtilization_t(gpu=u["gpu"], memory=u["memory"])

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        m = self._field(handle, "memory")
        if not version:
            return _real.c_nvmlMemory_t(total=m["total"], free=m["free"], used=m["used"])
        if self.memory_reserved_bytes is None:
            raise _real.NVMLError(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
        reserved = self.memory_reserved_bytes
        return _real.c_nvmlMemory_v2_t(
            version=version,
            total=m["total"],
            reserved=reserved,
            free=m["free"],
            used=m["used"] - reserved,
        )

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        if sensor != _real.NVML_TEMPERATURE_GPU:
            raise _real.NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return self._field(handle, "temperature_c")

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._field(handle, "power_mw")  # milliwatts, as NVML reports

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._field(handle, "power_limit_mw")

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._field(handle, "power_limit_mw")

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:  # noqa: A002 - pynvml's name
        if type == _real.NVML_CLOCK_SM:
            return self._field(handle, "clock_sm_mhz")
        if type == _real.NVML_CLOCK_MEM:
            return self._field(handle, "clock_mem_mhz")
        raise _real.NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetPerformanceState(self, handle: Any) -> int:
        return self._field(handle, "pstate")

    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int:
        self._count("nvmlDeviceGetFanSpeed")
        return self._field(handle, "fan_pct")

    def nvmlDeviceGetEncoderUtilization(self, handle: Any) -> list[int]:
        return [self._field(handle, "encoder_util"), 167000]  # [util %, sampling period us]

    def nvmlDeviceGetDecoderUtilization(self, handle: Any) -> list[int]:
        return [self._field(handle, "decoder_util"), 167000]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return [
            _real.nvmlFriendlyObject(
                {
                    "pid": p["pid"],
                    "usedGpuMemory": p["used_gpu_memory"],
                    "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF,
                }
            )
            for p in self._field(handle, "processes")
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        self._gpu(handle)
        return []  # the recorded load was CUDA compute only

"""The ``nvml`` meter: GPU energy through nvidia-ml-py. The only module in lapdtr that imports
``pynvml``, and only when a meter is created, so importing lapdtr never needs NVML.

Where the GPU has it (Volta and newer) the meter reads ``nvmlDeviceGetTotalEnergyConsumption``
(mJ since the driver loaded); otherwise a background thread samples ``nvmlDeviceGetPowerUsage``
(mW) and integrates it with the trapezoid rule. NVML's exceptions are translated into
``lapdtr.energy.errors`` by ``nvml_errors`` (a context manager and decorator)."""
from __future__ import annotations

import contextlib
import sys
import threading

from .errors import EnergyMeterError, GpuLost, NvmlNotSupported, NvmlUnavailable
from .meters import BudgetedMeter, PowerSampler, register_meter

# The driver refreshes the energy counter and the power reading only every ~20-100 ms; windows
# shorter than this are flagged ``too_short``.
NVML_UPDATE_PERIOD_S = 0.1

_NVML = None  # the initialised pynvml module, shared by every NvmlMeter in the process
_NVML_LOCK = threading.Lock()

# (pynvml exception class, pynvml error constant, its value in nvml.h) -> lapdtr exception
_TRANSLATION = [
    (("NVMLError_GpuIsLost", "NVML_ERROR_GPU_IS_LOST", 15), GpuLost, "the GPU is lost"),
    (("NVMLError_NotSupported", "NVML_ERROR_NOT_SUPPORTED", 3), NvmlNotSupported,
     "not supported by this GPU"),
    (("NVMLError_FunctionNotFound", "NVML_ERROR_FUNCTION_NOT_FOUND", 13), NvmlNotSupported,
     "not provided by this driver"),
    (("NVMLError_LibraryNotFound", "NVML_ERROR_LIBRARY_NOT_FOUND", 12), NvmlUnavailable,
     "libnvidia-ml.so was not found (is the NVIDIA driver installed?)"),
    (("NVMLError_DriverNotLoaded", "NVML_ERROR_DRIVER_NOT_LOADED", 9), NvmlUnavailable,
     "the NVIDIA driver is not loaded"),
    (("NVMLError_NoPermission", "NVML_ERROR_NO_PERMISSION", 4), NvmlUnavailable,
     "no permission to query the GPU"),
    (("NVMLError_Uninitialized", "NVML_ERROR_UNINITIALIZED", 1), NvmlUnavailable,
     "NVML is not initialised"),
]


def translate_nvml_error(error: BaseException, what: str) -> EnergyMeterError | None:
    """The lapdtr exception for an NVML error raised while doing ``what``; None if ``error`` is
    not an NVML error."""
    pynvml = sys.modules.get("pynvml")
    base = getattr(pynvml, "NVMLError", None)
    if base is None or not isinstance(error, base):
        return None
    code = getattr(error, "value", None)
    for (cls_name, const_name, default_code), exc, reason in _TRANSLATION:
        cls = getattr(pynvml, cls_name, None)
        if (isinstance(cls, type) and isinstance(error, cls)) or \
                code == getattr(pynvml, const_name, default_code):
            return exc(f"NVML: {what}: {reason} ({error})")
    return EnergyMeterError(f"NVML: {what} failed ({error})")


@contextlib.contextmanager
def nvml_errors(what: str):
    """Turn NVML exceptions raised inside into typed lapdtr exceptions. Also a decorator:
    ``@nvml_errors("reading power")``."""
    try:
        yield
    except EnergyMeterError:
        raise
    except Exception as e:
        translated = translate_nvml_error(e, what)
        if translated is None:
            raise
        raise translated from e


def get_nvml():
    """The ``pynvml`` module, imported and initialised once per process."""
    global _NVML
    with _NVML_LOCK:
        if _NVML is None:
            try:
                import pynvml
            except ImportError as e:
                raise NvmlUnavailable(
                    "the 'nvml' energy meter needs nvidia-ml-py, which is not installed: "
                    "pip install nvidia-ml-py (or pick meter 'simulated' or 'null')") from e
            with nvml_errors("starting NVML (nvmlInit)"):
                pynvml.nvmlInit()
            _NVML = pynvml
        return _NVML


def shutdown_nvml() -> None:
    """Shut NVML down if ``get_nvml`` started it (meters still open stop working)."""
    global _NVML
    with _NVML_LOCK:
        if _NVML is not None:
            with contextlib.suppress(Exception):
                _NVML.nvmlShutdown()
            _NVML = None


@register_meter("nvml")
class NvmlMeter(BudgetedMeter):
    """Energy of one NVIDIA GPU (``gpu_index`` in NVML's order, which ignores
    CUDA_VISIBLE_DEVICES). ``mode`` is ``"counter"`` (hardware energy counter) or ``"sampling"``
    (power integrated by a thread every ``sample_interval_s``). ``budget_j`` is E_max,
    ``initial_j`` the charge at start (default: ``budget_j``). Call ``close()`` when done."""

    measured = True
    sync_cuda = True
    min_window_s = NVML_UPDATE_PERIOD_S

    def __init__(self, *, gpu_index: int = 0, budget_j: float | None = None,
                 initial_j: float | None = None, sample_interval_s: float = 0.05):
        super().__init__(budget_j=budget_j, initial_j=initial_j)
        if isinstance(gpu_index, bool) or not isinstance(gpu_index, int) or gpu_index < 0:
            raise ValueError(f"NvmlMeter: gpu_index must be an int >= 0, got {gpu_index!r}")
        if not (isinstance(sample_interval_s, (int, float)) and sample_interval_s > 0):
            raise ValueError(f"NvmlMeter: sample_interval_s must be > 0, got {sample_interval_s!r}")
        self.gpu_index = gpu_index
        self.sample_interval_s = float(sample_interval_s)
        self._sampler: PowerSampler | None = None
        self._nvml = get_nvml()
        with nvml_errors("counting GPUs"):
            count = self._nvml.nvmlDeviceGetCount()
        if count == 0:
            raise NvmlUnavailable("NVML: no NVIDIA GPU is visible on this machine")
        if gpu_index >= count:
            raise ValueError(f"NvmlMeter: gpu_index={gpu_index} is out of range; this machine has "
                             f"{count} GPU(s), allowed: 0..{count - 1}")
        with nvml_errors(f"opening GPU {gpu_index}"):
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(gpu_index)
        try:
            self._e0_mj = self._read_counter_mj()
            self.mode = "counter"
        except NvmlNotSupported:
            self.mode = "sampling"
            try:
                self._sampler = PowerSampler(self._read_power_w, interval_s=self.sample_interval_s,
                                             name=f"lapdtr-nvml-gpu{gpu_index}")
            except NvmlNotSupported as e:
                raise NvmlNotSupported(f"NVML: GPU {gpu_index} reports neither total energy nor "
                                       f"power usage ({e})") from e
            self.min_window_s = max(NVML_UPDATE_PERIOD_S, 2 * self.sample_interval_s)

    def _read_counter_mj(self) -> int:
        with nvml_errors(f"reading the energy counter of GPU {self.gpu_index}"):
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def _read_power_w(self) -> float:
        with nvml_errors(f"reading the power of GPU {self.gpu_index}"):
            return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def energy_j(self) -> float:
        if self._sampler is not None:
            return self._sampler.energy_j()
        return (self._read_counter_mj() - self._e0_mj) / 1000.0

    def power_w(self) -> float:
        return self._read_power_w()

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()

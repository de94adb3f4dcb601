"""Typed errors raised by energy meters. NVML's own exceptions never leave ``lapdtr.energy.nvml``:
they are translated into these, so callers need not import pynvml to catch them."""
from __future__ import annotations


class EnergyMeterError(RuntimeError):
    """A meter could not produce a reading."""


class SensorUnavailable(EnergyMeterError):
    """The hardware or library behind a meter is missing (no driver, no sysfs file, no GPU).

    Callers that can fall back to a modelled meter (``simulated`` or ``null``) catch this one."""


class NvmlUnavailable(SensorUnavailable):
    """nvidia-ml-py is not installed, or NVML cannot start (no driver, no library, no permission)."""


class NvmlNotSupported(EnergyMeterError):
    """The GPU does not support the NVML query that was asked for."""


class GpuLost(EnergyMeterError):
    """The GPU fell off the bus or stopped answering (NVML_ERROR_GPU_IS_LOST)."""


class DrainNotSupported(EnergyMeterError):
    """``drain(joules)`` on a meter that cannot be drained (one that reads hardware, or the null
    meter); ``meter.can_drain`` says beforehand."""

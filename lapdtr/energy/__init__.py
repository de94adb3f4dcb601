"""Energy meters behind one interface (``EnergyMeter``), chosen by name: ``nvml`` (NVIDIA GPUs),
``jetson`` (INA3221 power rails), ``simulated`` (a battery driven by a power model), ``null``.
Importing this package never imports pynvml; ``create_meter("nvml")`` does."""
from .base import EnergyMeter, Measurement
from .errors import (DrainNotSupported, EnergyMeterError, GpuLost, NvmlNotSupported,
                     NvmlUnavailable, SensorUnavailable)
from .meters import (BudgetedMeter, NullMeter, PowerSampler, create_meter, create_meter_for_device,
                     get_meter_class, list_meters, meter_arguments, register_meter)
from .jetson import JetsonMeter
from .nvml import NvmlMeter
from .simulated import SimulatedBattery

__all__ = ["BudgetedMeter", "DrainNotSupported", "EnergyMeter", "EnergyMeterError", "GpuLost",
           "JetsonMeter", "Measurement", "NullMeter", "NvmlMeter", "NvmlNotSupported",
           "NvmlUnavailable", "PowerSampler", "SensorUnavailable", "SimulatedBattery",
           "create_meter", "create_meter_for_device", "get_meter_class", "list_meters",
           "meter_arguments", "register_meter"]

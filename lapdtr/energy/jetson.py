"""The ``jetson`` meter: board power from the INA3221 monitors on NVIDIA Jetson modules, read from
sysfs and integrated over time by a sampling thread.

A rail is either one power file in mW (the ``ina3221x`` iio driver of L4T 28/32, e.g. Jetson
TX2: ``.../iio:device1/in_power0_input``) or a pair (voltage file in mV, current file in mA)
(the mainline ``ina3221`` hwmon driver of JetPack 5, e.g. Xavier NX: ``in1_input``,
``curr1_input``). The meter's power is the sum of its rails, so give either the board input
rail (VDD_IN) alone or the sub-rails, not both."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from .errors import EnergyMeterError, SensorUnavailable
from .meters import BudgetedMeter, PowerSampler, register_meter

RailFiles = Union[str, os.PathLike, tuple]

IIO_ROOT = "/sys/bus/i2c/drivers/ina3221x"
HWMON_ROOT = "/sys/bus/i2c/drivers/ina3221"

# Jetson TX2 (L4T 28/32): two INA3221 at 0x40 and 0x41 on bus 0. VDD_IN is the whole module input.
TX2_RAILS = {
    "VDD_SYS_GPU": f"{IIO_ROOT}/0-0040/iio:device0/in_power0_input",
    "VDD_SYS_SOC": f"{IIO_ROOT}/0-0040/iio:device0/in_power1_input",
    "VDD_4V0_WIFI": f"{IIO_ROOT}/0-0040/iio:device0/in_power2_input",
    "VDD_IN": f"{IIO_ROOT}/0-0041/iio:device1/in_power0_input",
    "VDD_SYS_CPU": f"{IIO_ROOT}/0-0041/iio:device1/in_power1_input",
    "VDD_SYS_DDR": f"{IIO_ROOT}/0-0041/iio:device1/in_power2_input",
}

# The board total: summing it with the sub-rails would count them twice.
TOTAL_RAIL = "VDD_IN"


def discover_rails(*, iio_root: str | os.PathLike | None = None,
                   hwmon_root: str | os.PathLike | None = None) -> dict[str, RailFiles]:
    """Rails named by the INA3221 drivers' own labels (``rail_name_<n>`` for iio, ``in<n>_label``
    for hwmon; roots default to ``IIO_ROOT`` and ``HWMON_ROOT``), mapped to their power file or
    (voltage, current) files."""
    iio_root = IIO_ROOT if iio_root is None else iio_root
    hwmon_root = HWMON_ROOT if hwmon_root is None else hwmon_root
    rails: dict[str, RailFiles] = {}
    for label in sorted(Path(iio_root).glob("*/iio:device*/rail_name_*")):
        channel = label.name.rsplit("_", 1)[1]
        rails[label.read_text().strip()] = str(label.parent / f"in_power{channel}_input")
    for label in sorted(Path(hwmon_root).glob("*/hwmon/hwmon*/in*_label")):
        m = re.fullmatch(r"in(\d+)_label", label.name)
        if m is None:
            continue
        n = m.group(1)
        rails[label.read_text().strip()] = (str(label.parent / f"in{n}_input"),
                                            str(label.parent / f"curr{n}_input"))
    return rails


def default_rails() -> dict[str, RailFiles]:
    """The board input rail if the drivers label one (VDD_IN), else every rail they expose, else
    the Jetson TX2 layout (whose absence the meter then reports by path)."""
    found = discover_rails()
    if TOTAL_RAIL in found:
        return {TOTAL_RAIL: found[TOTAL_RAIL]}
    return found or {TOTAL_RAIL: TX2_RAILS[TOTAL_RAIL]}


def _read_int(path: str) -> int:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise SensorUnavailable(f"jetson meter: cannot read {path!r}: {e}") from e
    try:
        return int(text)
    except ValueError as e:
        raise EnergyMeterError(f"jetson meter: {path!r} holds {text!r}, not an integer") from e


@register_meter("jetson")
class JetsonMeter(BudgetedMeter):
    """Board power from INA3221 rails: ``rails`` maps a rail name to its power file (mW) or a
    (voltage mV, current mA) pair of files; None finds them (``default_rails``). A thread samples
    every ``sample_interval_s``; windows shorter than two samples are flagged ``too_short``."""

    measured = True
    sync_cuda = True

    def __init__(self, *, rails: dict[str, RailFiles] | None = None,
                 budget_j: float | None = None, initial_j: float | None = None,
                 sample_interval_s: float = 0.05):
        super().__init__(budget_j=budget_j, initial_j=initial_j)
        if not (isinstance(sample_interval_s, (int, float)) and sample_interval_s > 0):
            raise ValueError(f"JetsonMeter: sample_interval_s must be > 0, got {sample_interval_s!r}")
        if rails is None:
            rails = default_rails()
        if not isinstance(rails, dict) or not rails:
            raise ValueError("JetsonMeter: rails must be a non-empty dict {rail name: power file "
                             f"(mW) or (voltage file (mV), current file (mA))}}, got {rails!r}")
        self.rails: dict[str, RailFiles] = {}
        for name, files in rails.items():
            if isinstance(files, (str, os.PathLike)):
                paths: tuple[str, ...] = (os.fspath(files),)
            elif isinstance(files, (tuple, list)) and len(files) == 2 and \
                    all(isinstance(f, (str, os.PathLike)) for f in files):
                paths = tuple(os.fspath(f) for f in files)
            else:
                raise ValueError(f"JetsonMeter: rail {name!r}: expected a power file path (mW) or "
                                 f"a (voltage mV, current mA) pair of paths, got {files!r}")
            for p in paths:
                if not os.path.isfile(p):
                    raise SensorUnavailable(f"jetson meter: rail {name!r}: no such sysfs file "
                                            f"{p!r} (pass rails={{name: path}} for this board)")
            self.rails[name] = paths[0] if len(paths) == 1 else paths
        self.sample_interval_s = float(sample_interval_s)
        self.min_window_s = 2 * self.sample_interval_s
        self._sampler = PowerSampler(self.read_rails_w, interval_s=self.sample_interval_s,
                                     name="lapdtr-jetson-rails")

    def read_rails_w(self) -> float:
        """Current power (W): the sum over rails."""
        total_mw = 0.0
        for files in self.rails.values():
            if isinstance(files, tuple):
                total_mw += _read_int(files[0]) * _read_int(files[1]) / 1000.0  # mV * mA / 1000
            else:
                total_mw += _read_int(files)
        return total_mw / 1000.0

    def energy_j(self) -> float:
        return self._sampler.energy_j()

    def power_w(self) -> float:
        return self.read_rails_w()

    def close(self) -> None:
        self._sampler.close()

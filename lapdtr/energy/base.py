"""The ``EnergyMeter`` interface and its registry. Meters say whether their figures are measured
(a hardware counter or sensor) or modelled (a power model)."""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass

from .errors import DrainNotSupported


@dataclass
class Measurement:
    """Energy and time over a named window (Zeus-style ``begin_window`` / ``end_window``)."""

    name: str
    time_s: float
    energy_j: float
    measured: bool
    too_short: bool = False  # the window was shorter than the meter's update period


class EnergyMeter(abc.ABC):
    """Energy consumed since start, current power, remaining budget.

    ``measured`` is True when figures come from hardware, False when they are modelled;
    ``label`` says so in a report (``measured``, ``modelled``; ``none`` for the null meter).
    ``budget_j`` is E_max (None: unlimited); ``remaining_j()`` is E_i = budget - consumed.

    The runtime reports what a rank did through ``record_compute(time_s)``,
    ``record_idle(time_s)`` and ``record_bytes(sent, received)``, to every meter alike: a meter
    driven by a power model (``simulated``) draws energy for it, one that reads hardware ignores
    it (the hardware saw the work). Each returns the joules it drew. ``drain(joules)`` removes
    charge at once, only where ``can_drain`` (a simulated battery); elsewhere it raises
    ``DrainNotSupported``.
    """

    measured: bool = False
    name: str = "meter"
    #: charge removed by injected drains (``drain``): not energy used, never in ``energy_j``
    drained_j: float = 0.0

    def __init__(self, budget_j: float | None = None):
        if budget_j is not None and budget_j < 0:
            raise ValueError(f"budget_j must be >= 0, got {budget_j}")
        self.budget_j = budget_j
        self._windows: dict[str, tuple[float, float]] = {}

    @abc.abstractmethod
    def energy_j(self) -> float:
        """Energy consumed since the meter started, in joules."""

    @abc.abstractmethod
    def power_w(self) -> float:
        """Current power draw in watts."""

    def remaining_j(self) -> float | None:
        if self.budget_j is None:
            return None
        return max(0.0, self.budget_j - self.energy_j())

    @property
    def label(self) -> str:
        return "measured" if self.measured else "modelled"

    def record_compute(self, time_s: float) -> float:
        """``time_s`` seconds of computing; returns the joules drawn for it (here: none)."""
        return 0.0

    def record_idle(self, time_s: float) -> float:
        """``time_s`` seconds of waiting; returns the joules drawn for it (here: none)."""
        return 0.0

    def record_bytes(self, sent: int = 0, received: int = 0) -> float:
        """Bytes sent and received; returns the joules drawn for them (here: none)."""
        return 0.0

    @property
    def can_drain(self) -> bool:
        """Whether ``drain`` works on this meter (a battery that is modelled, not read)."""
        return False

    def drain(self, joules: float) -> float:
        """Remove ``joules`` of charge at once (an injected drop); returns the joules drawn."""
        raise DrainNotSupported(
            f"energy meter {self.name!r} ({type(self).__name__}) cannot be drained: only a "
            "meter whose can_drain is True (the 'simulated' battery) takes drain(joules)")

    def begin_window(self, name: str) -> None:
        self._windows[name] = (time.perf_counter(), self.energy_j())

    def end_window(self, name: str) -> Measurement:
        if name not in self._windows:
            raise ValueError(f"no open energy window named {name!r}")
        t0, e0 = self._windows.pop(name)
        return Measurement(name, time.perf_counter() - t0, self.energy_j() - e0, self.measured)

    def close(self) -> None:
        """Stop background work (sampling threads)."""

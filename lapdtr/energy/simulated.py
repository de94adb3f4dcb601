"""The ``simulated`` meter: a battery drained by a power model, advanced by the caller with
measured compute time, idle time and bytes moved. Its figures are modelled (``measured=False``)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .meters import BudgetedMeter, check_non_negative, meter_arguments, register_meter

if TYPE_CHECKING:
    from ..profile.types import DeviceProfile


@register_meter("simulated")
class SimulatedBattery(BudgetedMeter):
    """A battery of ``capacity_j`` (E_max) starting at ``initial_j`` (default: full).

    ``record_compute(time_s)`` draws ``power_active_w * time_s``, ``record_idle(time_s)`` draws
    ``power_idle_w * time_s``, ``record_bytes(sent, received)`` draws ``energy_per_byte_j`` per
    byte; ``drain(joules)`` removes charge directly (an injected fault: it lowers
    ``remaining_j`` but is not energy the device used, so ``energy_j`` leaves it out and
    ``drained_j`` holds it). ``energy_j()`` is what the power model drew so far,
    ``remaining_j()`` = initial - drawn - drained (never below 0), ``power_w()`` the power of
    the last recorded interval (idle power before any). Safe to call from several threads."""

    measured = False

    def __init__(self, *, capacity_j: float, power_active_w: float, power_idle_w: float,
                 energy_per_byte_j: float = 0.0, initial_j: float | None = None):
        for key, v in (("capacity_j", capacity_j), ("power_active_w", power_active_w),
                       ("power_idle_w", power_idle_w), ("energy_per_byte_j", energy_per_byte_j),
                       ("initial_j", initial_j)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"SimulatedBattery: {key} must be a number, got {v!r}")
        if not capacity_j > 0:
            raise ValueError(f"SimulatedBattery: capacity_j must be > 0, got {capacity_j!r}")
        check_non_negative("SimulatedBattery", power_active_w=power_active_w,
                           power_idle_w=power_idle_w, energy_per_byte_j=energy_per_byte_j)
        super().__init__(budget_j=float(capacity_j), initial_j=initial_j)
        self.power_active_w = float(power_active_w)
        self.power_idle_w = float(power_idle_w)
        self.energy_per_byte_j = float(energy_per_byte_j)
        self._lock = threading.Lock()
        self._drawn_j = 0.0
        self._power_w = self.power_idle_w
        self.compute_time_s = 0.0
        self.idle_time_s = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.drained_j = 0.0

    @classmethod
    def from_device(cls, device: "DeviceProfile", **overrides) -> "SimulatedBattery":
        """A battery with the device's power model, E_max (``energy_budget_j``) and E_i
        (``energy_remaining_j``); ``overrides`` replace any of them."""
        allowed = sorted(meter_arguments("simulated"))
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"SimulatedBattery.from_device: unknown argument(s) {unknown}; "
                             f"allowed: {allowed}")
        kw = dict(capacity_j=device.energy_budget_j, power_active_w=device.power_active_w,
                  power_idle_w=device.power_idle_w, energy_per_byte_j=device.energy_per_byte_j,
                  initial_j=device.energy_remaining_j)
        kw.update(overrides)
        if kw["capacity_j"] is None:
            raise ValueError(f"device {device.name!r}: the 'simulated' meter needs "
                             "energy_budget_j (E_max), which is not set")
        return cls(**kw)

    @property
    def capacity_j(self) -> float:
        return self.budget_j

    def _draw(self, joules: float, power_w: float | None = None) -> float:
        with self._lock:
            self._drawn_j += joules
            if power_w is not None:
                self._power_w = power_w
        return joules

    @staticmethod
    def _check(key: str, v) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"SimulatedBattery: {key} must be a number >= 0, got {v!r}")
        return float(v)

    def record_compute(self, time_s: float) -> float:
        """Draw active power for ``time_s`` seconds; returns the joules drawn."""
        time_s = self._check("time_s", time_s)
        with self._lock:
            self.compute_time_s += time_s
        return self._draw(self.power_active_w * time_s, self.power_active_w)

    def record_idle(self, time_s: float) -> float:
        """Draw idle power for ``time_s`` seconds; returns the joules drawn."""
        time_s = self._check("time_s", time_s)
        with self._lock:
            self.idle_time_s += time_s
        return self._draw(self.power_idle_w * time_s, self.power_idle_w)

    def record_bytes(self, sent: int = 0, received: int = 0) -> float:
        """Draw ``energy_per_byte_j`` for each byte sent and received; returns the joules drawn."""
        sent = int(self._check("sent", sent))
        received = int(self._check("received", received))
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
        return self._draw(self.energy_per_byte_j * (sent + received))

    @property
    def can_drain(self) -> bool:
        return True

    def drain(self, joules: float) -> float:
        """Remove ``joules`` of charge at once (an injected drop); returns the joules drawn."""
        joules = self._check("joules", joules)
        with self._lock:
            self.drained_j += joules
        return joules

    def energy_j(self) -> float:
        """Joules the power model drew (compute, idle, bytes); injected drains are not in it."""
        with self._lock:
            return self._drawn_j

    def power_w(self) -> float:
        with self._lock:
            return self._power_w

    def remaining_j(self) -> float:
        with self._lock:
            return max(0.0, self.initial_j - self._drawn_j - self.drained_j)

    @property
    def depleted(self) -> bool:
        return self.remaining_j() <= 0.0

    def snapshot(self) -> dict:
        """Totals so far, as plain data for a report."""
        with self._lock:
            return {"capacity_j": self.budget_j, "initial_j": self.initial_j,
                    "energy_j": self._drawn_j,
                    "remaining_j": max(0.0, self.initial_j - self._drawn_j - self.drained_j),
                    "compute_time_s": self.compute_time_s, "idle_time_s": self.idle_time_s,
                    "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                    "drained_j": self.drained_j, "measured": False}

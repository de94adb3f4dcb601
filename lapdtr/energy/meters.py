"""Meter registry (``register_meter`` / ``create_meter`` / ``list_meters``), the ``null`` meter,
and the pieces the sampling meters share: a starting charge and a power-integrating thread."""
from __future__ import annotations

import inspect
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

from .base import EnergyMeter, Measurement

if TYPE_CHECKING:
    from ..profile.types import DeviceProfile

_METERS: dict[str, type[EnergyMeter]] = {}


def register_meter(name: str):
    """Class decorator: make an ``EnergyMeter`` subclass creatable as ``create_meter(name)``."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, EnergyMeter)):
            raise TypeError(f"register_meter({name!r}): {cls!r} is not an EnergyMeter subclass")
        old = _METERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"meter {name!r} is already registered to {old.__qualname__}")
        cls.name = name
        _METERS[name] = cls
        return cls

    return decorate


def list_meters() -> list[str]:
    return sorted(_METERS)


def get_meter_class(name: str) -> type[EnergyMeter]:
    if name not in _METERS:
        raise ValueError(f"unknown energy meter {name!r}; allowed: {list_meters()}")
    return _METERS[name]


def meter_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``create_meter(name, ...)`` accepts."""
    params = inspect.signature(get_meter_class(name).__init__).parameters
    return {k: p for k, p in params.items()
            if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def create_meter(name: str, **kwargs) -> EnergyMeter:
    """Build the meter registered as ``name``; an unknown name or argument is a ``ValueError``."""
    params = meter_arguments(name)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"energy meter {name!r}: unknown argument(s) {unknown}; "
                         f"allowed: {sorted(params)}")
    missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in kwargs)
    if missing:
        raise ValueError(f"energy meter {name!r}: missing required argument(s) {missing}; "
                         f"allowed: {sorted(params)}")
    return _METERS[name](**kwargs)


def create_meter_for_device(device: "DeviceProfile", **kwargs) -> EnergyMeter:
    """The meter ``device.meter`` names, charged from the device's E_max and E_i.

    ``meter: null`` (the default, also a YAML null, i.e. ``None``) gives a ``NullMeter``.
    Meters with a ``from_device`` classmethod (``simulated``) build themselves from the profile;
    the others get ``budget_j=energy_budget_j`` and ``initial_j=energy_remaining_j`` where they
    take them. ``kwargs`` go to the meter (e.g. ``gpu_index`` for ``nvml``)."""
    name = "null" if device.meter is None else device.meter
    cls = get_meter_class(name)
    if hasattr(cls, "from_device"):
        return cls.from_device(device, **kwargs)
    params = meter_arguments(name)
    if "budget_j" in params:
        kwargs.setdefault("budget_j", device.energy_budget_j)
    if "initial_j" in params:
        kwargs.setdefault("initial_j", device.energy_remaining_j)
    return create_meter(name, **kwargs)


def synchronize_cuda() -> None:
    """Wait for the work queued on every CUDA device this process has touched (no-op otherwise),
    so a window's clock and energy cover the kernels launched inside it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def check_non_negative(owner: str, **values: float | None) -> None:
    for key, v in values.items():
        if v is not None and not v >= 0:  # also rejects NaN
            raise ValueError(f"{owner}: {key} must be >= 0, got {v!r}")


class BudgetedMeter(EnergyMeter):
    """A meter with a starting charge: E_i = ``initial_j`` - consumed (``initial_j`` defaults to
    ``budget_j`` = E_max). ``min_window_s`` is the shortest window the meter resolves; shorter
    windows come back with ``too_short=True``."""

    min_window_s: float = 0.0
    sync_cuda: bool = False  # GPU meters: wait for queued CUDA work before opening/closing a window

    def __init__(self, *, budget_j: float | None = None, initial_j: float | None = None):
        super().__init__(budget_j)
        if initial_j is not None:
            if budget_j is None:
                raise ValueError(f"{type(self).__name__}: initial_j={initial_j} needs budget_j "
                                 "(E_max); got budget_j=None")
            if not 0 <= initial_j <= budget_j:
                raise ValueError(f"{type(self).__name__}: initial_j must be in [0, budget_j="
                                 f"{budget_j}], got {initial_j}")
        self.initial_j = budget_j if initial_j is None else float(initial_j)

    def remaining_j(self) -> float | None:
        if self.initial_j is None:
            return None
        return max(0.0, self.initial_j - self.energy_j())

    def begin_window(self, name: str) -> None:
        if self.sync_cuda:
            synchronize_cuda()
        super().begin_window(name)

    def end_window(self, name: str) -> Measurement:
        if self.sync_cuda:
            synchronize_cuda()
        m = super().end_window(name)
        m.too_short = m.time_s < self.min_window_s
        return m


@register_meter("null")
class NullMeter(EnergyMeter):
    """Where nothing can be measured or modelled: zero energy, zero power, no budget; every
    ``record_*`` is a no-op and it cannot be drained. The runtime holds one for a device without
    a meter instead of ``None``."""

    measured = False

    @property
    def label(self) -> str:
        return "none"

    def __init__(self):
        super().__init__(None)

    def energy_j(self) -> float:
        return 0.0

    def power_w(self) -> float:
        return 0.0

    def remaining_j(self) -> None:
        return None


class PowerSampler:
    """Integrates a power reading (W) over time with the trapezoid rule.

    ``sample()`` takes a reading and adds the trapezoid since the previous one; a daemon thread
    calls it every ``interval_s`` (``start=False``: only on demand). ``energy_j()`` samples first,
    so it is current to the call. An error in the thread is re-raised by the next call."""

    def __init__(self, read_power_w: Callable[[], float], *, interval_s: float,
                 clock: Callable[[], float] = time.monotonic, start: bool = True,
                 name: str = "lapdtr-power-sampler"):
        if not interval_s > 0:
            raise ValueError(f"PowerSampler: interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._read = read_power_w
        self._clock = clock
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._energy_j = 0.0
        self._p_last = float(read_power_w())  # a broken sensor fails here, in the caller
        self._t_last = clock()
        self.num_samples = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def sample(self) -> float:
        with self._lock:
            if self._error is not None:
                raise self._error
            p = float(self._read())
            t = self._clock()
            self._energy_j += 0.5 * (p + self._p_last) * (t - self._t_last)
            self._p_last, self._t_last = p, t
            self.num_samples += 1
            return self._energy_j

    def energy_j(self) -> float:
        return self.sample()

    def power_w(self) -> float:
        with self._lock:
            if self._error is not None:
                raise self._error
            return self._p_last

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except BaseException as e:  # kept for the caller's next reading
                with self._lock:
                    if self._error is None:
                        self._error = e
                return

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 4 * self.interval_s))
            self._thread = None

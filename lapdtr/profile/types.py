"""Profile artifacts: ``ModelProfile`` (per-unit costs) and ``DeviceProfile`` (what a device can
do). Plain dataclasses that round-trip through JSON (``profile.json``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .._json import from_jsonable, load_json, save_json, to_jsonable


@dataclass
class UnitProfile:
    """Costs of one unit for one input (the profile's batch size).

    ``flops``: floating point operations counted by ``torch.utils.flop_counter`` (a multiply-add
    counts 2). ``param_bytes``: bytes of the parameters and buffers the unit owns.
    ``in_bytes``/``out_bytes``: bytes of the activation entering / leaving the unit.
    ``peak_bytes``: largest total of live tensors the unit allocated while running, measured, plus
    its input. ``latency_s``: median of measured repeats after warm-up on the profiling device.
    """

    index: int
    name: str
    kind: str
    modules: list[str]
    in_format: str
    out_format: str
    in_shape: list[int]
    out_shape: list[int]
    flops: int
    num_params: int
    param_bytes: int
    in_bytes: int
    out_bytes: int
    peak_bytes: int
    latency_s: float
    latency_repeats: int = 0
    #: the unit's cost at reduced elastic widths, measured: ``{"0.5": {"flops": ..,
    #: "latency_s": ..}}`` keyed by ``width_key(ratio)``; full width is the fields above
    at_width: dict[str, dict] = field(default_factory=dict)


def width_key(ratio: float) -> str:
    """The key of a width ratio in ``UnitProfile.at_width``: 6 decimals (1/3 -> "0.333333")."""
    return f"{float(ratio):.6f}"


@dataclass
class ModelProfile:
    model: str
    family: str
    img_size: int
    batch_size: int
    dtype: str
    device: str
    units: list[UnitProfile]
    total_flops: int
    model_flops: int  # the whole model measured in one FlopCounterMode, for checking the sum
    total_latency_s: float
    versions: dict = field(default_factory=dict)
    #: elastic width ratios profiled (``profile_model(widths=...)``); [1.0] for a model
    #: profiled at full width only
    widths: list[float] = field(default_factory=lambda: [1.0])
    #: the width these figures are at (``at_width``): 1.0 for a profile as measured
    width: float = 1.0
    #: the whole model measured in one FlopCounterMode at each reduced width (``width_key``)
    width_model_flops: dict[str, int] = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        return len(self.units)

    def has_width(self, ratio: float) -> bool:
        return any(abs(float(ratio) - w) <= 1e-6 for w in self.widths)

    def at_width(self, ratio: float) -> "ModelProfile":
        """This profile with every unit's FLOPs and latency at elastic width ``ratio``, as
        measured (``profile_model(widths=...)``); a width not profiled is a ``ValueError``
        naming the ones that were."""
        import dataclasses

        ratio = float(ratio)
        if not self.has_width(ratio):
            raise ValueError(f"profile of {self.model!r}: width {ratio:g} was not profiled; "
                             f"profiled: {[round(w, 6) for w in self.widths]} "
                             f"(profile_model(..., widths=[...]))")
        if abs(ratio - 1.0) <= 1e-6:
            return self
        key = width_key(ratio)
        units = [dataclasses.replace(u, flops=int(u.at_width[key]["flops"]) if key in u.at_width
                                     else u.flops,
                                     latency_s=float(u.at_width[key]["latency_s"])
                                     if key in u.at_width else u.latency_s)
                 for u in self.units]
        return dataclasses.replace(
            self, units=units, total_flops=sum(u.flops for u in units),
            model_flops=int(self.width_model_flops.get(key, sum(u.flops for u in units))),
            total_latency_s=sum(u.latency_s for u in units), width=ratio)

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelProfile":
        return from_jsonable(cls, d)

    def save(self, path):
        return save_json(self, path)

    @classmethod
    def load(cls, path) -> "ModelProfile":
        return load_json(cls, path)


# LinkProfile's bandwidth field was ``bandwidth_bps``, which read as bits/s but held bytes/s
RENAMED_LINK_KEYS = {"bandwidth_bps": "bytes_per_s"}


def check_link_keys(d: dict, where: str = "LinkProfile") -> None:
    """A ``ValueError`` for a link written with a renamed key (``bandwidth_bps``)."""
    if isinstance(d, dict):
        for old, new in RENAMED_LINK_KEYS.items():
            if old in d:
                raise ValueError(f"{where}: key {old!r} was renamed {new!r}; it holds bytes per "
                                 f"second, not bits (write {new}: {d[old]!r})")


@dataclass
class LinkProfile:
    """A link to a peer: ``bytes_per_s`` (bytes, not bits, per second) and one-way ``latency_s``.

    ``peer`` is the other device's name, or ``"*"`` for any peer. ``measured``: the figures were
    measured (True) or given / defaulted (False).
    """

    peer: str
    bytes_per_s: float
    latency_s: float
    measured: bool = False

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinkProfile":
        check_link_keys(d)
        return from_jsonable(cls, d)


@dataclass
class DeviceProfile:
    """What one device can do. Measured (``measure_device``) or read from a device YAML file.

    ``gflops``: sustained GFLOP/s (measured with a matmul benchmark, or given).
    ``memory_bytes``: memory available for the model. ``power_active_w``/``power_idle_w``: the
    power model; ``energy_per_byte_j``: J per byte sent or received. ``energy_budget_j`` is
    E_max; ``energy_remaining_j`` is E_i (None: not energy-limited).
    """

    name: str
    kind: str = "cpu"  # cpu | cuda | jetson | simulated
    gflops: float = 1.0
    memory_bytes: int = 0
    power_active_w: float = 0.0
    power_idle_w: float = 0.0
    energy_per_byte_j: float = 0.0
    energy_budget_j: float | None = None
    energy_remaining_j: float | None = None
    energy_min_j: float = 0.0
    meter: str = "null"
    links: list[LinkProfile] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # which fields were measured (True) or given

    @property
    def joules_per_flop(self) -> float:
        """Energy cost of one FLOP: active power / throughput (lapdtr's corrected LAP-DTR cost)."""
        return self.power_active_w / (self.gflops * 1e9)

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        if isinstance(d, dict) and isinstance(d.get("links"), list):
            for i, link in enumerate(d["links"]):
                check_link_keys(link, f"DeviceProfile {d.get('name')!r}: links[{i}]")
        return from_jsonable(cls, d)

    def save(self, path):
        return save_json(self, path)

    @classmethod
    def load(cls, path) -> "DeviceProfile":
        return load_json(cls, path, build=cls.from_dict)  # from_dict names renamed keys

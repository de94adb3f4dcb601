"""The ``Plan``: plain data saying which units (or which parts of a unit) run on which rank.

No module references: unit names, ranks, widths, ratios, and the planner's predictions. It
round-trips through JSON (``plan.json``) so a run can start from a saved plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .._json import from_jsonable, load_json, save_json, to_jsonable


@dataclass
class StagePlan:
    """One stage: a list of unit names run in order on ``rank``.

    For pipeline plans the units of a stage are contiguous and stages are in model order.
    ``width`` is the elastic width ratio (1.0 = full heads / hidden units); ``keep_ratio`` is the
    summarization ratio applied to this stage's output (1.0 = send everything).
    """

    index: int
    rank: int
    device: str
    units: list[str]
    width: float = 1.0
    keep_ratio: float = 1.0


@dataclass
class Shard:
    """Part of one unit on one rank, for horizontal / data / hybrid plans.

    ``axis``: ``channels`` (output channels / neurons / heads of a layer) or ``rows`` (spatial rows
    of the input, with ``halo`` extra rows either side). ``[start, stop)`` indexes that axis.
    """

    unit: str
    rank: int
    axis: str
    start: int
    stop: int
    halo: int = 0


@dataclass
class DevicePrediction:
    """What the planner predicts for one device per request (one input of the plan's batch)."""

    device: str
    rank: int
    energy_j: float = 0.0
    compute_energy_j: float = 0.0
    comm_energy_j: float = 0.0
    latency_s: float = 0.0
    memory_bytes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    flops: int = 0


@dataclass
class Plan:
    model: str
    strategy: str
    devices: list[str]
    stages: list[StagePlan]
    img_size: int = 224
    batch_size: int = 1
    objective: str = "energy"
    shards: list[Shard] = field(default_factory=list)
    predictions: list[DevicePrediction] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def num_ranks(self) -> int:
        ranks = {s.rank for s in self.stages} | {s.rank for s in self.shards}
        return max(ranks) + 1 if ranks else 0

    def stages_of_rank(self, rank: int) -> list[StagePlan]:
        return [s for s in self.stages if s.rank == rank]

    def unit_to_rank(self) -> dict[str, int]:
        return {u: s.rank for s in self.stages for u in s.units}

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return from_jsonable(cls, d)

    def save(self, path):
        return save_json(self, path)

    @classmethod
    def load(cls, path) -> "Plan":
        return load_json(cls, path)

"""``RunConfig``: the typed, strictly validated recipe of a distributed run (``configs/*.yaml``).

An unknown key or a bad value is a ``ValueError`` naming the key and what is allowed. Every run
writes its resolved config next to its report (``config.json``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .._json import to_jsonable
from .._validate import check_fields, check_float, check_int
from ..data.config import DataConfig, parse_data_config

__all__ = ["FaultSpec", "RunConfig", "load_run_config", "MODES", "BACKENDS", "FAULT_KINDS",
           "SYNTHETIC_REQUESTS"]

MODES = ("auto", "pipeline", "tensor", "ensemble")
BACKENDS = ("auto", "gloo", "nccl")
FAULT_KINDS = ("kill", "drain")
SYNTHETIC_REQUESTS = 16  # requests of a synthetic run that does not say


@dataclass
class FaultSpec:
    """An injected fault: ``kill`` SIGKILLs ``rank`` when it receives request ``at_request``;
    ``drain`` empties that rank's battery to just below its E_min at that request."""

    kind: str
    rank: int
    at_request: int = 0

    def validate(self, where: str = "faults") -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"{where}.kind: {self.kind!r} is not allowed; allowed: {list(FAULT_KINDS)}")
        check_int(f"{where}.rank", self.rank, 0)
        check_int(f"{where}.at_request", self.at_request, 0)


@dataclass
class RunConfig:
    """What to run, on how many ranks, and how to survive failures.

    ``model``/``model_kwargs``: a supported timm model (``lapdtr.list_supported_models()``).
    ``cuts``: explicit cut points (unit indices or names), stage ``i`` on rank ``i``; otherwise
    ``plan`` (a ``plan.json``) or, with neither, the planner ``strategy`` on ``devices``.
    ``data``: where the inputs come from (``lapdtr.data.DataConfig``: ``synthetic``, the
    default, ``image_folder`` or ``digits``; a kind name or a mapping of its keys). Request ``r``
    is batch ``r`` of ``batch_size`` inputs (the last may be short), each split into
    ``micro_batches``; ``requests`` caps them (default: every input of the data, or 16 synthetic
    requests). ``predictions``: write the top-k classes of every input to
    ``out/predictions.jsonl``; inputs with labels also put top-1/top-5 accuracy in the report,
    beside the same checkpoint's accuracy run whole in one process (``data.reference``).
    ``elastic``: run the attention heads and MLP widths of every rank's stages at a width its
    energy allows (``lapdtr.elastic.WidthPolicy`` keys: ``kind`` linear / threshold / plan,
    ``min_ratio``, ``steps``, ``hysteresis``, ``min_dwell_s``, ``plan_ratio``); families in
    ``lapdtr.elastic.FAMILIES``, pipeline mode.
    ``summarize``: summarized stage boundaries (``lapdtr.runtime.summary.SummarizeConfig``
    keys: ``keep``, a keep ratio for every cut or a mapping from a cut (the unit its stage
    starts with) to its ratio; ``wire``, fp32 / fp16 / bf16 / int8 for every boundary); a plan's own
    ``keep_ratio`` s need only ``wire``. Pipeline mode.
    ``resume``: keep a journal of answered requests in ``out/journal``; a restarted run
    (``torchrun --max-restarts``) computes only the requests it lacks (``None``: on when torchrun
    may restart the workers, ``TORCHELASTIC_MAX_RESTARTS`` > 0).
    ``pin_cpus`` (gloo ranks): pin each rank to its own CPUs (``lapdtr.runtime.placement``).
    ``tune_malloc``: each rank keeps freed memory for reuse instead of faulting it in again
    (glibc; ``lapdtr.runtime.placement.tune_malloc``).
    ``mode``: ``auto`` (the default: the mode that runs ``plan`` as it was made, pipeline
    without a plan file; ``lapdtr.runtime.plan_modes``), ``pipeline``, ``tensor`` (a channel
    split, a plan's channel shares as its proportions) or ``ensemble``.
    ``max_inflight``: items in flight;
    ``None`` keeps 2 per stage plus 2 per micro-batch, or one per stage plus 2 when the host's
    ranks share cores.
    """

    model: str = "deit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    img_size: int | None = None
    mode: str = "auto"
    world_size: int = 2
    backend: str = "auto"
    devices: str | None = None
    plan: str | None = None
    cuts: list | None = None
    strategy: str = "lapdtr"
    objective: str = "energy"
    checkpoint: str | None = None
    seed: int = 0
    requests: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    predictions: bool = True
    resume: bool | None = None
    batch_size: int = 1
    micro_batches: int = 1
    max_inflight: int | None = None
    out: str = "runs/run"
    save_outputs: bool = False
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 3.0
    join_timeout_s: float = 60.0
    cache_budget_bytes: int = 256 * 2**20
    spill_dir: str | None = None
    faults: list[FaultSpec] = field(default_factory=list)
    elastic: dict | None = None
    summarize: dict | None = None
    proportions: list | None = None
    aggregator: str = "mean"
    ensemble_models: list | None = None
    threads_per_rank: int | None = None
    pin_cpus: bool = False
    tune_malloc: bool = True
    progress: bool = False
    plots: bool = True

    def validate(self) -> "RunConfig":
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: expected a model name, got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs: expected a mapping, got {self.model_kwargs!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not allowed; allowed: {list(MODES)}")
        self._settle_mode()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not allowed; allowed: {list(BACKENDS)}")
        check_int("world_size", self.world_size, 1)
        if self.img_size is not None:
            check_int("img_size", self.img_size, 1)
        check_int("seed", self.seed, 0)
        if self.requests is not None:
            check_int("requests", self.requests, 1)
        self.data = parse_data_config(self.data, "data")
        if self.mode != "pipeline" and self.data.kind != "synthetic":
            raise ValueError(f"data: kind {self.data.kind!r} runs in mode 'pipeline'; mode "
                             f"{self.mode!r} runs synthetic inputs (allowed: data 'synthetic')")
        check_int("batch_size", self.batch_size, 1)
        check_int("micro_batches", self.micro_batches, 1)
        if self.micro_batches > self.batch_size:
            raise ValueError(f"micro_batches: {self.micro_batches} is more than batch_size "
                             f"{self.batch_size}; allowed: 1..{self.batch_size}")
        if self.threads_per_rank is not None:
            check_int("threads_per_rank", self.threads_per_rank, 1)
        if self.max_inflight is not None:
            check_int("max_inflight", self.max_inflight, 1)
        for key in ("pin_cpus", "tune_malloc"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        check_float("heartbeat_interval_s", self.heartbeat_interval_s, 1e-3)
        check_float("heartbeat_timeout_s", self.heartbeat_timeout_s, 1e-3)
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s: {self.heartbeat_timeout_s} must exceed "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s})")
        check_float("join_timeout_s", self.join_timeout_s, 1e-3)
        check_int("cache_budget_bytes", self.cache_budget_bytes, 0)
        if self.cuts is not None:
            if not isinstance(self.cuts, list) or not all(
                    isinstance(c, (int, str)) and not isinstance(c, bool) for c in self.cuts):
                raise ValueError(f"cuts: expected a list of unit indices or names, got {self.cuts!r}")
            if len(self.cuts) + 1 > self.world_size:
                raise ValueError(f"cuts: {len(self.cuts)} cuts make {len(self.cuts) + 1} stages, "
                                 f"more than world_size={self.world_size} ranks")
        if self.cuts is not None and self.plan is not None:
            raise ValueError("cuts and plan: give one of them, not both")
        for i, f in enumerate(self.faults):
            f.validate(f"faults[{i}]")
            if f.rank >= self.world_size:
                raise ValueError(f"faults[{i}].rank: {f.rank} is not a launched rank; allowed: "
                                 f"0..{self.world_size - 1}")
            if f.rank == 0 and f.kind == "kill":
                raise ValueError(f"faults[{i}].rank: rank 0 is the coordinator and cannot be "
                                 f"killed; allowed: 1..{self.world_size - 1}")
        if self.proportions is not None:
            if len(self.proportions) != self.world_size or not all(
                    isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0
                    for p in self.proportions):
                raise ValueError(f"proportions: expected {self.world_size} positive numbers (one "
                                 f"per rank), got {self.proportions!r}")
        if self.ensemble_models is not None and (
                not self.ensemble_models or not all(isinstance(m, str) for m in self.ensemble_models)
                or len(self.ensemble_models) not in (1, self.world_size)):
            raise ValueError(f"ensemble_models: expected 1 or {self.world_size} model names, got "
                             f"{self.ensemble_models!r}")
        if self.mode != "pipeline" and self.faults:
            raise ValueError(f"faults: only pipeline mode survives faults; mode {self.mode!r} is "
                             "built on collectives (allowed: faults with mode 'pipeline')")
        for key in ("progress", "plots", "save_outputs", "predictions"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        if self.elastic is not None:
            self.width_policy()  # checks keys and values
            from ..elastic import FAMILIES
            from ..models.base import get_adapter_for_name

            family = get_adapter_for_name(self.model).name
            if family not in FAMILIES:
                raise ValueError(f"elastic: model {self.model!r} is of family {family!r}, which "
                                 f"has no elastic layers; allowed: {sorted(FAMILIES)}")
            if self.mode != "pipeline":
                raise ValueError(f"elastic: runs in mode 'pipeline' (got {self.mode!r})")
        if self.summarize is not None:
            from .summary import SummarizeConfig

            self.summarize = SummarizeConfig.parse(self.summarize)
            if self.mode != "pipeline":
                raise ValueError(f"summarize: runs in mode 'pipeline' (got {self.mode!r})")
        if self.resume is not None and not isinstance(self.resume, bool):
            raise ValueError(f"resume: expected true, false or null, got {self.resume!r}")
        return self

    def _settle_mode(self) -> None:
        """``auto``: the mode that runs the plan file as made (``plan_modes.mode_for_plan``;
        ``pipeline`` without a plan file); an explicit mode is checked against the plan
        (``plan_modes.check_plan_mode``)."""
        plan = None
        if self.plan is not None and Path(self.plan).is_file():
            from ..plan.types import Plan

            plan = Plan.load(self.plan)
        if self.mode == "auto":
            from .plan_modes import mode_for_plan

            self.mode = mode_for_plan(plan, f"plan {self.plan}") if plan is not None \
                else "pipeline"
        elif plan is not None:
            from .plan_modes import check_plan_mode

            check_plan_mode(plan, self.mode, f"plan {self.plan}")

    def width_policy(self):
        """``elastic`` as a validated ``lapdtr.elastic.WidthPolicy`` (``None`` without it)."""
        if self.elastic is None:
            return None
        from ..elastic import WidthPolicy

        if not isinstance(self.elastic, dict):
            raise ValueError(f"elastic: expected a mapping of WidthPolicy keys, got "
                             f"{self.elastic!r}")
        check_fields(WidthPolicy, self.elastic, "elastic")
        return WidthPolicy(**self.elastic).validate()

    @property
    def num_requests(self) -> int:
        """The requests of a synthetic run: ``requests``, or ``SYNTHETIC_REQUESTS``."""
        return self.requests if self.requests is not None else SYNTHETIC_REQUESTS

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> "RunConfig":
        check_fields(cls, d, where)
        hints = typing.get_type_hints(cls)
        kw = {}
        for k, v in d.items():
            if k == "faults":
                if not isinstance(v, list):
                    raise ValueError(f"faults: expected a list, got {v!r}")
                fl = []
                fnames = [f.name for f in dataclasses.fields(FaultSpec)]
                for i, fd in enumerate(v):
                    if not isinstance(fd, dict) or sorted(set(fd) - set(fnames)):
                        raise ValueError(f"faults[{i}]: unknown key(s) "
                                         f"{sorted(set(fd) - set(fnames)) if isinstance(fd, dict) else fd!r}; "
                                         f"allowed: {fnames}")
                    if "kind" not in fd or "rank" not in fd:
                        raise ValueError(f"faults[{i}]: 'kind' and 'rank' are required")
                    fl.append(FaultSpec(**fd))
                kw[k] = fl
            elif k == "data":
                kw[k] = parse_data_config(v, "data")
            else:
                kw[k] = _coerce(k, hints[k], v)
        return cls(**kw).validate()


def _coerce(key, tp, v):
    if v is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ValueError(f"{key}: must not be null")
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    origin = typing.get_origin(base) or base
    if origin is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if origin in (int, float, str, bool, list, dict) and not isinstance(v, origin):
        raise ValueError(f"{key}: expected {origin.__name__}, got {v!r}")
    if origin is int and isinstance(v, bool):
        raise ValueError(f"{key}: expected int, got {v!r}")
    return v




def load_run_config(path: str | Path, **overrides) -> RunConfig:
    """Read a run config YAML (``configs/*.yaml``); ``overrides`` replace keys (same validation)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(data, where=str(path))

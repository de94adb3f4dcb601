"""Set-up of a run and plan resolution: the checkpoint, the devices, and the plan every rank
follows, from a plan file, explicit cuts or the planner.

The coordinator calls :func:`prepare` once and publishes the result (the ``setup`` dict) on the
store; every rank builds its worker from it.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from ..plan.types import Plan, StagePlan
from ..profile.devices import default_rank_devices
from ..profile.types import DeviceProfile
from .config import RunConfig
from .stages import build_host, check_checkpoint, default_checkpoint_path, write_checkpoint

__all__ = ["request_input", "default_devices", "build_plan_from_cuts", "check_plan",
           "stage_settings", "prepare", "profile_for", "resolve_plan", "plan_has_widths",
           "plan_widths_allowed"]


def request_input(seed: int, request: int, batch_size: int, img_size: int,
                  in_chans: int = 3) -> torch.Tensor:
    """The deterministic synthetic input of ``request`` (what every run of that seed sees)."""
    from ..data import synthetic_request

    return synthetic_request(seed, request, batch_size, img_size, in_chans)


def default_devices(world_size: int) -> list[DeviceProfile]:
    """Identical CPU ranks with a link between every pair (``default_rank_devices``)."""
    return default_rank_devices(world_size)


def build_plan_from_cuts(model_name: str, unit_names: list[str], cuts, devices: list[DeviceProfile],
                         *, img_size: int, batch_size: int) -> Plan:
    """A pipeline plan that puts stage ``i`` (between consecutive ``cuts``) on rank ``i``."""
    from ..models.base import Unit, resolve_cuts

    fake = [Unit(i, n, "block", (n,), None) for i, n in enumerate(unit_names)]
    idx = resolve_cuts(fake, cuts)
    bounds = [0, *idx, len(unit_names)]
    if len(bounds) - 1 > len(devices):
        raise ValueError(f"cuts make {len(bounds) - 1} stages but only {len(devices)} devices")
    stages = [StagePlan(index=i, rank=i, device=devices[i].name, units=unit_names[a:b])
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return Plan(model=model_name, strategy="cuts", devices=[d.name for d in devices],
                stages=stages, img_size=img_size, batch_size=batch_size, objective="none",
                meta={"cuts": idx})


def check_plan(plan: Plan, unit_names: list[str], world_size: int, where: str = "plan", *,
               widths=(1.0,)) -> None:
    """A pipeline plan must cover the model's units in order, on launched ranks, at widths the
    model runs (``widths``: its allowed ratios, ``plan_widths_allowed``), with keep ratios in
    (0, 1] (which boundaries may summarize: ``summary.check_keep_ratios``)."""
    if not plan.stages:
        raise ValueError(f"{where}: has no stages")
    ranks = sorted({s.rank for s in plan.stages})
    extra = [r for r in ranks if r >= world_size or r < 0]
    if extra:
        raise ValueError(f"{where}: needs ranks {ranks} but only {world_size} rank(s) were "
                         f"launched (ranks 0..{world_size - 1}); rank(s) {extra} do not exist")
    flat = [u for s in sorted(plan.stages, key=lambda s: s.index) for u in s.units]
    if flat != list(unit_names):
        unknown = [u for u in flat if u not in unit_names]
        raise ValueError(f"{where}: its stages do not list the units of {plan.model!r} once each, in "
                         f"order" + (f"; unknown unit(s) {unknown}" if unknown else "")
                         + f"; units are: {', '.join(unit_names)}")
    allowed = [round(float(w), 6) for w in widths]
    for s in plan.stages:
        if not any(abs(s.width - w) <= 1e-6 for w in allowed):
            why = ("" if len(allowed) > 1 else
                   f" ({plan.model!r} has no elastic layers: lapdtr.elastic.FAMILIES)")
            raise ValueError(f"{where}: stage {s.index} asks width={s.width}; {plan.model!r} "
                             f"runs widths {allowed}{why}")
        if isinstance(s.keep_ratio, bool) or not isinstance(s.keep_ratio, (int, float)) \
                or not 0.0 < s.keep_ratio <= 1.0:
            raise ValueError(f"{where}: stage {s.index} asks keep_ratio={s.keep_ratio!r}; "
                             "allowed: a number in (0, 1] (1.0: every token)")


def plan_has_widths(plan: Plan) -> bool:
    return any(s.width != 1.0 for s in plan.stages)


def plan_widths_allowed(model_name: str, model_kwargs: dict) -> list[float]:
    """The width ratios a plan may give ``model_name``'s stages (``allowed_widths``)."""
    from ..elastic.policy import allowed_widths
    from ..models.base import create_model

    return allowed_widths(create_model(model_name, **model_kwargs))


def stage_settings(stage: StagePlan, remaining_j: float | None) -> tuple[float, float]:
    """Algorithm 3's per-request hook: the (width, keep_ratio) a stage runs at for its energy.

    The plan fixes both (validated by :func:`check_plan`); the worker's ``settings`` step hands
    them to the ``run`` step. With ``elastic`` in the run's config (or widths in its plan) the
    width controller's ``EnergyWidths`` replaces this function.
    """
    return stage.width, stage.keep_ratio


_PROFILES: dict = {}


def profile_for(model_name: str, model_kwargs: dict, img_size: int, batch_size: int, *,
                widths=None):
    """The model's profile (cached per process: a re-plan needs it again); ``widths``: also
    at those elastic widths (``profile_model``'s)."""
    key = (model_name, json.dumps(model_kwargs, sort_keys=True), img_size, batch_size,
           json.dumps(widths))
    if key not in _PROFILES:
        from ..models.base import create_model
        from ..profile import profile_model

        model = create_model(model_name, **model_kwargs)
        _PROFILES[key] = profile_model(model, img_size=img_size, batch_size=batch_size,
                                       widths=widths)
    return _PROFILES[key]


def resolve_plan(cfg: RunConfig, names: list[str], devices: list[DeviceProfile], world_size: int,
                 img_size: int, profile_fn=None) -> tuple[Plan, list[DeviceProfile]]:
    """The plan of a pipeline run (``plan`` file, ``cuts`` or the planner), checked against the
    model's units and the ranks launched. Idle ranks are named in a warning and in
    ``plan.meta["idle_ranks"]``."""
    from ..plan import IdleRanksWarning, idle_ranks

    if cfg.plan is not None:
        from .plan_modes import check_plan_mode, check_shards

        plan = Plan.load(cfg.plan)
        where = f"plan {cfg.plan}"
        check_shards(plan, names, where)
        check_plan_mode(plan, "pipeline", where)
        if cfg.devices is None:
            devices = default_rank_devices(len(plan.devices), names=list(plan.devices))
        elif [d.name for d in devices] != list(plan.devices):
            raise ValueError(f"{where}: is for devices {list(plan.devices)}, but {cfg.devices} "
                             f"lists {[d.name for d in devices]} (same names, in rank order)")
    elif cfg.cuts is not None:
        plan = build_plan_from_cuts(cfg.model, names, cfg.cuts, devices, img_size=img_size,
                                    batch_size=max(1, cfg.batch_size // cfg.micro_batches))
        where = "plan from cuts"
        policy = cfg.width_policy()
        if policy is not None and policy.kind == "plan":  # no planner: the config's width
            from ..elastic import count_for
            from ..plan.widths import stamp_widths

            h = len(plan_widths_allowed(cfg.model, cfg.model_kwargs))  # k/h for k = 1..h
            stamp_widths(plan, count_for(policy.plan_ratio, h) / h)
    else:
        from ..plan import create_plan

        policy = cfg.width_policy()
        by_plan = policy is not None and policy.kind == "plan"
        prof = (profile_fn(widths="all") if by_plan else profile_fn()) if profile_fn else \
            profile_for(cfg.model, cfg.model_kwargs, img_size,
                        max(1, cfg.batch_size // cfg.micro_batches),
                        widths="all" if by_plan else None)
        if by_plan:  # the planner chooses the width (Algorithm 1 over the profiled widths)
            from ..plan import plan_widths

            plan = plan_widths(prof, devices[:world_size], strategy=cfg.strategy,
                               objective=cfg.objective)
        else:
            plan = create_plan(prof, devices[:world_size], strategy=cfg.strategy,
                               objective=cfg.objective)
        where = f"plan from strategy {cfg.strategy!r}"
    if plan.model != cfg.model:
        raise ValueError(f"{where}: is for model {plan.model!r}, the config runs {cfg.model!r}")
    check_plan(plan, names, world_size, where,
               widths=plan_widths_allowed(cfg.model, cfg.model_kwargs)
               if plan_has_widths(plan) else (1.0,))
    idle = idle_ranks(plan, world_size)
    if idle and "idle_ranks" not in plan.meta:  # the planner warns about its own plans
        warnings.warn(IdleRanksWarning(f"{where}: leaves launched rank(s) {idle} without units",
                                       ranks=idle), stacklevel=2)
    plan.meta["idle_ranks"] = idle
    return plan, devices


def load_run_devices(cfg: RunConfig, world_size: int) -> list[DeviceProfile]:
    if cfg.devices is not None:
        from ..profile.devices import load_devices

        return load_devices(cfg.devices)
    return default_devices(world_size)


def prepare(cfg: RunConfig, world_size: int) -> dict:
    """Coordinator set-up: checkpoint, devices, plan. Returns the setup dict all ranks read."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    host, ul = build_host(cfg.model, cfg.model_kwargs, cfg.img_size)
    from ..models.base import default_img_size

    img_size = cfg.img_size or default_img_size(host)
    if cfg.checkpoint is None:
        ckpt = default_checkpoint_path(out, cfg.model, cfg.seed, cfg.model_kwargs)
        if not ckpt.exists():
            write_checkpoint(ckpt, cfg.model, model_kwargs=cfg.model_kwargs, seed=cfg.seed)
    else:
        ckpt = Path(cfg.checkpoint)
    check_checkpoint(ckpt, host, cfg.model)
    if cfg.devices is not None:
        from ..profile.devices import load_devices

        devices = load_devices(cfg.devices)
    else:
        devices = default_devices(world_size)
    if cfg.mode != "pipeline":
        return _prepare_collective(cfg, world_size, out, ckpt, img_size, devices, ul)
    plan, devices = resolve_plan(cfg, [u.name for u in ul], devices, world_size, img_size)
    from .summary import settle_plan

    settle_plan(cfg, plan, host, ul)
    plan.save(out / "plan.json")
    return {"checkpoint": str(ckpt), "img_size": img_size, "plan": plan.to_dict(),
            "devices": [d.to_dict() for d in devices], "t0": time.time()}


def _prepare_collective(cfg, world_size, out, ckpt, img_size, devices, ul):
    if len(devices) < world_size:
        raise ValueError(f"devices: {len(devices)} device(s) for {world_size} ranks; mode "
                         f"{cfg.mode!r} runs one device per rank")
    ckpts = [str(ckpt)] * world_size
    proportions = list(cfg.proportions) if cfg.proportions is not None else None
    if cfg.plan is not None:
        proportions = _plan_proportions(cfg, world_size, devices, proportions, ul)
    if cfg.mode == "ensemble":
        from .collective import ensemble_model_names
        from .ensemble import list_aggregators

        if cfg.aggregator not in list_aggregators():
            raise ValueError(f"aggregator: {cfg.aggregator!r} is not allowed; allowed: "
                             f"{list_aggregators()}")
        ckpts = []
        for r, name in enumerate(ensemble_model_names(cfg, world_size)):
            path = default_checkpoint_path(out, name, cfg.seed + r, cfg.model_kwargs)
            if not path.exists():
                write_checkpoint(path, name, model_kwargs=cfg.model_kwargs, seed=cfg.seed + r)
            ckpts.append(str(path))
    return {"checkpoint": str(ckpt), "checkpoints": ckpts, "img_size": img_size, "plan": None,
            "proportions": proportions,
            "devices": [d.to_dict() for d in devices[:world_size]], "t0": time.time()}


def _plan_proportions(cfg, world_size, devices, given, ul):
    """A tensor run's split proportions from its plan file: the plan's per-rank channel shares
    (``proportions_from_plan``), unless the config gives ``proportions`` itself."""
    from .plan_modes import check_plan_mode, check_shards
    from .tensor import proportions_from_plan

    plan = Plan.load(cfg.plan)
    where = f"plan {cfg.plan}"
    if plan.model != cfg.model:
        raise ValueError(f"{where}: is for model {plan.model!r}, the config runs {cfg.model!r}")
    check_shards(plan, [u.name for u in ul], where)
    check_plan_mode(plan, cfg.mode, where)
    if [d.name for d in devices[:len(plan.devices)]] != list(plan.devices) and \
            cfg.devices is not None:
        raise ValueError(f"{where}: is for devices {list(plan.devices)}, but {cfg.devices} "
                         f"lists {[d.name for d in devices]} (same names, in rank order)")
    if given is not None:
        return given
    props = proportions_from_plan(plan)
    if len(props) != world_size:
        raise ValueError(f"{where}: splits channels over {len(props)} rank(s), but "
                         f"{world_size} were launched; launch {len(props)}")
    return props

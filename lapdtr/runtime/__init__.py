"""Runtime: a plan's stages on ``torch.distributed`` ranks.

``run(cfg)`` spawns local ranks; ``infer/run.py`` is the torchrun entry; ``run_rank`` is what each
rank runs. Modes: ``pipeline`` (stages, boundary tensors by point-to-point, a control plane on the
rendezvous store, cached boundaries, re-planning when a rank dies or runs low on energy),
``tensor`` (``run_tensor``: layers split unevenly across ranks) and ``ensemble``
(``run_ensemble``: a sub-model per rank, outputs aggregated).
"""
from .config import FaultSpec, RunConfig, load_run_config
from .ensemble import aggregate, list_aggregators, register_aggregator, run_ensemble
from .launch import run, run_torchrun, write_outputs
from .control import RendezvousError
from .prepare import build_plan_from_cuts, check_plan, request_input
from .session import PipelineSession, run_rank
from .report import RankReport, ReplanEvent, RunReport, format_report, plot_timeline
from .stages import RankModel, build_host, check_checkpoint, write_checkpoint
from .tensor import apply_tensor_split, run_tensor
from .transport import BoundaryCache, Transport

__all__ = ["BoundaryCache", "FaultSpec", "PipelineSession", "RankModel", "RankReport", "RendezvousError",
           "ReplanEvent", "RunConfig", "RunReport", "Transport", "aggregate",
           "apply_tensor_split", "build_host", "build_plan_from_cuts", "check_checkpoint",
           "check_plan", "format_report", "list_aggregators", "load_run_config", "plot_timeline",
           "register_aggregator", "request_input", "run", "run_ensemble", "run_rank",
           "run_tensor", "run_torchrun", "write_checkpoint", "write_outputs"]

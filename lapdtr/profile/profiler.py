"""Per-unit model profiles: FLOPs (``torch.utils.flop_counter``), parameter and activation bytes,
peak memory, measured latency; cached on disk keyed by model, input size, dtype, batch and device.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.flop_counter import sdpa_flop_count as flop_counter_sdpa

from ..models import create_model, default_img_size, get_adapter, unit_owned_names, units
from .types import ModelProfile, UnitProfile, width_key

__all__ = ["profile_model", "default_cache_dir", "profile_cache_path", "versions"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def versions() -> dict:
    import timm

    from .. import __version__

    return {"torch": torch.__version__, "timm": timm.__version__, "lapdtr": __version__}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAPDTR_CACHE", Path.home() / ".cache" / "lapdtr")) / "profiles"


class _PeakLiveBytes(TorchDispatchMode):
    """Tracks bytes of tensors allocated by ops while active, freed when the tensor is collected;
    ``peak`` is the largest live total seen. Views of an already-counted storage are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        n = self._ptrs.pop(ptr, 0)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in self._ptrs:
                continue
            self._ptrs[ptr] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(x) if isinstance(t, torch.Tensor))


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _fingerprint(model: nn.Module) -> str:
    """Structure of the model (module tree and parameter shapes), so kwargs like depth count."""
    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    return h.hexdigest()[:12]


def profile_cache_path(model: nn.Module, *, img_size: int, batch_size: int, dtype: torch.dtype,
                       device: torch.device, cache_dir: str | os.PathLike | None = None,
                       widths=(1.0,)) -> Path:
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dev = str(device)
    if device.type == "cuda":
        dev += "-" + torch.cuda.get_device_name(device).replace(" ", "_")
    dt = str(dtype).replace("torch.", "")
    w = "" if list(widths) == [1.0] else "-w" + "_".join(width_key(r) for r in widths)
    return d / (f"{_model_name(model)}-{_fingerprint(model)}-{img_size}px-b{batch_size}-{dt}-"
                f"{dev}{w}.json")


def _check_widths(model: nn.Module, widths) -> list[float]:
    """The width ratios to profile, sorted, full width first: ``widths`` given as ratios in
    (0, 1] or ``"all"`` (every ratio the model's elastic layers realise, ``k/h`` of the
    attention with the fewest heads). A model without elastic layers allows 1.0 only."""
    if widths is None:
        return [1.0]
    from ..elastic import ElasticError, check_ratio
    from ..elastic.api import FAMILIES

    family = get_adapter(model).name
    if family not in FAMILIES:
        if widths == "all" or [float(w) for w in widths] == [1.0]:
            return [1.0]
        raise ElasticError(f"profile widths {widths!r}: {family!r} has no elastic layers; "
                           f"allowed: [1.0] (elastic families: {sorted(FAMILIES)})")
    if widths == "all":
        from ..elastic.policy import allowed_ratios

        probe = _elastic_copy(model)
        widths = allowed_ratios(probe) or [1.0]
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise ElasticError(f"profile widths {widths!r}: allowed: a list of ratios in (0, 1] "
                           f"or 'all'")
    out = sorted({round(check_ratio(w, "profile width"), 6) for w in widths} | {1.0},
                 reverse=True)
    return out


def _elastic_copy(model: nn.Module) -> nn.Module:
    import copy

    from ..elastic import make_elastic

    return make_elastic(copy.deepcopy(model))


def _time_fn(fn, x, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)



def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter_sdpa(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the fused SDPA kernel torch picks on CPU
    (``_scaled_dot_product_flash_attention_for_cpu``), which torch's own table leaves out in some
    releases (2.14): timm's ViTs would lose their attention matmuls from the count."""
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op.default not in _flop_registry():
        mapping[op] = _cpu_flash_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _flop_registry() -> dict:
    from torch.utils import flop_counter as fcm

    return fcm.flop_registry

def profile_model(model_or_name: nn.Module | str, *, img_size: int | None = None,
                  batch_size: int = 1, dtype: torch.dtype | str = torch.float32,
                  device: str | torch.device = "cpu", repeats: int = 5, warmup: int = 2,
                  cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                  progress: bool = False, widths=None) -> ModelProfile:
    """Profile every unit of a model (an instance or a supported timm name).

    FLOPs, bytes and peak memory are counted for one batch of ``batch_size``; latency is the median
    of ``repeats`` timed runs after ``warmup`` runs on ``device``. With ``use_cache`` the result is
    read from / written to ``cache_dir`` (default ``$LAPDTR_CACHE/profiles`` or
    ``~/.cache/lapdtr/profiles``); a cache written by other torch / timm / lapdtr versions is
    recomputed.

    ``widths`` (ratios in (0, 1], or ``"all"``): also measure every unit's FLOPs and latency at
    those elastic widths, on a copy of the model made elastic (``lapdtr.elastic``; the model
    passed in is not changed), into ``UnitProfile.at_width``; ``ModelProfile.at_width(r)`` is
    then the profile at width ``r``.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)
    if isinstance(model_or_name, str):
        model = create_model(model_or_name, img_size=img_size)
    else:
        model = model_or_name
    adapter = get_adapter(model)
    model = model.to(device=device, dtype=dtype).eval()
    img_size = default_img_size(model) if img_size is None else int(img_size)
    ul = units(model, img_size)  # validates the image size
    widths = _check_widths(model, widths)

    cache = None
    if use_cache:
        cache = profile_cache_path(model, img_size=img_size, batch_size=batch_size, dtype=dtype,
                                   device=device, cache_dir=cache_dir, widths=widths)
        if cache.is_file():
            try:
                prof = ModelProfile.load(cache)
                if prof.versions == versions():
                    return prof
            except ValueError:
                pass  # unreadable or from another schema: recompute

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *ul[0].in_shape[1:], generator=gen).to(device=device, dtype=dtype)
    sd = model.state_dict()
    param_names = {n for n, _ in model.named_parameters()}
    out: list[UnitProfile] = []
    iterator = ul
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ul, desc=f"profile {_model_name(model)}", unit="unit")
    with torch.no_grad():
        with flop_counter() as fc:
            model(x)
        model_flops = int(fc.get_total_flops())
        h = x
        for u in iterator:
            fn = lambda t, u=u: u.fn(model, t)  # noqa: E731
            with flop_counter() as fc:
                y = fn(h)
            flops = int(fc.get_total_flops())
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn(h)
                _sync(device)
                peak = torch.cuda.max_memory_allocated(device) - base + _nbytes(h)
            else:
                tracker = _PeakLiveBytes()
                with tracker:
                    y2 = fn(h)
                del y2
                peak = tracker.peak + _nbytes(h)
            latency = _time_fn(fn, h, device, warmup, repeats)
            owned = unit_owned_names(model, u.modules)
            out.append(UnitProfile(
                index=u.index, name=u.name, kind=u.kind, modules=list(u.modules),
                in_format=u.in_format, out_format=u.out_format, in_shape=list(h.shape),
                out_shape=list(y.shape), flops=flops,
                num_params=int(sum(sd[k].numel() for k in owned if k in param_names)),
                param_bytes=int(sum(sd[k].numel() * sd[k].element_size() for k in owned)),
                in_bytes=_nbytes(h), out_bytes=_nbytes(y), peak_bytes=int(peak),
                latency_s=latency, latency_repeats=repeats))
            h = y
    width_model_flops = _profile_widths(model, img_size, x, out, widths, device, warmup, repeats)
    prof = ModelProfile(
        model=_model_name(model), family=adapter.name, img_size=img_size, batch_size=batch_size,
        dtype=str(dtype).replace("torch.", ""), device=str(device), units=out,
        total_flops=sum(u.flops for u in out), model_flops=model_flops,
        total_latency_s=sum(u.latency_s for u in out), versions=versions(), widths=widths,
        width_model_flops=width_model_flops)
    if cache is not None:
        prof.save(cache)
    return prof


@torch.no_grad()
def _profile_widths(model, img_size, x, out, widths, device, warmup, repeats) -> dict:
    """Measure every unit's FLOPs and latency at each reduced width in ``widths`` (on an
    elastic copy of ``model``) into ``out[i].at_width``; returns the whole model's FLOPs per
    width, counted in one ``FlopCounterMode``."""
    reduced = [w for w in widths if w < 1.0]
    if not reduced:
        return {}
    from ..elastic import set_width

    emodel = _elastic_copy(model)
    eunits = units(emodel, img_size)
    whole = {}
    for w in reduced:
        set_width(emodel, w)
        key = width_key(w)
        with flop_counter() as fc:
            emodel(x)
        whole[key] = int(fc.get_total_flops())
        h = x
        for u, prof in zip(eunits, out):
            fn = lambda t, u=u: u.fn(emodel, t)  # noqa: E731
            with flop_counter() as fc:
                y = fn(h)
            prof.at_width[key] = {"flops": int(fc.get_total_flops()),
                                  "latency_s": _time_fn(fn, h, device, warmup, repeats)}
            h = y
    return whole

"""Units: a model as an ordered list of sub-modules, and exact partitions of it into stages.

A family adapter (one per model family, registered with :func:`register_adapter`) lists the units
of a model instance. Each unit names the host-model modules and parameters it owns and a small
function that runs them on the host's own submodules and methods (``patch_embed``, ``blocks[i]``,
``forward_head`` ...), so no forward body of the host is copied. Running the units in order equals
``model(x)`` exactly; that is the invariant the tests hold every adapter to.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "Unit", "Adapter", "Stage", "register_adapter", "list_adapters", "get_adapter",
    "get_adapter_for_name", "list_supported_models", "units", "partition", "resolve_cuts",
    "create_model", "default_img_size", "unit_owned_names",
]

UNIT_KINDS = ("embed", "block", "stage", "head")
FORMATS = ("image", "tokens", "map", "map_nhwc", "logits")


@dataclass
class Unit:
    """One unit of a model.

    ``modules`` are the dotted names (in the host model) of the modules and parameters this unit
    owns; ``fn(host, x)`` runs the unit. ``in_format``/``out_format`` say what passes between units:
    ``image`` (B,3,H,W), ``tokens`` (B,N,C), ``map`` (B,C,H,W), ``map_nhwc`` (B,H,W,C) or
    ``logits`` (B,K). ``out_shape`` is measured for batch 1 at the image size given to
    :func:`units`. ``attention``: the dotted name of the module whose attention ranks the unit's
    output tokens (``lapdtr.summarize.attention_source``, ``probe_for``), ``None`` for a unit
    without one.
    """

    index: int
    name: str
    kind: str
    modules: tuple[str, ...]
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(repr=False, compare=False)
    in_format: str = "image"
    out_format: str = "tokens"
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    attention: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, fn=None))
        d.pop("fn")
        d["modules"] = list(self.modules)
        d["in_shape"] = list(self.in_shape)
        d["out_shape"] = list(self.out_shape)
        return d


@dataclass
class UnitSpec:
    """What an adapter returns for one unit, before shapes are measured."""

    name: str
    kind: str
    modules: tuple[str, ...]
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    out_format: str
    attention: str | None = None

    def __post_init__(self):
        assert self.kind in UNIT_KINDS, self.kind
        assert self.out_format in FORMATS, self.out_format
        self.modules = tuple(self.modules)


@dataclass
class Adapter:
    """A model family: which instances it handles, which names it supports, how to list units."""

    name: str
    model_types: tuple[type, ...]
    patterns: tuple[str, ...]
    examples: tuple[str, ...]
    build: Callable[[nn.Module], list[UnitSpec]]
    description: str = ""
    img_size_kwarg: bool = False  # the timm class takes ``img_size=`` at creation

    def matches(self, model: nn.Module) -> bool:
        return type(model) in self.model_types

    def supports_name(self, model_name: str) -> bool:
        """Whether ``model_name`` builds a class this adapter handles (on the meta device)."""
        from .names import model_class_name

        return model_class_name(model_name) in {f"{t.__module__}.{t.__qualname__}"
                                                for t in self.model_types}


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, *, model_types: Sequence[type], patterns: Sequence[str],
                     examples: Sequence[str], description: str = "", img_size_kwarg: bool = False):
    """Decorator: register ``fn(model) -> list[UnitSpec]`` as the adapter of a family.

    ``img_size_kwarg``: the family's timm class takes ``img_size=`` (positional embeddings,
    attention biases sized at creation), so :func:`create_model` passes it on.
    """

    def deco(fn):
        if name in _ADAPTERS:
            raise ValueError(f"adapter {name!r} is registered twice")
        _ADAPTERS[name] = Adapter(name, tuple(model_types), tuple(patterns), tuple(examples), fn,
                                  description or (fn.__doc__ or "").strip().splitlines()[0],
                                  img_size_kwarg)
        return fn

    return deco


def list_adapters() -> list[Adapter]:
    return list(_ADAPTERS.values())


def _supported_text() -> str:
    return "; ".join(f"{a.name} ({', '.join(t.__name__ for t in a.model_types)})"
                     for a in _ADAPTERS.values())


def get_adapter(model: nn.Module) -> Adapter:
    for a in _ADAPTERS.values():
        if a.matches(model):
            return a
    raise ValueError(
        f"unsupported model class {type(model).__name__!r}; supported families (classes): "
        f"{_supported_text()}")


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _adapter_of_class(cls_name: str) -> Adapter | None:
    for a in _ADAPTERS.values():
        if any(_qualname(t) == cls_name for t in a.model_types):
            return a
    return None


def get_adapter_for_name(model_name: str) -> Adapter:
    """The adapter of the class ``model_name`` builds (decided on the meta device:
    :mod:`lapdtr.models.names`); a name no adapter handles is a ``ValueError`` naming the class
    it builds and the families there are."""
    import timm

    from .names import model_class_name

    if not isinstance(model_name, str) or model_name not in timm.list_models():
        import os

        name = str(model_name)
        names = timm.list_models()
        best = max((len(os.path.commonprefix([name, n])) for n in names), default=0)
        close = [n for n in names if best >= 4 and n.startswith(name[:best])][:6]
        raise ValueError(f"unknown model {model_name!r}: timm registers no such name"
                         + (f" (close: {', '.join(close)})" if close else "")
                         + f"; supported families (classes): {_supported_text()}")
    cls_name = model_class_name(model_name)
    adapter = _adapter_of_class(cls_name)
    if adapter is None:
        what = (f"timm cannot build it without weights or arguments ({cls_name[8:]})"
                if cls_name.startswith("!error") else
                f"it builds a {cls_name.rsplit('.', 1)[-1]}, which no lapdtr adapter handles")
        raise ValueError(f"unsupported model {model_name!r}: {what}; supported families "
                         f"(classes): {_supported_text()}")
    return adapter


def _candidates(a: Adapter) -> set[str]:
    """Names an adapter is asked about: those registered in the timm modules that define its
    classes, and those matching its patterns."""
    import timm
    from timm.models import _registry

    mods = {t.__module__.rsplit(".", 1)[-1] for t in a.model_types}
    names = {n for n, mod in _registry._model_to_module.items() if mod in mods}
    names |= {n for p in a.patterns for n in timm.list_models(p)}
    return names & set(timm.list_models())


def list_supported_models(progress: bool = False) -> dict[str, list[str]]:
    """Family -> the timm model names it supports: those whose class (built on the meta device,
    cached on disk) its adapter handles. The first call on a machine builds every candidate
    once (about a minute); later calls read the cache."""
    from .names import model_class_name, save_classes

    cands = sorted(set().union(*(_candidates(a) for a in _ADAPTERS.values())))
    it = cands
    if progress:
        from tqdm import tqdm

        it = tqdm(cands, desc="classes of timm names (meta device, once)", unit="name",
                  leave=False)
    out = {a.name: [] for a in _ADAPTERS.values()}
    for n in it:
        a = _adapter_of_class(model_class_name(n, save=False))
        if a is not None:
            out[a.name].append(n)
    save_classes()
    return out


def create_model(model_name: str, *, pretrained: bool = False, img_size: int | None = None,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` for a supported model, in eval mode; a clear error otherwise.

    ``img_size`` is passed to timm for families whose models are built for one input size
    (ViT, TinyViT, EfficientViT-M); other families take any size at run time.
    """
    import timm

    adapter = get_adapter_for_name(model_name)  # unknown or unsupported: an error naming why
    if img_size is not None and adapter.img_size_kwarg:
        kwargs["img_size"] = int(img_size)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot create {model_name!r} with {kwargs}: {e}") from e
    if not adapter.matches(model):
        raise ValueError(
            f"model {model_name!r} is a {type(model).__name__}, which the {adapter.name} adapter "
            f"does not handle (it handles {', '.join(t.__name__ for t in adapter.model_types)})")
    return model.eval()


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, H, W) the model was built with (timm's ``get_model_input_config`` reads the
    instance's traits, e.g. ``in_chans=1``; ``pretrained_cfg`` keeps the checkpoint's)."""
    try:
        from timm.models import get_model_input_config

        return tuple(int(v) for v in get_model_input_config(model)["input_size"])
    except (ImportError, KeyError, AttributeError, TypeError):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))


def default_img_size(model: nn.Module) -> int:
    return _input_size(model)[-1]


def _in_chans(model: nn.Module) -> int:
    return _input_size(model)[0]


def _get(host: nn.Module, dotted: str):
    obj = host
    for part in dotted.split("."):
        obj = getattr(obj, part) if not part.isdigit() or not isinstance(obj, (nn.Sequential, nn.ModuleList)) else obj[int(part)]
    return obj


def unit_owned_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Fully qualified parameter and buffer names owned by the given module/param names."""
    sd_keys = list(model.state_dict(keep_vars=True).keys())
    out = []
    for n in names:
        out += [k for k in sd_keys if k == n or k.startswith(n + ".")]
    return out


def units(model: nn.Module, img_size: int | None = None, *, batch_size: int = 1) -> list[Unit]:
    """The ordered units of ``model``, with input/output shapes measured at ``img_size``.

    Raises ``ValueError`` for an unsupported model or an image size the model cannot take.
    """
    adapter = get_adapter(model)
    specs = adapter.build(model)
    img_size = default_img_size(model) if img_size is None else int(img_size)
    if img_size <= 0:
        raise ValueError(f"img_size must be a positive integer, got {img_size}")
    x = torch.zeros(batch_size, _in_chans(model), img_size, img_size,
                    dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    out: list[Unit] = []
    fmt = "image"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, s in enumerate(specs):
                in_shape = tuple(x.shape)
                try:
                    x = s.fn(model, x)
                except Exception as e:  # the model rejects this input size
                    raise ValueError(
                        f"{adapter.name} model {type(model).__name__} cannot take image size "
                        f"{img_size}: unit {s.name!r} failed with: {e}") from e
                out.append(Unit(i, s.name, s.kind, s.modules, s.fn, fmt, s.out_format, in_shape,
                                tuple(x.shape), s.attention))
                fmt = s.out_format
    finally:
        model.train(was_training)
    return out


def resolve_cuts(unit_list: Sequence[Unit], cuts: Sequence[int | str]) -> list[int]:
    """Cuts as unit indices: a cut ``c`` starts a new stage at unit ``c`` (1 <= c < len(units)).

    A cut may be given as a unit name (``"blocks.6"``) or a module name owned by a unit.
    """
    n = len(unit_list)
    by_name = {}
    for u in unit_list:
        by_name[u.name] = u.index
        for m in u.modules:
            by_name.setdefault(m, u.index)
    idx = []
    for c in cuts:
        if isinstance(c, str):
            if c not in by_name:
                raise ValueError(f"cut {c!r} is not a unit or module name; units are: "
                                 f"{', '.join(u.name for u in unit_list)}")
            c = by_name[c]
        elif isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"cut {c!r} must be a unit index (int) or a unit name (str)")
        if not 1 <= c < n:
            raise ValueError(f"cut {c} is out of range: a cut must lie in 1..{n - 1} for a model "
                             f"of {n} units")
        idx.append(int(c))
    for a, b in zip(idx, idx[1:]):
        if b <= a:
            raise ValueError(f"cuts must be strictly increasing, got {list(cuts)}")
    return idx


class _Container(nn.Module):
    """An empty module used to rebuild the host's dotted names inside a stage."""


class Stage(nn.Module):
    """Units ``[start, end)`` of a host model, as an ``nn.Module`` sharing the host's parameters.

    The owned modules and parameters are registered under their host names, so the stage's
    ``state_dict`` keys are the timm keys and a timm checkpoint loads into it (``strict=False``
    for the keys of other stages, or :meth:`load_host_state_dict`).
    """

    def __init__(self, host: nn.Module, unit_list: Sequence[Unit], start: int, end: int,
                 index: int = 0):
        super().__init__()
        self._host = [host]  # not registered: only the owned parts belong to the stage
        self._units = list(unit_list[start:end])
        self.index = index
        self.start, self.end = start, end
        for u in self._units:
            for name in u.modules:
                self._attach(host, name)

    def _attach(self, host: nn.Module, dotted: str) -> None:
        parts = dotted.split(".")
        parent_self, parent_host = self, host
        for p in parts[:-1]:
            parent_host = parent_host._modules[p] if p in parent_host._modules else getattr(parent_host, p)
            if p not in parent_self._modules:
                parent_self.add_module(p, _Container())
            parent_self = parent_self._modules[p]
        last = parts[-1]
        if last in parent_host._modules:
            mod = parent_host._modules[last]
            if mod is not None:
                parent_self.add_module(last, mod)
        elif last in parent_host._parameters:
            p = parent_host._parameters[last]
            if p is not None:
                parent_self.register_parameter(last, p)
        elif last in parent_host._buffers:
            b = parent_host._buffers[last]
            if b is not None:
                parent_self.register_buffer(last, b)
        else:
            raise AssertionError(f"{dotted} is not a module, parameter or buffer of the host")

    @property
    def host(self) -> nn.Module:
        return self._host[0]

    @property
    def units(self) -> list[Unit]:
        return list(self._units)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self._units]

    @property
    def in_format(self) -> str:
        return self._units[0].in_format

    @property
    def out_format(self) -> str:
        return self._units[-1].out_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host = self._host[0]
        for u in self._units:
            x = u.fn(host, x)
        return x

    def load_host_state_dict(self, state_dict: dict, strict: bool = True):
        """Load the entries of a full-model (timm) state_dict that belong to this stage."""
        own = self.state_dict()
        sub = {k: v for k, v in state_dict.items() if k in own}
        missing = sorted(set(own) - set(sub))
        if strict and missing:
            raise ValueError(f"checkpoint lacks {len(missing)} keys of stage {self.index}: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return self.load_state_dict(sub, strict=strict)

    def extra_repr(self) -> str:
        return f"index={self.index}, units=[{self.start}, {self.end}): {', '.join(self.unit_names)}"

    def train(self, mode: bool = True):
        # host methods (e.g. ``forward_head``'s functional dropout) read the host's own flag;
        # set it without touching the modules of other stages
        super().train(mode)
        self._host[0].training = mode
        return self


def partition(model: nn.Module, cuts: Sequence[int | str] = (), *, img_size: int | None = None,
              unit_list: Sequence[Unit] | None = None) -> list[Stage]:
    """Split ``model`` at ``cuts`` into stages that share its parameters.

    ``cuts`` are unit indices or names, strictly increasing; ``k`` cuts give ``k + 1`` stages.
    Running the stages in order equals ``model(x)`` exactly.
    """
    ul = list(unit_list) if unit_list is not None else units(model, img_size)
    idx = resolve_cuts(ul, cuts)
    bounds = [0, *idx, len(ul)]
    return [Stage(model, ul, a, b, index=i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]

"""Materialize only a rank's own units: a host model whose parameters live on the meta device,
with the owned units' tensors loaded from a checkpoint on disk (safetensors, or a torch file read
with ``weights_only=True``). Buffers are built for real (they are small and some, like relative
position indices, are not in any checkpoint).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..models.base import Unit, create_model, unit_owned_names, units

__all__ = ["params_on_meta", "build_host", "load_model", "write_checkpoint", "checkpoint_keys",
           "check_checkpoint", "RankModel", "default_checkpoint_path"]


@contextlib.contextmanager
def params_on_meta():
    """Inside this context every registered parameter is moved to the meta device (buffers stay)."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        old(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def build_host(model_name: str, model_kwargs: dict | None = None, img_size: int | None = None):
    """A host model with meta parameters, and its unit list (shapes measured on a meta twin).

    A class whose ``__init__`` computes buffers from its own parameters (timm's
    ``RotaryEmbeddingMixed`` fills its position grid from ``freqs``) cannot be built with meta
    parameters: it is built on the CPU once and its parameters are then freed."""
    try:
        with params_on_meta():
            host = create_model(model_name, **(model_kwargs or {}))
    except NotImplementedError as e:
        if "meta" not in str(e):
            raise
        host = create_model(model_name, **(model_kwargs or {}))
        for name, _ in list(host.named_parameters()):
            _set_tensor(host, name, None)
    host.requires_grad_(False)
    twin = copy.deepcopy(host).to("meta")
    return host, units(twin, img_size)


def default_checkpoint_path(out_dir: str | Path, model_name: str, seed: int,
                            model_kwargs: dict | None = None) -> Path:
    extra = "".join(f"-{k}{v}" for k, v in sorted((model_kwargs or {}).items()))
    return Path(out_dir) / f"{model_name}{extra}-seed{seed}.safetensors"


def write_checkpoint(path: str | Path, model_name: str, *, model_kwargs: dict | None = None,
                     seed: int = 0) -> Path:
    """Write the random-init weights of ``model_name`` (seeded) as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(model_name, **(model_kwargs or {}))
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"model": model_name, "seed": str(seed)})
    tmp.replace(path)
    return path


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a file")
    return path


@contextlib.contextmanager
def _read_errors(path: Path):
    """Turn safetensors' errors on a broken file (garbage bytes, truncated, another format under
    a .safetensors name) into a ``ValueError`` naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a safetensors file, or a damaged one "
                         f"({type(e).__name__}: {e})") from e


def checkpoint_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a checkpoint, without loading the tensors."""
    path = _existing_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with _read_errors(path), safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = _torch_load(path)
    return {k: tuple(v.shape) for k, v in sd.items()}


def _torch_load(path: Path) -> dict:
    import zipfile

    try:  # mmap needs the zip format torch.save writes by default; older files load without it
        sd = torch.load(str(path), map_location="cpu", weights_only=True,
                        mmap=zipfile.is_zipfile(path))
    except Exception as e:  # on garbage bytes the unpickler raises anything (KeyError, EOFError...)
        raise ValueError(f"checkpoint {str(path)!r} is not a safetensors file (its name does not "
                         "end in .safetensors) nor a torch checkpoint that torch.load reads with "
                         f"weights_only=True ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict")
    return sd


def check_checkpoint(path: str | Path, host: nn.Module, model_name: str,
                     keys: Iterable[str] | None = None) -> None:
    """Raise ``ValueError`` naming the checkpoint, the model and the keys that do not match."""
    have = checkpoint_keys(path)
    sd = host.state_dict(keep_vars=True)
    want = list(sd) if keys is None else list(keys)
    missing = [k for k in want if k not in have]
    bad = [f"{k}: checkpoint {list(have[k])} vs model {list(sd[k].shape)}" for k in want
           if k in have and tuple(have[k]) != tuple(sd[k].shape)]
    unexpected = sorted(set(have) - set(sd)) if keys is None else []
    if missing or bad or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append(f"shape mismatch: {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        raise ValueError(f"checkpoint {str(path)!r} does not match model {model_name!r}: "
                         + "; ".join(parts))


def _load_tensors(path: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with _read_errors(path), safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    sd = _torch_load(path)
    return {k: sd[k].clone() for k in keys}


def load_model(model_name: str, checkpoint: str | Path, model_kwargs: dict | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The whole model, in eval mode, with every tensor from ``checkpoint`` (checked against the
    model first: a mismatch is a ``ValueError`` naming the keys)."""
    path = _existing_file(checkpoint)
    model = create_model(model_name, **(model_kwargs or {}))
    check_checkpoint(path, model, model_name)
    model.load_state_dict(_load_tensors(path, list(model.state_dict())), strict=True)
    return model.to(device).eval().requires_grad_(False)


def _set_tensor(host: nn.Module, dotted: str, value: torch.Tensor | None) -> None:
    *parents, last = dotted.split(".")
    mod = host
    for p in parents:
        mod = mod._modules[p] if p in mod._modules else getattr(mod, p)
    if last in mod._parameters:
        old = mod._parameters[last]
        if value is None:
            value = torch.empty_like(old, device="meta")
        mod._parameters[last] = nn.Parameter(value, requires_grad=False)
    elif last in mod._buffers:
        if value is not None:
            mod._buffers[last] = value
    else:
        raise AssertionError(f"{dotted} is not a parameter or buffer")


class RankModel:
    """The units one rank owns, materialized on ``device``; others stay on the meta device.

    ``load_units(names)`` loads the named units' tensors from the checkpoint (taking over units
    after a re-plan); ``release_units(names)`` frees them again. ``run(x, start, end)`` applies
    units ``[start, end)`` (all must be loaded).

    A tensor may be owned by several units (a module shared by blocks, such as the relative
    position bias of ``vit_srelpos_*``, is listed in each of them). Ownership is counted by the
    loaded units' keys: loading a unit reads only the keys no loaded unit holds yet, and releasing
    a unit frees only the keys no still-loaded unit owns.
    """

    def __init__(self, model_name: str, checkpoint: str | Path, *, model_kwargs: dict | None = None,
                 img_size: int | None = None, device: str | torch.device = "cpu"):
        self.model_name = model_name
        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device)
        self.host, self.units = build_host(model_name, model_kwargs, img_size)
        self.unit_index = {u.name: u.index for u in self.units}
        self.loaded: set[str] = set()
        self._checked = False
        if self.device.type != "cpu":
            for name, b in list(self.host.named_buffers()):
                _set_tensor(self.host, name, b.to(self.device))

    @classmethod
    def from_module(cls, module: nn.Module, checkpoint: str | Path, *, model_name: str,
                    img_size: int | None = None, device: str | torch.device = "cpu",
                    write: bool = True) -> "RankModel":
        """A rank model over ``module`` itself (built by the caller, identically on every rank):
        with ``write``, its weights are first saved to ``checkpoint`` (safetensors; units taken
        over after a re-plan load from there), then every parameter is freed; the worker loads
        its own units back."""
        from safetensors.torch import save_file

        self = cls.__new__(cls)
        self.model_name = model_name
        self.checkpoint = Path(checkpoint)
        self.device = torch.device(device)
        module.eval()
        module.requires_grad_(False)
        self.host = module
        self.units = units(module, img_size)
        self.unit_index = {u.name: u.index for u in self.units}
        if write:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            tmp = self.checkpoint.with_suffix(".tmp")
            save_file(sd, str(tmp), metadata={"model": model_name})
            tmp.replace(self.checkpoint)
            del sd
        self.loaded = {u.name for u in self.units}
        self._checked = False
        self.release_units(list(self.loaded))
        if self.device.type != "cpu":
            for name, b in list(self.host.named_buffers()):
                _set_tensor(self.host, name, b.to(self.device))
        return self

    @property
    def num_units(self) -> int:
        return len(self.units)

    def _keys(self, names: Iterable[str]) -> list[str]:
        """The tensor keys the named units own, each once (in first-owner order)."""
        mods = [m for n in names for m in self.units[self.unit_index[n]].modules]
        return list(dict.fromkeys(unit_owned_names(self.host, mods)))

    def load_units(self, names: Iterable[str]) -> int:
        """Load the tensors of the named units from the checkpoint; returns bytes loaded."""
        names = [n for n in names if n not in self.loaded]
        unknown = [n for n in names if n not in self.unit_index]
        if unknown:
            raise ValueError(f"unknown unit(s) {unknown} for model {self.model_name!r}; units are: "
                             f"{', '.join(self.unit_index)}")
        if not names:
            return 0
        held = set(self._keys(self.loaded))  # shared with an already loaded unit: on the device
        keys = [k for k in self._keys(names) if k not in held]
        check_checkpoint(self.checkpoint, self.host, self.model_name, keys)
        tensors = _load_tensors(self.checkpoint, keys)
        nbytes = 0
        for k, v in tensors.items():
            v = v.to(self.device)
            nbytes += v.numel() * v.element_size()
            _set_tensor(self.host, k, v)
        self.loaded.update(names)
        return nbytes

    def release_units(self, names: Iterable[str]) -> None:
        """Free the parameters of the named loaded units, except those a unit that stays loaded
        also owns (buffers stay: they are built for real on every rank)."""
        names = [n for n in names if n in self.loaded]
        if not names:
            return
        kept = set(self._keys(self.loaded.difference(names)))
        params = {k for k, _ in self.host.named_parameters(remove_duplicate=False)}
        for k in self._keys(names):
            if k in params and k not in kept:
                _set_tensor(self.host, k, None)
        self.loaded.difference_update(names)

    def supports(self, *, width: float = 1.0, keep_ratio: float = 1.0) -> bool:
        """Whether the units run at ``width`` of their heads / hidden units (any width in (0, 1]
        once ``lapdtr.elastic.make_elastic`` swapped their layers, else full width only) and
        ``keep_ratio`` of their tokens (where a unit has an attention source to rank them:
        ``lapdtr.summarize.SOURCE_FAMILIES``; which boundary may: ``summary.check_keep_ratios``)."""
        if keep_ratio != 1.0:
            from ..models import get_adapter
            from ..summarize import SOURCE_FAMILIES

            if not (0.0 < keep_ratio < 1.0 and get_adapter(self.host).name in SOURCE_FAMILIES):
                return False
        if width == 1.0:
            return True
        from ..elastic import elastic_layers

        return 0.0 < width < 1.0 and bool(elastic_layers(self.host))

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.host.parameters()
                   if p.device.type != "meta")

    @torch.no_grad()
    def run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for u in self.units[start:end]:
            assert u.name in self.loaded, f"unit {u.name} is not loaded on this rank"
            x = u.fn(self.host, x)
        return x

    def unit(self, index: int) -> Unit:
        return self.units[index]

    def partition(self, cuts: Sequence[int | str]):
        """``lapdtr.partition`` of the host at ``cuts`` (stages of unloaded units hold meta tensors)."""
        from ..models.base import partition

        return partition(self.host, cuts, unit_list=self.units)

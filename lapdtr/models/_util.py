"""Small helpers shared by the family adapters."""
from __future__ import annotations

from torch import nn


def present(model: nn.Module, *names: str) -> tuple[str, ...]:
    """The names among ``names`` that the model holds as a module, parameter or buffer (not None)."""
    out = []
    for n in names:
        obj = model
        ok = True
        for part in n.split("."):
            if part in obj._modules:
                obj = obj._modules[part]
            elif part in obj._parameters:
                obj = obj._parameters[part]
            elif part in obj._buffers:
                obj = obj._buffers[part]
            else:
                ok = False
                break
            if obj is None:
                ok = False
                break
        if ok:
            out.append(n)
    return tuple(out)


def indexed(seq: nn.Module, i: int):
    """``seq[i]`` for a Sequential / ModuleList, as a constant for a unit function."""
    return seq[i]


def take_indices(num_features: int, indices) -> tuple[list[int], int]:
    """timm's ``feature_take_indices`` (``None``: all, an int ``n``: the last ``n``, a sequence:
    those indices, negative from the end), with a ``ValueError`` that names the bad value where
    timm would assert."""
    from timm.models._features import feature_take_indices

    if indices is not None:
        if isinstance(indices, bool) or not isinstance(indices, (int, list, tuple)):
            raise ValueError(f"indices={indices!r} must be None, an int (take the last n) or a "
                             f"list of feature indices")
        if isinstance(indices, int):
            if not 0 < indices <= num_features:
                raise ValueError(f"indices={indices}: the last n must lie in 1..{num_features} "
                                 f"(the model has {num_features} feature levels)")
        else:
            if not indices:
                raise ValueError("indices=[] selects no feature level")
            for i in indices:
                if (isinstance(i, bool) or not isinstance(i, int)
                        or not -num_features <= i < num_features):
                    raise ValueError(f"indices={list(indices)!r}: {i!r} is not a feature index "
                                     f"in {-num_features}..{num_features - 1} (the model has "
                                     f"{num_features} feature levels)")
            indices = list(indices)
    return feature_take_indices(num_features, indices)


def check_output_fmt(output_fmt) -> None:
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt={output_fmt!r} is not supported; this model's "
                         f"intermediates are feature maps in 'NCHW'")


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0 (0 removes the "
                         f"classifier)")
    return num_classes


def global_pool(pool_type, model_name: str):
    """timm's ``SelectAdaptivePool2d`` for ``pool_type`` (``''`` passes the map through
    unpooled), flattening when it pools; ``ValueError`` for a pool type timm does not know."""
    from timm.layers import SelectAdaptivePool2d

    if isinstance(pool_type, str):
        try:
            return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        except AssertionError:
            pass
    raise ValueError(f"global_pool={pool_type!r} is not a pooling {model_name} can use; timm's "
                     f"choices: '' (no pooling), 'avg', 'max', 'avgmax', 'catavgmax' and their "
                     f"'fast' forms ('fast', 'fastmax', 'fastavgmax', 'fastcatavgmax')")

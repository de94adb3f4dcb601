"""SqueezeNet 1.0 and 1.1 (Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters and <0.5MB model size", arXiv:1602.07360), registered with timm as ``squeezenet1_0``
and ``squeezenet1_1`` (importing ``lapdtr`` registers them).

The module layout is torchvision's: ``features`` (a Sequential of conv, ReLU, max-pools and
:class:`Fire` modules) and ``classifier`` = Dropout, 1x1 conv to ``num_classes``, ReLU, global
pool (timm's ``SelectAdaptivePool2d``, average by default as torchvision's
``AdaptiveAvgPool2d(1)``; ``global_pool=''`` keeps the map). torchvision ``state_dict`` keys
(``features.0.weight``, ``features.3.squeeze.weight``, ``classifier.1.weight``) load unchanged,
and the timm ``pretrained_cfg`` points at torchvision's ImageNet weights, so ``pretrained=True``
downloads and loads them (where a network is available).

Parameters with 1000 classes: 1.0 has 1,248,424, 1.1 has 1,235,496.

timm's model protocol: ``reset_classifier(num_classes, global_pool)``, ``forward_features`` /
``forward_head(pre_logits=)``, ``forward_intermediates`` / ``prune_intermediate_layers`` (four
feature levels: the stem and the maps before each later max-pool and at the end),
``features_only=True``, ``torch.fx`` tracing and ``torch.jit.script`` (also of the FX graph).
"""
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs,
                         register_model)

from .base import UnitSpec, register_adapter
from ._util import check_num_classes, check_output_fmt, global_pool as _global_pool, take_indices

__all__ = ["Fire", "SqueezeNet", "squeezenet_units"]


class Fire(nn.Module):
    """Fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated along channels."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int,
                 expand3x3_planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


# (stem conv out channels, stem kernel, layer plan): "M" is a max-pool, a tuple the Fire arguments
# (squeeze, expand1x1, expand3x3); Fire's input width is the previous output width.
_VERSIONS = {
    "1_0": (96, 7, ["M", (16, 64, 64), (16, 64, 64), (32, 128, 128), "M", (32, 128, 128),
                    (48, 192, 192), (48, 192, 192), (64, 256, 256), "M", (64, 256, 256)]),
    "1_1": (64, 3, ["M", (16, 64, 64), (16, 64, 64), "M", (32, 128, 128), (32, 128, 128), "M",
                    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]),
}


class SqueezeNet(nn.Module):
    """SqueezeNet with torchvision's layout and initialisation.

    Args:
        version: ``"1_0"`` or ``"1_1"``.
        num_classes: outputs of the final 1x1 conv; 0 removes it (and its ReLU), so
            :meth:`forward` returns the pooled 512-channel features.
        in_chans: input image channels.
        drop_rate: dropout before the final conv (0.5 as in the paper and torchvision).
        global_pool: timm's global pooling, after the final conv: ``"avg"`` (SqueezeNet's),
            ``"max"``, ``"avgmax"``, their ``"fast"`` forms, or ``""`` for none (then the output
            is the map of class scores, or with ``num_classes=0`` the feature map).
            ``"catavgmax"`` (twice the channels) only with ``num_classes=0``.
    """

    def __init__(self, version: str = "1_0", num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.5, global_pool: str = "avg"):
        super().__init__()
        if version not in _VERSIONS:
            raise ValueError(f"version={version!r} is not a SqueezeNet version; allowed: "
                             f"{', '.join(map(repr, _VERSIONS))}")
        num_classes = check_num_classes(num_classes)
        self.version = version
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        stem_chs, stem_kernel, plan = _VERSIONS[version]
        layers: List[nn.Module] = [nn.Conv2d(in_chans, stem_chs, kernel_size=stem_kernel,
                                             stride=2), nn.ReLU(inplace=True)]
        chs, reduction = stem_chs, 2
        self.feature_info = [dict(num_chs=chs, reduction=reduction, module="features.1")]
        for item in plan:
            if item == "M":
                if len(layers) > 2:  # the features before each pooling (after the stem's, above)
                    self.feature_info.append(dict(num_chs=chs, reduction=reduction,
                                                  module=f"features.{len(layers) - 1}"))
                layers.append(_pool())
                reduction *= 2
            else:
                layers.append(Fire(chs, *item))
                chs = item[1] + item[2]
        self.feature_info.append(dict(num_chs=chs, reduction=reduction,
                                      module=f"features.{len(layers) - 1}"))
        # index in ``features`` of each feature level, for forward_intermediates
        self._feature_idx = [int(f["module"].split(".")[1]) for f in self.feature_info]
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        self.classifier = nn.Sequential(nn.Dropout(p=drop_rate), nn.Identity(), nn.Identity(),
                                        nn.Identity())
        self._set_head(num_classes, global_pool)  # also sets global_pool, head_hidden_size
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        """``classifier[1:]``: the final conv and its ReLU (Identity for 0 classes), the pool."""
        pool = _global_pool(global_pool, "SqueezeNet")
        if num_classes > 0 and pool.feat_mult() != 1:
            raise ValueError(f"global_pool={global_pool!r} doubles the channels it pools, which "
                             f"needs num_classes=0: SqueezeNet's classifier is a conv before the "
                             f"pool, and would give {2 * num_classes} outputs")
        ref = self.classifier[0]
        if num_classes > 0:
            conv = nn.Conv2d(self.num_features, num_classes, kernel_size=1)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            p = next(self.features.parameters(), None)
            if p is not None:
                conv = conv.to(device=p.device, dtype=p.dtype)
            self.classifier[1] = conv
            self.classifier[2] = nn.ReLU(inplace=True)
        else:
            self.classifier[1] = nn.Identity()
            self.classifier[2] = nn.Identity()
        self.classifier[3] = pool
        for m in self.classifier[1:]:
            m.train(ref.training)
        self.num_classes = num_classes
        self.global_pool = pool.pool_type
        self.head_hidden_size = self.num_features * pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^features\.0", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each layer after the stem (whose in-place ReLU must not act on the output
        of a checkpoint)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new final conv for ``num_classes`` (0: none) and, unless ``global_pool`` is None, a
        new pooling (``''``: none, so :meth:`forward` gives a map)."""
        num_classes = check_num_classes(num_classes)
        self._set_head(num_classes, self.global_pool if global_pool is None else global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The map of each feature level in ``feature_info`` (timm's protocol).

        Args:
            indices: the last n levels if an int, all if None, those listed (negative from the
                end) if a list.
            norm: no effect (SqueezeNet has no final norm); accepted for the protocol.
            stop_early: stop after the last level asked for.
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of maps.

        Returns:
            The maps, or ``(forward_features(x), maps)`` (the final map is the one reached when
            stopping early).
        """
        check_output_fmt(output_fmt)
        take, max_index = take_indices(len(self._feature_idx), indices)
        take_layers = [self._feature_idx[i] for i in take]
        end = self._feature_idx[max_index] + 1 if stop_early else len(self.features)
        intermediates = []
        for i, layer in enumerate(self.features[:end]):
            if self.grad_checkpointing and i >= 2 and not torch.jit.is_scripting():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i in take_layers:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the layers after the last level in ``indices`` (timm's protocol); returns the
        absolute indices kept. The classifier and pooling go with ``prune_head`` or when the last
        layers go (``reset_classifier(0, '')``); ``prune_norm`` has nothing to prune."""
        take, max_index = take_indices(len(self._feature_idx), indices)
        prune_end = max_index < len(self._feature_idx) - 1
        self.features = self.features[:self._feature_idx[max_index] + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and len(self.features) > 2 and not torch.jit.is_scripting():
            return checkpoint_seq(self.features[2:], self.features[1](self.features[0](x)))
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Scores ``(B, num_classes)``; with ``pre_logits`` the pooled features
        ``(B, head_hidden_size)`` (dropout, pool)."""
        if pre_logits:
            return self.classifier[3](self.classifier[0](x))
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(url: str, **kwargs) -> dict:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (13, 13),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "features.0", "classifier": "classifier.1",
        "license": "bsd-3-clause", "paper_ids": "arXiv:1602.07360",
        "origin_url": "https://github.com/pytorch/vision", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "squeezenet1_0.tv_in1k": _cfg("https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth"),
    "squeezenet1_1.tv_in1k": _cfg("https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
})


def _create_squeezenet(variant: str, pretrained: bool = False, **kwargs) -> SqueezeNet:
    return build_model_with_cfg(SqueezeNet, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
                                **kwargs)


@register_model
def squeezenet1_0(pretrained: bool = False, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.0: 1,248,424 parameters."""
    return _create_squeezenet("squeezenet1_0", pretrained, **dict(dict(version="1_0"), **kwargs))


@register_model
def squeezenet1_1(pretrained: bool = False, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.1: 1,235,496 parameters, about 2.4x fewer FLOPs than 1.0."""
    return _create_squeezenet("squeezenet1_1", pretrained, **dict(dict(version="1_1"), **kwargs))


# ---- lapdtr adapter ------------------------------------------------------------------------------

def _stem(m, x):
    return m.features[1](m.features[0](x))


def _layer(i: int):
    def fn(m, x):
        return m.features[i](x)
    return fn


def _head(m, x):
    return m.forward_head(x)


@register_adapter("squeezenet", model_types=[SqueezeNet], patterns=["squeezenet*"],
                  examples=["squeezenet1_0", "squeezenet1_1"])
def squeezenet_units(model: SqueezeNet) -> list[UnitSpec]:
    """SqueezeNet: stem conv+ReLU, each max-pool and Fire module, head (dropout, conv, pool)."""
    specs = [UnitSpec("features.0", "embed", ("features.0", "features.1"), _stem, "map")]
    for i in range(2, len(model.features)):
        specs.append(UnitSpec(f"features.{i}", "block", (f"features.{i}",), _layer(i), "map"))
    specs.append(UnitSpec("head", "head", ("classifier",), _head, "logits"))
    return specs

"""EdgeViTs (Pan et al., "EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision
Transformers", ECCV 2022, arXiv:2205.03436), written in timm style and registered with timm as
``edgevit_xxs``, ``edgevit_xs`` and ``edgevit_s`` (importing ``lapdtr`` registers them).

Which EdgeViT: the LAP-DTR paper cites an "EdgeViT" by Chen et al. (WASA 2022) whose architecture
was never published; lapdtr uses EdgeViTs in its place.

Architecture (the configuration released at github.com/saic-fi/edgevit): four stages, each opened
by a non-overlapping strided conv (kernel = stride = 4, 2, 2, 2) and a LayerNorm over channels,
then Local-Global-Local (LGL) blocks:

* local aggregation (stages 1-3, where the sampling ratio r > 1): 3x3 depthwise positional
  encoding; BatchNorm -> 1x1 -> 5x5 depthwise -> 1x1; BatchNorm -> conv MLP;
* global sparse attention: 3x3 depthwise positional encoding; LayerNorm; multi-head attention over
  delegate tokens, one per r x r cell (the cell's top-left token); local propagation back to every
  position with a depthwise transposed conv (kernel = stride = r) and a LayerNorm; projection;
  then LayerNorm -> token MLP.

Head: BatchNorm -> global pool (average by default; any timm ``global_pool``, ``''`` keeps the
map) -> Linear. Feature maps ``(B, C, H, W)`` pass between stages and blocks; the input side must
be a multiple of 32 (224, 160, 256 ...).

Parameters with 1000 classes: XXS 4.07M, XS 6.77M, S 13.11M, as released. The paper's table lists
4.1M / 6.7M / 11.1M; the released EdgeViT-S configuration (depths 1,2,5,3; channels 48,96,240,384)
has 13.1M, and that is the one built here.

The final BatchNorm belongs to :meth:`EdgeVit.forward_head` (as ConvNeXt keeps its final norm in
the head), so a unit that runs the head is one host-method call. ``state_dict`` keys follow timm
naming (``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``); :func:`checkpoint_filter_fn` maps
checkpoints of the official code (``patch_embed1``, ``blocks1.0.LocalAgg`` ...) onto them, and
timm applies it for ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``. No
weights are published, so ``pretrained=True`` without a file is an error.

timm's model protocol: ``reset_classifier(num_classes, global_pool)``, ``forward_features`` /
``forward_head(pre_logits=)``, ``forward_intermediates`` / ``prune_intermediate_layers`` (one
feature level per stage), ``features_only=True``, ``set_grad_checkpointing``, ``torch.fx``
tracing (the feature-map side check is a timm no-trace function) and ``torch.jit.script``.
"""
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (ConvMlp, DropPath, Mlp, register_notrace_function, trunc_normal_,
                         use_fused_attn)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from .base import UnitSpec, register_adapter
from ._util import check_num_classes, check_output_fmt, global_pool as _global_pool, take_indices

__all__ = ["EdgeVit", "LGLBlock", "LocalAgg", "GlobalSparseBlock", "GlobalSparseAttn",
           "checkpoint_filter_fn", "edgevit_units"]


class PatchEmbed(nn.Module):
    """Non-overlapping strided conv (kernel = stride = ``patch_size``), LayerNorm over channels."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LocalAgg(nn.Module):
    """Local aggregation: positional encoding, BN -> 1x1 -> 5x5 depthwise -> 1x1, BN -> conv MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4., proj_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path1(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


@register_notrace_function  # a leaf for timm's FX tracer (shapes are proxies there) ...
@torch.fx.wrap  # ... and for plain torch.fx.symbolic_trace
def _delegate_grid(H: int, W: int, r: int) -> Tuple[int, int]:
    """Sides of the delegate-token grid of an ``H x W`` map with sampling ratio ``r``."""
    if H % r != 0 or W % r != 0:
        raise ValueError(
            f"EdgeViT global sparse attention with sampling ratio {r} needs a feature map "
            f"whose sides divide by {r}, got {H}x{W}; use an input side that is a "
            f"multiple of 32")
    return H // r, W // r


class GlobalSparseAttn(nn.Module):
    """Self-attention among delegate tokens (one per ``sr_ratio`` x ``sr_ratio`` cell), propagated
    back to every position by a depthwise transposed conv (local propagation)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = int(sr_ratio)
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        if self.sr_ratio > 1:
            self.sampler = nn.AvgPool2d(kernel_size=1, stride=self.sr_ratio)
            self.local_prop = nn.ConvTranspose2d(dim, dim, self.sr_ratio, stride=self.sr_ratio,
                                                 groups=dim)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sampler = nn.Identity()
            self.local_prop = nn.Identity()
            self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """``x``: tokens ``(B, H*W, C)`` of an ``H x W`` map given by ``size``."""
        B, N, C = x.shape
        H, W = size
        r = self.sr_ratio
        Hr, Wr = H, W
        if r > 1:
            Hr, Wr = _delegate_grid(H, W, r)
            x = self.sampler(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, -1, C)
        if r > 1:
            x = x.transpose(1, 2).reshape(B, C, Hr, Wr)
            x = self.norm(self.local_prop(x).flatten(2).transpose(1, 2))
        return self.proj_drop(self.proj(x))


class GlobalSparseBlock(nn.Module):
    """Positional encoding, then a pre-norm transformer block with :class:`GlobalSparseAttn`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., sr_ratio: int = 1,
                 qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GlobalSparseAttn(dim, num_heads, sr_ratio, qkv_bias=qkv_bias,
                                     attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.drop_path1(self.attn(self.norm1(x), (H, W)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class LGLBlock(nn.Module):
    """Local-Global-Local block: :class:`LocalAgg` (only where ``sr_ratio > 1``), then
    :class:`GlobalSparseBlock` (global sparse attention + local propagation + MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., sr_ratio: int = 1,
                 qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.local_agg = (LocalAgg(dim, mlp_ratio, proj_drop, drop_path) if sr_ratio > 1
                          else nn.Identity())
        self.global_sparse = GlobalSparseBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias,
                                               proj_drop, attn_drop, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_sparse(self.local_agg(x))


class EdgeVitStage(nn.Module):
    def __init__(self, in_chs: int, dim: int, depth: int, patch_size: int, num_heads: int,
                 mlp_ratio: float, sr_ratio: int, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: Sequence[float]):
        super().__init__()
        self.downsample = PatchEmbed(in_chs, dim, patch_size)
        self.blocks = nn.Sequential(*[
            LGLBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, proj_drop, attn_drop,
                     drop_path[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def _per_stage(name: str, value, n: int) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} entries (one per stage), got {len(value)}: {value}")
    return value


class EdgeVit(nn.Module):
    """EdgeViT (EdgeViTs, ECCV 2022): four stages of LGL blocks, head BN -> pool -> Linear.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 removes the classifier, so :meth:`forward` gives the
            pooled features (or, with ``global_pool=''``, the normalised feature map).
        global_pool: timm's global pooling of the head: ``"avg"`` (EdgeViT's), ``"max"``,
            ``"avgmax"``, ``"catavgmax"`` (twice the features), their ``"fast"`` forms, or
            ``""`` for none (then ``num_classes`` must be 0: the classifier is a Linear over
            pooled features).
        embed_dims, depths: channels and number of LGL blocks per stage.
        head_dim: attention head width; a stage has ``embed_dim // head_dim`` heads.
        mlp_ratio: hidden width of every MLP relative to the stage width.
        sr_ratios: sampling ratio r per stage (one delegate token per r x r cell).
        patch_sizes: kernel = stride of each stage's downsampling conv.
        img_size: nominal input side (any multiple of 32 works; recorded in timm's model traits).
        drop_rate: dropout before the classifier. proj_drop_rate, attn_drop_rate: dropout in the
        blocks. drop_path_rate: stochastic depth, rising linearly over the blocks.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (48, 96, 240, 384),
                 depths: Sequence[int] = (1, 2, 5, 3),
                 head_dim: int = 48, mlp_ratio: Union[float, Sequence[float]] = 4.,
                 sr_ratios: Sequence[int] = (4, 2, 2, 1), patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 qkv_bias: bool = True, img_size: Union[int, Sequence[int]] = 224,
                 drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        num_classes = check_num_classes(num_classes)
        n = len(embed_dims)
        depths = _per_stage("depths", depths, n)
        mlp_ratio = _per_stage("mlp_ratio", mlp_ratio, n)
        sr_ratios = _per_stage("sr_ratios", sr_ratios, n)
        patch_sizes = _per_stage("patch_sizes", patch_sizes, n)
        for d in embed_dims:
            if d % head_dim:
                raise ValueError(f"embed_dims {tuple(embed_dims)}: {d} is not divisible by "
                                 f"head_dim {head_dim}")
        step = 1
        for i in range(n):
            step = math.lcm(step, math.prod(patch_sizes[:i + 1]) * sr_ratios[i])
        sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s <= 0 or s % step for s in sides):
            raise ValueError(f"img_size={img_size!r}: EdgeViT needs sides that are positive "
                             f"multiples of {step}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.num_features = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # on the CPU whatever the default device: a plain list of rates, so the model also
        # builds under ``torch.device("meta")`` as timm's do
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths),
                                                  device="cpu").split(depths)]
        stages, prev, reduction = [], in_chans, 1
        self.feature_info = []
        for i in range(n):
            stages.append(EdgeVitStage(prev, embed_dims[i], depths[i], patch_sizes[i],
                                       embed_dims[i] // head_dim, mlp_ratio[i], sr_ratios[i],
                                       qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i]))
            prev = embed_dims[i]
            reduction *= patch_sizes[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        pool, head, self.head_hidden_size = self._make_head(num_classes, global_pool)
        self.global_pool = pool
        self.head_drop = nn.Dropout(drop_rate)
        self.head = head
        self.apply(self._init_weights)

    def _make_head(self, num_classes: int, global_pool: str):
        """(pool, classifier, pooled width): timm's pooling, then a Linear (or Identity)."""
        pool = _global_pool(global_pool, "EdgeViT")
        if num_classes > 0 and not pool.pool_type:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got "
                             f"num_classes={num_classes}: EdgeViT's classifier is a Linear over "
                             f"pooled features")
        width = self.num_features * pool.feat_mult()
        head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        return pool, head, width

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.downsample",
                    blocks=r"^stages\.(\d+)" if coarse else [
                        (r"^stages\.(\d+)\.downsample", (0,)),
                        (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                        (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none) and, unless ``global_pool`` is None,
        a new pooling (``''``: none, so :meth:`forward` gives the normalised feature map)."""
        num_classes = check_num_classes(num_classes)
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        pool, head, width = self._make_head(num_classes, global_pool)
        if num_classes > 0:
            self._init_weights(head)
            ref = next(self.parameters())
            head = head.to(device=ref.device, dtype=ref.dtype)
        self.global_pool = pool.train(self.training)
        self.head = head.train(self.training)
        self.head_hidden_size = width
        self.num_classes = num_classes

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The output of each stage (timm's protocol; feature level ``i`` is ``stages.i``).

        Args:
            indices: the last n levels if an int, all if None, those listed (negative from the
                end) if a list.
            norm: apply the head's BatchNorm to the last stage's map, where it is taken.
            stop_early: stop after the last level asked for.
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of maps.

        Returns:
            The maps, or ``(forward_features(x), maps)`` (the final map is the one reached when
            stopping early).
        """
        check_output_fmt(output_fmt)
        take, max_index = take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the stages after the last level in ``indices`` (timm's protocol); returns the
        absolute indices kept. The head's BatchNorm goes with ``prune_norm`` or when the last
        stage goes (it is sized for it); the classifier and pooling go with ``prune_head`` or
        then too (``reset_classifier(0, '')``)."""
        take, max_index = take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` feature map of the last stage (before the head's BatchNorm)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """BatchNorm, pooling, dropout, classifier; ``pre_logits``: stop before the classifier
        (``(B, head_hidden_size)`` pooled features)."""
        x = self.head_drop(self.global_pool(self.norm(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_OFFICIAL_KEYS = (
    (re.compile(r"^patch_embed(\d)\."), lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (re.compile(r"^blocks(\d)\.(\d+)\.LocalAgg\."),
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.local_agg."),
    (re.compile(r"^blocks(\d)\.(\d+)\.SelfAttn\."),
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.global_sparse."),
    (re.compile(r"\.attn\.LocalProp\."), lambda m: ".attn.local_prop."),
)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Map a checkpoint of the official EdgeViT code (github.com/saic-fi/edgevit) to these keys.

    Accepts the training script's ``{"model": state_dict, ...}`` wrapper; keys already in lapdtr's
    layout pass through unchanged.
    """
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _OFFICIAL_KEYS:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stages.0.downsample.proj",
        "classifier": "head", "paper_ids": "arXiv:2205.03436",
        "paper_name": "EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision "
                      "Transformers",
        "origin_url": "https://github.com/saic-fi/edgevit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "edgevit_xxs": _cfg(),
    "edgevit_xs": _cfg(),
    "edgevit_s": _cfg(),
})


def _create_edgevit(variant: str, pretrained: bool = False, **kwargs) -> EdgeVit:
    return build_model_with_cfg(EdgeVit, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
                                **kwargs)


@register_model
def edgevit_xxs(pretrained: bool = False, **kwargs) -> EdgeVit:
    """EdgeViT-XXS: 4.07M parameters."""
    args = dict(embed_dims=(36, 72, 144, 288), depths=(1, 1, 3, 2), head_dim=36)
    return _create_edgevit("edgevit_xxs", pretrained, **dict(args, **kwargs))


@register_model
def edgevit_xs(pretrained: bool = False, **kwargs) -> EdgeVit:
    """EdgeViT-XS: 6.77M parameters."""
    args = dict(embed_dims=(48, 96, 240, 384), depths=(1, 1, 3, 1), head_dim=48)
    return _create_edgevit("edgevit_xs", pretrained, **dict(args, **kwargs))


@register_model
def edgevit_s(pretrained: bool = False, **kwargs) -> EdgeVit:
    """EdgeViT-S: 13.11M parameters as released (the paper's table says 11.1M)."""
    args = dict(embed_dims=(48, 96, 240, 384), depths=(1, 2, 5, 3), head_dim=48)
    return _create_edgevit("edgevit_s", pretrained, **dict(args, **kwargs))


# ---- lapdtr adapter ------------------------------------------------------------------------------

def _downsample(i: int):
    def fn(m, x):
        return m.stages[i].downsample(x)
    return fn


def _block(i: int, j: int):
    def fn(m, x):
        return m.stages[i].blocks[j](x)
    return fn


def _head(m, x):
    return m.forward_head(x)


@register_adapter("edgevit", model_types=[EdgeVit], patterns=["edgevit_*"],
                  examples=["edgevit_xxs", "edgevit_xs", "edgevit_s"])
def edgevit_units(model: EdgeVit) -> list[UnitSpec]:
    """EdgeViT: each stage's downsampling conv, each LGL block, head (BN, pool, Linear)."""
    specs = []
    for i, stage in enumerate(model.stages):
        name = f"stages.{i}.downsample"
        specs.append(UnitSpec(name, "embed" if i == 0 else "stage", (name,), _downsample(i), "map"))
        for j in range(len(stage.blocks)):
            name = f"stages.{i}.blocks.{j}"
            specs.append(UnitSpec(name, "block", (name,), _block(i, j), "map"))
    specs.append(UnitSpec("head", "head", ("norm", "global_pool", "head_drop", "head"), _head,
                          "logits"))
    return specs

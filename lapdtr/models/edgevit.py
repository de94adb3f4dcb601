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

Head: BatchNorm -> global average pool -> Linear. Feature maps ``(B, C, H, W)`` pass between
stages and blocks; the input side must be a multiple of 32 (224, 160, 256 ...).

Parameters with 1000 classes: XXS 4.07M, XS 6.77M, S 13.11M, as released. The paper's table lists
4.1M / 6.7M / 11.1M; the released EdgeViT-S configuration (depths 1,2,5,3; channels 48,96,240,384)
has 13.1M, and that is the one built here.

The final BatchNorm belongs to :meth:`EdgeVit.forward_head` (as ConvNeXt keeps its final norm in
the head), so a unit that runs the head is one host-method call. ``state_dict`` keys follow timm
naming (``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``); :func:`checkpoint_filter_fn` maps
checkpoints of the official code (``patch_embed1``, ``blocks1.0.LocalAgg`` ...) onto them, and
timm applies it for ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``. No
weights are published, so ``pretrained=True`` without a file is an error.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvMlp, DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .base import UnitSpec, register_adapter

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

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``x``: tokens ``(B, H*W, C)`` of an ``H x W`` map given by ``size``."""
        B, N, C = x.shape
        H, W = size
        r = self.sr_ratio
        if r > 1:
            if H % r or W % r:
                raise ValueError(
                    f"EdgeViT global sparse attention with sampling ratio {r} needs a feature map "
                    f"whose sides divide by {r}, got {H}x{W}; use an input side that is a "
                    f"multiple of 32")
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
            x = x.transpose(1, 2).reshape(B, C, H // r, W // r)
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
    """EdgeViT (EdgeViTs, ECCV 2022): four stages of LGL blocks, head BN -> avg pool -> Linear.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 gives pooled features from :meth:`forward`.
        global_pool: ``"avg"`` (the only pooling EdgeViT uses).
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
                 head_dim: int = 48, mlp_ratio: float | Sequence[float] = 4.,
                 sr_ratios: Sequence[int] = (4, 2, 2, 1), patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 qkv_bias: bool = True, img_size: int | Sequence[int] = 224, drop_rate: float = 0.,
                 proj_drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.):
        super().__init__()
        self._check_pool(global_pool)
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
        self.global_pool = global_pool
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate

        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths)).split(depths)]
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
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _check_pool(global_pool):
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; EdgeViT pools with "
                             f"'avg'")

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
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self._check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` feature map of the last stage (before the head's BatchNorm)."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean((2, 3))
        x = self.head_drop(x)
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
    specs.append(UnitSpec("head", "head", ("norm", "head_drop", "head"), _head, "logits"))
    return specs

"""EViT-style summarization of a token sequence, and the two ways a receiver restores it.

:func:`summarize` keeps the prefix tokens (class, distillation, register tokens) and the ``k``
most important patch tokens, ``k = max(1, round(keep · N_patch))`` (fixed by ``keep`` and the
sequence length, so shapes are static), in their original order, and fuses the others into one
token, their importance-weighted mean (EViT, Liang et al. 2022). The result, a :class:`Summary`,
is what a packet carries (:mod:`lapdtr.summarize.codec`).

Restore rules:

* :func:`restore_tokens`: the shorter sequence ``[prefix, kept..., fused]`` for plain ViT blocks;
  :func:`size_bias` is ToMe's proportional attention for it (``log(size)`` per key, added to the
  attention logits: pass it as the blocks' ``attn_mask``).
* :func:`restore_dense`: the full sequence, kept tokens at their positions and every other
  position filled with the fused token, for models that need the grid (:func:`tokens_to_map`).

``keep = 1.0`` keeps every token and fuses none: both rules return the input exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import dispatch

__all__ = ["Summary", "keep_count", "check_keep", "summarize", "gather_fuse", "gather_fuse_ref",
           "restore_tokens", "restore_dense", "size_bias", "map_to_tokens", "tokens_to_map",
           "LAYOUTS"]

LAYOUTS = ("tokens", "map", "map_nhwc")
_TINY = torch.finfo(torch.float32).tiny


def check_keep(keep) -> float:
    """``keep`` as a float; outside (0, 1] (or not a number) is a ``ValueError``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep ratio {keep!r} is not allowed: it must lie in (0, 1] "
                         "(1.0 keeps every token)")
    return float(keep)


def keep_count(keep: float, n_patch: int) -> int:
    """Patch tokens kept at ratio ``keep`` out of ``n_patch``: ``max(1, round(keep · n_patch))``."""
    keep = check_keep(keep)
    if n_patch < 1:
        raise ValueError(f"a summarized sequence needs at least one patch token, got {n_patch}")
    return min(n_patch, max(1, round(keep * n_patch)))


@dataclass
class Summary:
    """A summarized sequence: ``prefix`` (B, P, C), ``kept`` (B, k, C), ``indices`` (B, k) int64
    (sorted positions of the kept tokens among the ``n_patch`` patch tokens), ``fused`` (B, 1, C),
    or (B, 0, C) when every token is kept."""

    prefix: torch.Tensor
    kept: torch.Tensor
    indices: torch.Tensor
    fused: torch.Tensor
    n_patch: int

    @property
    def num_prefix(self) -> int:
        return self.prefix.shape[1]

    @property
    def k(self) -> int:
        return self.kept.shape[1]

    @property
    def fused_size(self) -> int:
        """How many tokens the fused token stands for (0 when every token is kept)."""
        return self.n_patch - self.k


def gather_fuse_ref(x: torch.Tensor, w_rest: torch.Tensor, indices: torch.Tensor):
    """PyTorch reference of :func:`gather_fuse`."""
    C = x.shape[-1]
    kept = x.gather(1, indices.unsqueeze(-1).expand(-1, -1, C))
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = w_rest.to(ct)
    fused = (w.unsqueeze(-1) * x.to(ct)).sum(1, keepdim=True) \
        / w.sum(1).clamp_min(_TINY)[:, None, None]
    return kept, fused.to(x.dtype)


def gather_fuse(x: torch.Tensor, w_rest: torch.Tensor, indices: torch.Tensor):
    """``(kept, fused)``: the tokens ``x[b, indices[b]]`` (B, k, C) and the ``w_rest``-weighted
    mean of ``x`` (B, 1, C), accumulated in float32. ``x`` (B, N, C); ``w_rest`` (B, N), zero at
    the kept tokens; ``indices`` (B, k) int64. Differentiable in ``x`` and ``w_rest``."""
    if x.dim() != 3 or w_rest.shape != x.shape[:2] or indices.dim() != 2 \
            or indices.shape[0] != x.shape[0]:
        raise ValueError(f"gather_fuse takes x (B, N, C), w_rest (B, N), indices (B, k); got "
                         f"{list(x.shape)}, {list(w_rest.shape)}, {list(indices.shape)}")
    return dispatch.run("gather_fuse", gather_fuse_ref, x, w_rest, indices)


def summarize(x: torch.Tensor, importance: torch.Tensor | None, keep: float, *,
              num_prefix: int = 1) -> Summary:
    """Keep the ``num_prefix`` first tokens of ``x`` (B, N, C) and the top-k patch tokens by
    ``importance`` ((B, N) for every token, or (B, N - num_prefix) for the patch tokens); fuse
    the others into one importance-weighted token. ``importance`` may be ``None`` at keep 1."""
    if x.dim() != 3:
        raise ValueError(f"summarize takes tokens (B, N, C); got shape {list(x.shape)}")
    B, N, C = x.shape
    if not 0 <= num_prefix < N:
        raise ValueError(f"num_prefix={num_prefix} must lie in 0..{N - 1} for {N} tokens")
    n_patch = N - num_prefix
    k = keep_count(keep, n_patch)
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    if k == n_patch:
        idx = torch.arange(n_patch, device=x.device).expand(B, n_patch)
        return Summary(prefix, patches, idx, x.new_zeros(B, 0, C), n_patch)
    if importance is None:
        raise ValueError(f"keep ratio {keep} drops tokens: summarize needs their importance")
    if importance.shape == (B, N):
        scores = importance[:, num_prefix:]
    elif importance.shape == (B, n_patch):
        scores = importance
    else:
        raise ValueError(f"importance has shape {list(importance.shape)}; for tokens "
                         f"{list(x.shape)} with {num_prefix} prefix tokens it must be "
                         f"[{B}, {N}] or [{B}, {n_patch}]")
    idx = scores.detach().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    w_rest = scores.clamp_min(0).scatter(1, idx, 0.0)
    kept, fused = gather_fuse(patches, w_rest, idx)
    return Summary(prefix, kept, idx, fused, n_patch)


def restore_tokens(s: Summary) -> torch.Tensor:
    """The shorter sequence ``[prefix, kept..., fused]`` (B, P + k + 1, C); without a fused token
    (keep 1) the input sequence itself."""
    return torch.cat([s.prefix, s.kept, s.fused], dim=1)


def size_bias(num_prefix: int, k: int, fused_size: int, *, dtype=torch.float32,
              device=None) -> torch.Tensor | None:
    """ToMe's proportional attention for :func:`restore_tokens`' sequence: ``log(size)`` of each
    key, (1, 1, 1, P + k + 1), to add to the attention logits (SDPA's float ``attn_mask``);
    ``None`` without a fused token (every size is 1)."""
    if fused_size == 0:
        return None
    bias = torch.zeros(1, 1, 1, num_prefix + k + 1, dtype=dtype, device=device)
    bias[..., -1] = math.log(fused_size)
    return bias


def restore_dense(s: Summary) -> torch.Tensor:
    """The full sequence (B, P + n_patch, C): kept tokens at their positions, the fused token at
    every other one."""
    B, _, C = s.kept.shape
    if s.fused_size == 0:
        dense = s.kept.new_empty(B, s.n_patch, C)
    else:
        dense = s.fused.expand(B, s.n_patch, C).clone()
    dense = dense.scatter(1, s.indices.unsqueeze(-1).expand(-1, -1, C), s.kept)
    return torch.cat([s.prefix, dense], dim=1)


def map_to_tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A boundary tensor as tokens (B, N, C): ``tokens`` as is, ``map`` (B, C, H, W) and
    ``map_nhwc`` (B, H, W, C) flattened row-major over H, W."""
    if layout == "tokens":
        return x
    if layout == "map":
        return x.flatten(2).transpose(1, 2)
    if layout == "map_nhwc":
        return x.flatten(1, 2)
    raise ValueError(f"layout {layout!r} is not supported; supported: {', '.join(LAYOUTS)}")


def tokens_to_map(t: torch.Tensor, layout: str, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`map_to_tokens` for a grid of ``hw = (H, W)``."""
    B, N, C = t.shape
    H, W = hw
    if N != H * W and layout != "tokens":
        raise ValueError(f"{N} tokens do not fill a {H}x{W} grid")
    if layout == "tokens":
        return t
    if layout == "map":
        return t.transpose(1, 2).reshape(B, C, H, W)
    if layout == "map_nhwc":
        return t.reshape(B, H, W, C)
    raise ValueError(f"layout {layout!r} is not supported; supported: {', '.join(LAYOUTS)}")

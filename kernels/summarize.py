"""Triton kernels of feature summarization (:mod:`lapdtr.summarize`).

* :func:`cls_importance`: the class token's softmax attention row from ``q`` and ``k``, one
  program per (batch, head), two passes over key blocks (running max and sum, then the
  probabilities): O(N·D) work and memory.
* :func:`received_attention`: the attention each key receives, summed over queries, in two
  passes: each query's softmax max and sum (online over key blocks, i.e. its logsumexp), then
  per key block the probabilities of every query block summed. No N×N matrix is ever stored,
  only (BLOCK_M, BLOCK_N) tiles.
* :func:`gather_fuse`: the kept tokens gathered and the weighted mean of the others, one program
  per (batch, channel block).
* :func:`quantize_int8`: symmetric per-token int8 (scale = max|x| / 127), one program per token.

Every kernel accumulates in float32 and returns the dtypes its PyTorch reference in
:mod:`lapdtr.summarize` returns (float64 inputs are computed in float32). Importing this module imports Triton; ``TRITON_INTERPRET=1``
must be set before that for the kernels to run on CPU tensors (``INTERPRET`` records it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "cls_importance", "received_attention", "gather_fuse", "quantize_int8"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
_NEG = -1.0e30  # a finite "minus infinity": exp(_NEG - m) is 0 without inf - inf


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def _cls_row_kernel(q_ptr, k_ptr, out_ptr, H, N, D, scale, row,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q0 = tl.load(q_ptr + b * sqb + h * sqh + row * sqn + d * sqd, mask=dm, other=0.0)
    q0 = q0.to(tl.float32) * scale
    kbase = k_ptr + b * skb + h * skh
    m_vec = tl.full([BLOCK_N], _NEG, tl.float32)
    l_vec = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < N
        kt = tl.load(kbase + n[:, None] * skn + d[None, :] * skd,
                     mask=nm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        s = tl.where(nm, tl.sum(kt * q0[None, :], axis=1), _NEG)
        m_new = tl.maximum(m_vec, s)
        l_vec = l_vec * tl.exp(m_vec - m_new) + tl.where(nm, tl.exp(s - m_new), 0.0)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    total = tl.sum(l_vec * tl.exp(m_vec - m), axis=0)
    obase = out_ptr + (b * H + h) * N
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < N
        kt = tl.load(kbase + n[:, None] * skn + d[None, :] * skd,
                     mask=nm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        s = tl.sum(kt * q0[None, :], axis=1)
        tl.store(obase + n, tl.exp(s - m) / total, mask=nm)


def _out_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, heads, N, head_dim); got {list(q.shape)} and "
                         f"{list(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices ({q.device}, {k.device})")


def cls_importance(q: torch.Tensor, k: torch.Tensor, scale: float, row: int = 0) -> torch.Tensor:
    """Row ``row`` of softmax(q k^T · scale), averaged over heads: (B, N) float32."""
    _check_qk(q, k)
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    _cls_row_kernel[(B, H)](q, k, out, H, N, D, float(scale), int(row),
                            *q.stride(), *k.stride(),
                            BLOCK_N=min(128, _pow2(N)), BLOCK_D=_pow2(D))
    return out.mean(1).to(_out_dtype(q))


@triton.jit
def _rowstat_kernel(q_ptr, k_ptr, m_ptr, l_ptr, H, N, D, scale,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                F32: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qt = tl.load(q_ptr + b * sqb + h * sqh + i[:, None] * sqn + d[None, :] * sqd,
                 mask=im[:, None] & dm[None, :], other=0.0)
    kbase = k_ptr + b * skb + h * skh
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < N
        kt = tl.load(kbase + n[None, :] * skn + d[:, None] * skd,
                     mask=nm[None, :] & dm[:, None], other=0.0)
        if F32:
            s = tl.dot(qt.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(qt, kt)
        s = tl.where(nm[None, :], s * scale, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(nm[None, :], tl.exp(s - m_new[:, None]),
                                                          0.0), axis=1)
        m_i = m_new
    tl.store(m_ptr + bh * N + i, m_i, mask=im)
    tl.store(l_ptr + bh * N + i, l_i, mask=im)


@triton.jit
def _received_kernel(q_ptr, k_ptr, m_ptr, l_ptr, out_ptr, H, N, D, scale,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     F32: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kt = tl.load(k_ptr + b * skb + h * skh + n[None, :] * skn + d[:, None] * skd,
                 mask=nm[None, :] & dm[:, None], other=0.0)
    qbase = q_ptr + b * sqb + h * sqh
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        im = i < N
        qt = tl.load(qbase + i[:, None] * sqn + d[None, :] * sqd,
                     mask=im[:, None] & dm[None, :], other=0.0)
        if F32:
            s = tl.dot(qt.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(qt, kt)
        m = tl.load(m_ptr + bh * N + i, mask=im, other=0.0)
        inv_l = 1.0 / tl.load(l_ptr + bh * N + i, mask=im, other=1.0)
        p = tl.exp(s * scale - m[:, None]) * inv_l[:, None]
        acc += tl.sum(tl.where(im[:, None] & nm[None, :], p, 0.0), axis=0)
    tl.store(out_ptr + bh * N + n, acc, mask=nm)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention received per token, mean over queries and heads: (B, N) float32."""
    _check_qk(q, k)
    B, H, N, D = q.shape
    # tl.dot in float32 ("ieee") but for half inputs; the interpreter's bfloat16 dot is wrong
    # (Triton 3.8), so bfloat16 takes the float32 dot there
    f32 = q.dtype != torch.float16 and not (q.dtype == torch.bfloat16 and not INTERPRET)
    odt = _out_dtype(q)
    if q.dtype == torch.float64:  # tl.dot takes no float64: the float32 path
        q, k = q.float(), k.float()
    bm = bn = min(64, _pow2(N))
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), F32=f32)
    m = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
    l_ = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
    _rowstat_kernel[(B * H, triton.cdiv(N, bm))](q, k, m, l_, H, N, D, float(scale),
                                                 *q.stride(), *k.stride(), **meta)
    out = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
    _received_kernel[(B * H, triton.cdiv(N, bn))](q, k, m, l_, out, H, N, D, float(scale),
                                                  *q.stride(), *k.stride(), **meta)
    return (out.view(B, H, N).sum(1) / (H * N)).to(odt)


@triton.jit
def _gather_fuse_kernel(x_ptr, w_ptr, idx_ptr, kept_ptr, fused_ptr, N, C, K,
                        sxb, sxn, sxc, swb, swn, sib, sik,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    xbase = x_ptr + b * sxb
    acc = tl.zeros([BLOCK_C], tl.float32)
    wacc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, N, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tm = t < N
        w = tl.load(w_ptr + b * swb + t * swn, mask=tm, other=0.0).to(tl.float32)
        xt = tl.load(xbase + t[:, None] * sxn + c[None, :] * sxc,
                     mask=tm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * w[:, None], axis=0)
        wacc += w
    wsum = tl.maximum(tl.sum(wacc, axis=0), 1.1754943508222875e-38)
    tl.store(fused_ptr + b * C + c, (acc / wsum).to(fused_ptr.dtype.element_ty), mask=cm)
    for start in range(0, K, BLOCK_T):
        j = start + tl.arange(0, BLOCK_T)
        jm = j < K
        src = tl.load(idx_ptr + b * sib + j * sik, mask=jm, other=0)
        xt = tl.load(xbase + src[:, None] * sxn + c[None, :] * sxc,
                     mask=jm[:, None] & cm[None, :], other=0.0)
        tl.store(kept_ptr + (b * K + j[:, None]) * C + c[None, :], xt,
                 mask=jm[:, None] & cm[None, :])


def gather_fuse(x: torch.Tensor, w_rest: torch.Tensor, indices: torch.Tensor):
    """``(kept, fused)``: ``x[b, indices[b]]`` (B, k, C) and the ``w_rest``-weighted mean of
    ``x`` over its tokens (B, 1, C), both in ``x``'s dtype. ``w_rest`` (B, N) is zero at the
    kept tokens."""
    B, N, C = x.shape
    K = indices.shape[1]
    kept = torch.empty(B, K, C, dtype=x.dtype, device=x.device)
    fused = torch.empty(B, 1, C, dtype=x.dtype, device=x.device)
    bc = min(128, _pow2(C))
    _gather_fuse_kernel[(B, triton.cdiv(C, bc))](x, w_rest, indices, kept, fused, N, C, K,
                                                 *x.stride(), *w_rest.stride(), *indices.stride(),
                                                 BLOCK_T=min(64, _pow2(max(N, K))), BLOCK_C=bc)
    return kept, fused


@triton.jit
def _int8_kernel(x_ptr, q_ptr, s_ptr, C, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    x = tl.load(x_ptr + r * C + c, mask=cm, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.math.div_rn(amax, 127.0)
    y = tl.math.div_rn(x, tl.where(scale > 0.0, scale, 1.0))
    y = tl.where(scale > 0.0, y, 0.0)
    rq = tl.math.floor(y + 0.5)  # round half to even, as torch.round
    rq = tl.where(((rq - y) == 0.5) & ((rq - 2.0 * tl.math.floor(rq * 0.5)) != 0.0), rq - 1.0, rq)
    rq = tl.minimum(tl.maximum(rq, -127.0), 127.0)
    tl.store(q_ptr + r * C + c, rq.to(tl.int8), mask=cm)
    tl.store(s_ptr + r, scale)


def quantize_int8(x: torch.Tensor):
    """``(codes int8, scales float32 (..., 1))``, per token over the last dim."""
    C = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // C if C else 0
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    if rows and C:
        _int8_kernel[(rows,)](xc, codes, scales, C, BLOCK_C=_pow2(C, 1))
    elif rows:
        scales.zero_()
    return codes, scales

"""Kernel-vs-reference measurements for test_summarize_kernels.py, run in a subprocess with
``TRITON_INTERPRET=1`` (CPU) or on a GPU (``--device cuda``): prints one JSON object.

For every op, dtype and shape: the kernel's and the PyTorch path's max abs error (both in the
input dtype) against a float64 computation on the same inputs."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _native_cls(q, k, scale):
    return ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(-1).mean(1).squeeze(1)


def _native_received(q, k, scale):
    B, H, N, _ = q.shape
    return ((q * scale) @ k.transpose(-2, -1)).softmax(-1).sum(2).sum(1) / (H * N)


def _native_fuse(x, w, idx):
    wd = w.to(x.dtype)
    return (wd.unsqueeze(-1) * x).sum(1, keepdim=True) / wd.sum(1)[:, None, None]


def _err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="2,3,17,24;2,3,50,24;1,3,150,24")
    args = ap.parse_args()
    from lapdtr import kernels as K
    from lapdtr import summarize as S
    from lapdtr.kernels import summarize as KS

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    out = {"interpret": KS.INTERPRET, "device": str(dev), "cases": []}
    t0 = time.perf_counter()
    for spec in args.shapes.split(";"):
        B, H, N, D = (int(v) for v in spec.split(","))
        scale = D ** -0.5
        q0 = torch.randn(B, H, N, D, generator=g) * 1.5
        k0 = torch.randn(B, H, N, D, generator=g) * 1.5
        x0 = torch.randn(B, N, H * D, generator=g) * 2.0
        kk = max(1, N // 3)
        idx = torch.stack([torch.randperm(N, generator=g)[:kk].sort().values for _ in range(B)])
        w0 = torch.rand(B, N, generator=g).scatter(1, idx, 0.0)
        for dt in dtypes:
            q, k, x = q0.to(dt).to(dev), k0.to(dt).to(dev), x0.to(dt).to(dev)
            # a strided q, k as the qkv hook gives them: (B, N, 3, H, D) permuted
            qkv = torch.stack([q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)], 2)
            qs, ks = qkv.permute(2, 0, 3, 1, 4)[0], qkv.permute(2, 0, 3, 1, 4)[1]
            truth_c = S.cls_importance_ref(q.double(), k.double(), scale)
            truth_r = S.received_attention_ref(q.double(), k.double(), scale)
            w, ix = w0.to(dev), idx.to(dev)
            truth_f = S.gather_fuse_ref(x.double(), w.double(), ix)[1]
            kept_k, fused_k = K.gather_fuse(x, w, ix)
            kept_r, _ = S.gather_fuse_ref(x, w, ix)
            codes_k, sc_k = K.quantize_int8(x)
            codes_r, sc_r = S.quantize_int8_ref(x)
            case = {
                "shape": [B, H, N, D], "dtype": str(dt).removeprefix("torch."),
                "cls": {"kernel": _err(K.cls_importance(q, k, scale), truth_c),
                        "strided": _err(K.cls_importance(qs, ks, scale), truth_c),
                        "reference": _err(S.cls_importance_ref(q, k, scale), truth_c),
                        "torch": _err(_native_cls(q, k, scale), truth_c)},
                "received": {"kernel": _err(K.received_attention(q, k, scale), truth_r),
                             "strided": _err(K.received_attention(qs, ks, scale), truth_r),
                             "reference": _err(S.received_attention_ref(q, k, scale), truth_r),
                             "torch": _err(_native_received(q, k, scale), truth_r)},
                "fuse": {"kernel": _err(fused_k, truth_f),
                         "reference": _err(S.gather_fuse_ref(x, w, ix)[1], truth_f),
                         "torch": _err(_native_fuse(x, w, ix), truth_f),
                         "kept_equal": bool(torch.equal(kept_k, kept_r))},
                "int8": {"codes_equal": bool(torch.equal(codes_k, codes_r)),
                         "codes_max_diff": int((codes_k.int() - codes_r.int()).abs().max()),
                         "scales_equal": bool(torch.equal(sc_k, sc_r)),
                         "kernel": _err(S.dequantize_int8(codes_k, sc_k), x),
                         "reference": _err(S.dequantize_int8(codes_r, sc_r), x),
                         "bound": float((sc_r / 2).max())},
            }
            out["cases"].append(case)
    # the public ops through the dispatcher (LAPDTR_KERNELS=1), gradients included
    q = q0.double().to(dev).requires_grad_()
    k = k0.double().to(dev).requires_grad_()
    x = x0.float().to(dev).requires_grad_()
    w = w0.float().to(dev).requires_grad_()
    ix = idx.to(dev)
    os.environ["LAPDTR_KERNELS"] = "1"
    kept, fused = S.gather_fuse(x, w, ix)
    (kept.square().sum() + (fused * 3).sum()).backward()
    gx_k, gw_k = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    os.environ["LAPDTR_KERNELS"] = "0"
    kept, fused = S.gather_fuse(x, w, ix)
    (kept.square().sum() + (fused * 3).sum()).backward()
    imp_k = {}
    for mode in ("1", "0"):
        os.environ["LAPDTR_KERNELS"] = mode
        q.grad = k.grad = None
        c = S.cls_importance(q, k)
        r = S.received_attention(q, k)
        ((c * torch.arange(c.shape[1], device=dev)).sum() + (r ** 2).sum()).backward()
        imp_k[mode] = (c.detach(), r.detach(), q.grad.clone(), k.grad.clone())
    out["dispatch"] = {
        "gather_fuse_grad_x": _err(gx_k, x.grad), "gather_fuse_grad_w": _err(gw_k, w.grad),
        "importance_values": max(_err(a, b) for a, b in zip(imp_k["1"][:2], imp_k["0"][:2])),
        "importance_grads": max(_err(a, b) for a, b in zip(imp_k["1"][2:], imp_k["0"][2:])),
    }
    out["wall_s"] = time.perf_counter() - t0
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Triton kernels of lapdtr.kernels against their PyTorch references: under Triton's
interpreter on CPU tensors (a subprocess with TRITON_INTERPRET=1, which Triton reads when the
kernels are defined; this process stays without it), compiled on a GPU where there is one; the
LAPDTR_KERNELS switch; importing lapdtr without Triton.

Tolerance per op and dtype: the kernel's max error against float64 on the same inputs is at most
twice the PyTorch path's in the same dtype, or 8 float32 ulps of the largest value (in float32
both paths differ only in summation order, each a few ulps off)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
SCRIPT = HERE / "summarize_kernel_checks.py"
EPS32 = torch.finfo(torch.float32).eps


def _run(extra_env: dict, *args) -> dict:
    env = {**os.environ, **extra_env}
    env.pop("LAPDTR_KERNELS", None)
    p = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def interpreted():
    res = _run({"TRITON_INTERPRET": "1"})
    assert res["interpret"] is True
    return res


def _tol(case: dict, op: str, top: float = 1.0) -> float:
    return max(2 * case[op]["torch"], 8 * EPS32 * top)


def _check_cases(res: dict) -> list[str]:
    bad = []
    for c in res["cases"]:
        where = f"{c['dtype']} {c['shape']}"
        for op in ("cls", "received", "fuse"):
            # importance values lie in [0, 1]; fused tokens are O(|x|) (x ~ N(0, 2^2))
            tol = _tol(c, op, 1.0 if op != "fuse" else 8.0)
            for path in ("kernel", "strided") if op != "fuse" else ("kernel",):
                if not c[op][path] <= tol:
                    bad.append(f"{op} {path} {where}: error {c[op][path]:.3g} > {tol:.3g} "
                               f"(torch {c[op]['torch']:.3g})")
        if not c["fuse"]["kept_equal"]:
            bad.append(f"gather {where}: kept tokens differ from the reference")
        if not (c["int8"]["codes_equal"] and c["int8"]["scales_equal"]):
            bad.append(f"int8 {where}: codes or scales differ from the reference "
                       f"(max code diff {c['int8']['codes_max_diff']})")
        if not c["int8"]["kernel"] <= c["int8"]["bound"] * (1 + 1e-5):
            bad.append(f"int8 {where}: dequantized error {c['int8']['kernel']:.3g} > scale/2")
    return bad


def test_interpreted_kernels_match_reference(interpreted):
    bad = _check_cases(interpreted)
    worst = {op: max(c[op]["kernel"] for c in interpreted["cases"]) for op in ("cls", "received", "fuse")}
    print(f"\ninterpreted kernels, max abs error vs float64 over dtypes and shapes: {worst}; "
          f"{interpreted['wall_s']:.1f} s")
    assert not bad, "\n".join(bad)


def test_dispatch_forward_and_gradients(interpreted):
    """LAPDTR_KERNELS=1 (kernel forward, reference backward) against LAPDTR_KERNELS=0."""
    d = interpreted["dispatch"]
    assert d["gather_fuse_grad_x"] <= 1e-6 and d["gather_fuse_grad_w"] <= 1e-5, d
    assert d["importance_values"] <= 1e-6 and d["importance_grads"] <= 1e-9, d


@pytest.mark.gpu
def test_compiled_kernels_match_reference():
    res = _run({}, "--device", "cuda", "--shapes", "2,3,17,24;2,3,50,24;1,3,150,24;2,6,197,64")
    assert res["interpret"] is False
    bad = _check_cases(res)
    assert not bad, "\n".join(bad)


def test_kernels_switch(monkeypatch):
    from lapdtr.summarize import cls_importance, dispatch

    if dispatch.triton_can_run("cpu")[0]:
        pytest.skip("this process runs Triton on the CPU (TRITON_INTERPRET=1 at import)")
    q = torch.randn(1, 2, 9, 8)
    monkeypatch.setenv("LAPDTR_KERNELS", "1")
    with pytest.raises(RuntimeError, match=r"LAPDTR_KERNELS=0.*TRITON_INTERPRET=1"):
        cls_importance(q, q)
    monkeypatch.setenv("LAPDTR_KERNELS", "yes")
    with pytest.raises(ValueError, match=r"LAPDTR_KERNELS='yes' is not allowed"):
        cls_importance(q, q)
    monkeypatch.setenv("LAPDTR_KERNELS", "0")
    assert torch.allclose(cls_importance(q, q).sum(1), torch.ones(1))
    monkeypatch.delenv("LAPDTR_KERNELS")
    assert not dispatch.use_kernels(q)  # automatic: the reference where Triton cannot run


_NO_TRITON = r'''
import os, sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoTriton())
import torch, lapdtr, lapdtr.summarize as S, lapdtr.kernels
q = torch.randn(1, 2, 9, 8)
assert torch.allclose(S.received_attention(q, q).sum(1), torch.ones(1))
c = S.BoundaryCodec((9, 8), keep=0.5, wire="int8", num_prefix=1)
assert c.decode(c.encode(q[:, 0], S.cls_importance(q, q))).shape == (1, 1 + 4 + 1, 8)
assert "triton" not in sys.modules and "lapdtr.kernels.summarize" not in sys.modules
os.environ["LAPDTR_KERNELS"] = "1"
try:
    S.cls_importance(q, q)
except RuntimeError as e:
    assert "Triton is not installed" in str(e), e
else:
    raise AssertionError("LAPDTR_KERNELS=1 without Triton did not fail")
print("ok")
'''


def test_import_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("LAPDTR_KERNELS", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, "-c", _NO_TRITON], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]

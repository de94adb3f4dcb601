"""A small DeiT (depth 3, 64 px, informative weights) split after blocks.1: the boundary
summarized by a BoundaryCodec (importance from blocks.1's attention, probed during the stage),
decoded, and run through blocks.2 and the head. Keep 1 reproduces model(x) bit for bit; keep 0.5
changes the output, and stays close; the shorter sequence with ToMe's log(size) bias gives the
dense restore's output (the head reads the class token)."""
import pytest
import timm
import torch

from lapdtr import partition, units
from lapdtr.summarize import AttentionProbe, attention_source, codec_for_unit, importance_kind
from lapdtr.testing import informative_weights_


@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=10).eval()
    informative_weights_(m, seed=0)
    ul = units(m, 64)
    cut = [u.name for u in ul].index("blocks.2")
    first, second = partition(m, [cut], unit_list=ul)
    return m, ul[cut - 1], first, second


def run_split(split, x, *, keep, wire="fp32", restore="tokens", proportional=False):
    m, last, first, second = split
    codec = codec_for_unit(m, last, keep=keep, wire=wire, restore=restore)
    with torch.no_grad(), AttentionProbe(attention_source(m, last), importance_kind(m)) as probe:
        b = first(x)
        packet = codec.encode(b, probe.importance())
    y = codec.decode(packet)
    with torch.no_grad():
        bias = codec.attn_bias(dtype=y.dtype) if proportional else None
        y = m.blocks[2](y, attn_mask=bias) if bias is not None else second.units[0].fn(m, y)
        out = second.units[1].fn(m, y)
    return out, codec, packet


@pytest.mark.parametrize("restore", ["tokens", "dense"])
def test_keep_one_is_exact(split, restore):
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = split[0](x)
    out, codec, packet = run_split(split, x, keep=1.0, restore=restore)
    assert torch.equal(out, want)
    assert codec.nbytes(4) == codec.dense_nbytes(4) and len(packet) == 1


def test_keep_half_is_close(split):
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        want = split[0](x)
    scale = want.abs().max()
    rows, outs = [], {}
    for wire in ("fp32", "fp16", "int8"):
        for restore, prop in (("tokens", False), ("tokens", True), ("dense", False)):
            out, codec, _ = run_split(split, x, keep=0.5, wire=wire, restore=restore,
                                      proportional=prop)
            outs[wire, restore, prop] = out
            rel = float((out - want).abs().max() / scale)
            agree = float((out.argmax(1) == want.argmax(1)).float().mean())
            rows.append((wire, restore + ("+log(size)" if prop else ""), rel, agree,
                         codec.nbytes(1) / codec.dense_nbytes(1)))
            assert not torch.equal(out, want)
            assert rel < 0.5, rows[-1]
    for wire in ("fp32", "fp16", "int8"):
        # ToMe: log(size) on the fused key is attention over the dense grid, where the fused
        # token stands at every dropped position; the head reads the class token only
        torch.testing.assert_close(outs[wire, "tokens", True], outs[wire, "dense", False],
                                   rtol=1e-4, atol=1e-5 * float(scale))
    print("\nkeep 0.5 after blocks.1 of deit-tiny depth 3 (64 px): wire, restore, "
          "max|out - model(x)| / max|model(x)|, top-1 agreement, bytes / fp32")
    for r in rows:
        print(f"  {r[0]:5s} {r[1]:17s} {r[2]:.4f} {r[3]:.2f} {r[4]:.3f}")

"""Wire formats (fp32 / fp16 / bf16 / int8 per-token) with their error bounds, the exact bytes
of a packet and of its pack_packet message, and BoundaryCodec round trips for every keep ratio,
wire format, layout and restore rule."""
import itertools

import pytest
import torch

from lapdtr.runtime.wire import pack_packet, unpack_packet
from lapdtr.summarize import (WIRE_FORMATS, BoundaryCodec, decode_tensor, encode_tensor,
                              nbytes, packet_nbytes, quantize_int8, restore_dense, summarize)

REL = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def test_float_formats_error_bounds():
    x = torch.randn(3, 20, 16) * 10
    (p,) = encode_tensor(x, "fp32")
    assert p is x  # no copy, bit for bit
    for wire, rel in REL.items():
        parts = encode_tensor(x, wire)
        assert len(parts) == 1 and parts[0].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[wire]
        y = decode_tensor(parts, wire)
        assert y.dtype == torch.float32
        assert ((y - x).abs() <= rel * x.abs()).all(), wire


def test_int8_per_token():
    x = torch.randn(2, 7, 33) * torch.logspace(-3, 3, 7)[None, :, None]
    x[1, 3] = 0.0  # a token of zeros
    codes, scales = encode_tensor(x, "int8")
    assert codes.dtype == torch.int8 and scales.shape == (2, 7, 1) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, x.abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    assert codes.abs().amax(-1)[x.abs().amax(-1) > 0].eq(127).all()
    assert codes[1, 3].eq(0).all() and scales[1, 3].eq(0).all()
    y = decode_tensor((codes, scales), "int8")
    assert ((y - x).abs() <= scales / 2 * (1 + 1e-6)).all()
    assert y[1, 3].eq(0).all()
    with pytest.raises(ValueError, match="floating tensor"):
        quantize_int8(torch.ones(3, dtype=torch.int64))


def test_packet_bytes_exact():
    packets = [(torch.randn(2, 5),), (torch.randn(1, 7, 3).half(), torch.arange(3, dtype=torch.int16)),
               (torch.zeros(2, 3, 4, dtype=torch.int8), torch.rand(2, 3, 1), torch.zeros(2, 1, dtype=torch.int32))]
    for p in packets:
        assert nbytes(p) == sum(t.numel() * t.element_size() for t in p)
        raw = pack_packet(p)
        assert packet_nbytes(p) == raw.numel()
        for a, b in zip(unpack_packet(raw), p):
            assert torch.equal(a, b)


CASES = [
    # (shape, layout, num_prefix, restore)
    ((17, 24), "tokens", 1, "tokens"),
    ((17, 24), "tokens", 1, "dense"),
    ((12, 5, 6), "map", 0, "dense"),
    ((5, 6, 12), "map_nhwc", 0, "dense"),
]


@pytest.mark.parametrize("case,keep,wire", list(itertools.product(CASES, [1.0, 0.5, 0.1],
                                                                  WIRE_FORMATS)))
def test_codec_round_trip(case, keep, wire):
    shape, layout, prefix, restore = case
    c = BoundaryCodec(shape, keep=keep, wire=wire, layout=layout, num_prefix=prefix,
                      restore=restore)
    B = 3
    x = torch.randn(B, *shape) * 3
    imp = torch.rand(B, c.n_tokens)
    packet = c.encode(x, imp)
    assert [(t.dtype, tuple(t.shape)) for t in packet] == c.packet_specs(B)
    assert nbytes(packet) == c.nbytes(B)
    raw = pack_packet(packet)
    assert raw.numel() == c.packet_nbytes(B)
    y = c.decode(unpack_packet(raw))
    assert torch.equal(y, c.decode(packet))
    assert tuple(y.shape) == (B, *c.out_shape()) and y.dtype == torch.float32
    if keep == 1.0:
        assert not c.summarizes and c.nbytes(B) <= c.dense_nbytes(B) + 4 * B * c.n_tokens
        if wire == "fp32":
            assert packet[0] is x and torch.equal(y, x)
        else:
            bound = (x.abs() * REL[wire]) if wire in REL else None
            if bound is not None:
                assert ((y - x).abs() <= bound).all()
        return
    assert c.summarizes and c.nbytes(B) < c.dense_nbytes(B)
    # what decode restores equals restoring the fp32 summary, to the wire's error
    from lapdtr.summarize import map_to_tokens, tokens_to_map
    s = summarize(map_to_tokens(x, layout), imp, keep, num_prefix=prefix)
    if restore == "tokens":
        want = torch.cat([s.prefix, s.kept, s.fused], 1)
    else:
        want = tokens_to_map(restore_dense(s), layout, c.hw)
    err = (y - want).abs().max()
    tol = {"fp32": 0.0, "fp16": 2 ** -11, "bf16": 2 ** -8, "int8": 1 / 254}[wire]
    assert err <= tol * want.abs().max() * (1 + 1e-5), (err, wire)
    if restore == "tokens":
        bias = c.attn_bias()
        assert bias.shape == (1, 1, 1, c.out_shape()[0]) and bias[0, 0, 0, -1] > 0
    assert c.summary(packet).indices.dtype == torch.int64


def test_codec_bytes_shrink_with_keep_and_wire():
    sizes = {(keep, wire): BoundaryCodec((197, 384), keep=keep, wire=wire, num_prefix=1).nbytes()
             for keep in (1.0, 0.5, 0.25) for wire in WIRE_FORMATS}
    dense = 197 * 384 * 4
    assert sizes[(1.0, "fp32")] == dense
    assert sizes[(1.0, "fp16")] == dense // 2
    assert sizes[(1.0, "int8")] == 197 * 384 + 197 * 4
    k = round(0.25 * 196)
    assert sizes[(0.25, "fp32")] == (1 + k + 1) * 384 * 4 + k * 2  # int16 indices
    assert sizes[(0.25, "int8")] < 0.08 * dense


def test_codec_errors():
    with pytest.raises(ValueError, match=r"keep ratio 0 .* \(0, 1\]"):
        BoundaryCodec((17, 8), keep=0)
    with pytest.raises(ValueError, match="wire format 'fp8' is not supported; supported: fp32, fp16, bf16, int8"):
        BoundaryCodec((17, 8), wire="fp8")
    with pytest.raises(ValueError, match="restore rule 'grid' is not supported; supported: tokens, dense"):
        BoundaryCodec((17, 8), restore="grid")
    with pytest.raises(ValueError, match=r"takes the full grid, not fewer tokens: keep=0.5 needs restore='dense'"):
        BoundaryCodec((4, 3, 3), keep=0.5, layout="map")
    BoundaryCodec((4, 3, 3), keep=1.0, layout="map")  # keep 1 needs no restore rule
    with pytest.raises(ValueError, match="per-item shape of 2 positive dims"):
        BoundaryCodec((4, 3, 3))
    c = BoundaryCodec((17, 8), keep=0.5, num_prefix=1)
    with pytest.raises(ValueError, match=r"takes \[B, 17, 8\] \(tokens\)"):
        c.encode(torch.randn(1, 16, 8), torch.rand(1, 16))
    with pytest.raises(ValueError, match="needs their importance"):
        c.encode(torch.randn(1, 17, 8))
    other = BoundaryCodec((17, 8), keep=0.5, wire="fp16", num_prefix=1)
    with pytest.raises(ValueError, match=r"is not one of this codec's"):
        c.decode(other.encode(torch.randn(1, 17, 8), torch.rand(1, 17)))

"""Planning with summarized boundaries: boundary bytes priced at a keep ratio and wire format
(the codec's exact payload), unchanged at keep 1 / fp32, cuts that move where summarization
pays, stage keep ratios and meta stamped, and errors that name what is allowed."""
import pytest
import torch

import lapdtr
from lapdtr.models import units
from lapdtr.plan import (PIPELINE_STRATEGIES, create_plan, plan_summarized, price_boundaries,
                         summarized_profile)
from lapdtr.plan.cli import main
from lapdtr.profile import DeviceProfile, LinkProfile, profile_model
from lapdtr.summarize import codec_for_unit, packet_nbytes
from lapdtr.summarize.wire import nbytes as payload_nbytes

pytestmark = pytest.mark.filterwarnings("ignore::lapdtr.plan.IdleRanksWarning")

BATCH = 2  # boundary bytes scale with the profile's batch


@pytest.fixture(scope="module")
def deit():
    """deit_tiny at 64 px, 6 blocks: 1 class + 16 patch tokens of 192 channels per boundary."""
    m = lapdtr.create_model("deit_tiny_patch16_224", img_size=64, depth=6).eval()
    prof = profile_model(m, img_size=64, batch_size=BATCH, repeats=1, warmup=0, use_cache=False)
    return m, units(m, 64), prof


def _devices(*, epb=1e-7, mem=0, power=(10.0, 5.0)):
    """Two devices over a slow link (1 MB/s); ``power`` makes a FLOP cost more on the first."""
    return [DeviceProfile(n, kind="simulated", gflops=100.0, power_active_w=p,
                          energy_per_byte_j=epb, memory_bytes=mem,
                          links=[LinkProfile("*", 1e6, 1e-3)]) for n, p in zip("ab", power)]


def _cuts(plan):
    return [s.units[-1] for s in plan.stages[:-1]]


def _comm(plan):
    return sum(p.bytes_sent for p in plan.predictions), \
        sum(p.comm_energy_j for p in plan.predictions)


def test_keep_1_fp32_leaves_profile_and_plan_unchanged(deit):
    m, ul, prof = deit
    assert summarized_profile(prof, m, ul, keep=1.0, wire="fp32").to_dict() == prof.to_dict()
    assert summarized_profile(prof, m, ul, keep={"blocks.2": 1.0}).to_dict() == prof.to_dict()
    assert all(b.bytes == b.profiled_bytes and not b.summarizes
               for b in price_boundaries(prof, m, ul))
    devs = _devices()
    for strategy, objective in (("sequential", "energy"), ("lapdtr", "max-device-energy")):
        want = create_plan(prof, devs, strategy=strategy, objective=objective)
        got = plan_summarized(prof, devs, m, ul, strategy=strategy, objective=objective)
        assert [s.__dict__ for s in got.stages] == [s.__dict__ for s in want.stages]
        assert [p.__dict__ for p in got.predictions] == [p.__dict__ for p in want.predictions]
        assert got.meta["wire"] == "fp32" and all(s.keep_ratio == 1.0 for s in got.stages)


@pytest.mark.parametrize("keep, wire", [(0.25, "fp32"), (0.25, "int8"), (0.5, "fp16"),
                                        (1.0, "bf16"), (1.0, "int8")])
def test_priced_bytes_are_the_codec_payload(deit, keep, wire):
    m, ul, prof = deit
    bounds = price_boundaries(prof, m, ul, keep=keep, wire=wire)
    sp = summarized_profile(prof, m, ul, keep=keep, wire=wire, boundaries=bounds)
    assert [b.unit for b in bounds] == [u.name for u in ul[:-1]]
    for i, b in enumerate(bounds):
        # the embed's output has no attention source: every token, in the wire format
        k = 1.0 if ul[i].name == "embed" else keep
        codec = codec_for_unit(m, ul[i], keep=k, wire=wire)
        x = torch.randn(BATCH, *codec.shape)
        packet = codec.encode(x, torch.rand(BATCH, codec.n_tokens))
        assert b.bytes == codec.nbytes(BATCH) == payload_nbytes(packet)
        assert sp.units[i].out_bytes == sp.units[i + 1].in_bytes == b.bytes
        assert b.summarizes == (k < 1.0) and b.keep == k and b.wire == wire
        assert b.profiled_bytes == prof.units[i + 1].in_bytes == 4 * BATCH * 17 * 192
        assert packet_nbytes(packet) >= b.bytes  # headers not priced, said in the meta
    # FLOPs, latency, memory as profiled (conservative); the input and output are not boundaries
    for a, u in zip(sp.units, prof.units):
        assert (a.flops, a.latency_s, a.peak_bytes, a.param_bytes) == \
            (u.flops, u.latency_s, u.peak_bytes, u.param_bytes)
    assert sp.units[0].in_bytes == prof.units[0].in_bytes
    assert sp.units[-1].out_bytes == prof.units[-1].out_bytes
    if keep == 0.25:  # 1 class + 4 kept + 1 fused tokens, int16 positions of the 4
        elt, scales = (1, 4) if wire == "int8" else (4, 0)
        assert bounds[1].bytes == BATCH * (6 * 192 * elt + 6 * scales + 4 * 2)


def test_the_cut_moves_to_a_summarized_boundary(deit):
    """Rank 0 runs the first stage (sequential), a FLOP costs twice as much there, the link is
    slow: unsummarized the cut is right after the embed; at keep 0.25 the embed's output (no
    attention source) costs full bytes, so the cut moves one block on, where it is summarized."""
    m, ul, prof = deit
    devs = _devices(epb=1e-7)
    kw = dict(strategy="sequential", objective="energy")
    base = plan_summarized(prof, devs, m, ul, **kw)
    summ = plan_summarized(prof, devs, m, ul, keep=0.25, wire="fp32", **kw)
    assert _cuts(base) == ["embed"] and _cuts(summ) == ["blocks.0"]
    (b0, e0), (b1, e1) = _comm(base), _comm(summ)
    assert b0 == BATCH * 17 * 192 * 4 and b1 == BATCH * (6 * 192 * 4 + 4 * 2)
    assert e1 < e0 and summ.meta["total_energy_j"] < base.meta["total_energy_j"]
    assert [s.keep_ratio for s in summ.stages] == [0.25, 1.0]  # the output stage keeps 1
    assert summ.meta["wire"] == "fp32"
    meta = summ.meta["summarization"]
    assert list(meta["boundaries"]) == ["blocks.0"] and meta["boundaries"]["blocks.0"]["bytes"] == b1
    assert "not credited" in meta["flops_priced"]
    # the unsummarized plan priced on the summarized profile at the old cut costs more
    sp = summarized_profile(prof, m, ul, keep=0.25)
    at_old = create_plan(sp, devs, **kw)
    assert _cuts(at_old) == ["blocks.0"]
    # int8 at keep 0.25 shrinks the embed's output too (every token): the cut stays put
    q = plan_summarized(prof, devs, m, ul, keep=0.25, wire="int8", **kw)
    assert _cuts(q) == ["embed"] and [s.keep_ratio for s in q.stages] == [1.0, 1.0]
    assert _comm(q)[0] == BATCH * (17 * 192 + 17 * 4) and q.meta["wire"] == "int8"


def test_keep_per_boundary_moves_the_balanced_cut(deit):
    """Two equal devices, memory for ~60 % of the model each: the balanced cut is after
    blocks.2; summarizing only blocks.1's output (dict keep) moves it there."""
    m, ul, prof = deit
    devs = _devices(epb=1e-6, mem=9_000_000, power=(10.0, 10.0))
    kw = dict(strategy="lapdtr", objective="max-device-energy")
    base = plan_summarized(prof, devs, m, ul, **kw)
    one = plan_summarized(prof, devs, m, ul, keep={"blocks.1": 0.25}, **kw)
    assert _cuts(base) == ["blocks.2"] and _cuts(one) == ["blocks.1"]
    assert one.meta["max_device_energy_j"] < base.meta["max_device_energy_j"]
    assert [s.keep_ratio for s in one.stages] == [0.25, 1.0]
    assert _comm(one)[0] < _comm(base)[0]


def test_maps_are_priced_in_the_wire_format_only(tmp_path):
    m = lapdtr.create_model("resnet10t", img_size=32).eval()
    ul = units(m, 32)
    prof = profile_model(m, img_size=32, repeats=1, warmup=0, use_cache=False)
    half = price_boundaries(prof, m, ul, wire="fp16")
    maps = [b for b, u in zip(half, ul) if u.out_format == "map"]
    assert maps and all(b.bytes * 2 == b.profiled_bytes and b.wire == "fp16" for b in maps)
    for b, u in zip(price_boundaries(prof, m, ul, wire="int8"), ul):
        if u.out_format == "map":
            codec = codec_for_unit(m, u, wire="int8")
            assert b.bytes == codec.nbytes(1) == payload_nbytes(codec.encode(
                torch.randn(1, *codec.shape)))
        else:  # no codec takes it: the profiled bytes stand
            assert b.wire == "raw" and b.bytes == b.profiled_bytes
    with pytest.raises(ValueError, match=r"keep 0.5 needs a boundary .*'resnet10t' \(resnet\) "
                                         r"has none.*Allowed for it: keep 1.0.*attention source: "
                                         r"vit"):
        price_boundaries(prof, m, ul, keep=0.5)


def test_errors_name_what_is_allowed(deit):
    m, ul, prof = deit
    devs = _devices()
    for keep in (0.0, 1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
            plan_summarized(prof, devs, m, ul, keep=keep)
    with pytest.raises(ValueError, match="wire format 'int4' is not supported; allowed: fp32, "
                                         "fp16, bf16, int8"):
        plan_summarized(prof, devs, m, ul, wire="int4")
    with pytest.raises(ValueError, match=r"keep names unit\(s\) \['blocks.9'\].*blocks.0"):
        price_boundaries(prof, m, ul, keep={"blocks.9": 0.5})
    with pytest.raises(ValueError, match=r"keep names unit\(s\) \['head'\]"):
        price_boundaries(prof, m, ul, keep={"head": 0.5})  # the output is no boundary
    with pytest.raises(ValueError, match=r"keep < 1 after \['embed'\]: unit 'embed' .*has no "
                                         r"attention.*allowed: keep 1.0 there"):
        price_boundaries(prof, m, ul, keep={"embed": 0.5})
    with pytest.raises(ValueError, match="pipeline plans only; strategy 'horizontal'.*"
                                         + ", ".join(PIPELINE_STRATEGIES)):
        plan_summarized(prof, devs, m, ul, wire="fp16", strategy="horizontal")
    with pytest.raises(ValueError, match="are not the profile's"):
        price_boundaries(prof, m, ul[:-1], keep=0.5)


DEVICES = """\
devices:
  - {name: cam, kind: cpu, gflops: 50, memory: 1GiB, power_active_w: 10.0,
     energy_per_byte_j: 1.0e-7}
  - {name: hub, kind: cpu, gflops: 50, memory: 1GiB, power_active_w: 5.0,
     energy_per_byte_j: 1.0e-7}
default_link: {bandwidth: 8Mbps, latency_ms: 1}
"""


def test_plan_command_keep_and_wire(tmp_path, capsys):
    import os

    dev = tmp_path / "devices.yaml"
    dev.write_text(DEVICES)
    base = ["--model", "deit_tiny_patch16_224", "--img-size", "64", "--devices", str(dev),
            "--cache-dir", os.path.join(os.environ["LAPDTR_CACHE"], "profiles"),
            "--strategy", "sequential"]
    out0, out1 = tmp_path / "k1", tmp_path / "k25"
    assert main(["plan", *base, "--out", str(out0)]) == 0
    assert "priced summarized" not in capsys.readouterr().out
    assert main(["plan", *base, "--keep", "0.25", "--out", str(out1)]) == 0
    text = capsys.readouterr().out
    from lapdtr.plan import Plan

    p0, p1 = Plan.load(out0 / "plan.json"), Plan.load(out1 / "plan.json")
    assert "wire" not in p0.meta and all(s.keep_ratio == 1.0 for s in p0.stages)
    assert _cuts(p0) == ["embed"] and _cuts(p1) == ["blocks.0"]
    assert [s.keep_ratio for s in p1.stages] == [0.25, 1.0] and p1.meta["wire"] == "fp32"
    assert p1.meta["total_energy_j"] < p0.meta["total_energy_j"]
    assert "after blocks.0: keep 0.25, fp32, 4616 B (profiled 13056 B)" in text
    for extra, msg in ((["--keep", "2"], r"must lie in (0, 1]"),
                       (["--keep", "most"], "allowed: a ratio in (0, 1]"),
                       (["--wire", "int4"], "allowed: fp32, fp16, bf16, int8"),
                       (["--wire", "int8", "--width", "auto"], "not supported; allowed: a fixed"),
                       (["--keep", "0.5", "--strategy", "data"], "pipeline plans only")):
        assert main(["plan", *base, *extra]) == 2
        assert msg in capsys.readouterr().err
    res = ["--model", "resnet18", "--img-size", "32", "--devices", str(dev), "--cache-dir",
           os.path.join(os.environ["LAPDTR_CACHE"], "profiles"), "--keep", "0.5"]
    assert main(["plan", *res]) == 2
    assert "'resnet18' (resnet) has none" in capsys.readouterr().err

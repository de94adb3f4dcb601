"""Summarized boundaries in a pipeline run: the worker's chain arms the attention probe of each
stage's last block, encodes its output with the stage's keep ratio and the run's wire format,
and the next rank decodes the packet; outputs match the same summarization done in one process,
and the report's per-boundary bytes are the codec's exact packet bytes."""
import pytest
import torch
from safetensors.torch import load_file

import lapdtr
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.prepare import prepare, request_input
from lapdtr.runtime.wire import pack_packet
from lapdtr.summarize import AttentionProbe, attention_source, codec_for_unit, importance_kind
from lapdtr.testing import assert_close_scaled

from runtime_helpers import informative_checkpoint, load_outputs

KW = {"depth": 4}
MODEL = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("summarize-ckpt")
    return informative_checkpoint(d / "deit4.safetensors", MODEL, KW)


def _cfg(tmp_path, ckpt, **kw):
    base = dict(model=MODEL, model_kwargs=KW, world_size=2, cuts=[2], requests=3, batch_size=2,
                out=str(tmp_path), save_outputs=True, plots=False, checkpoint=ckpt)
    base.update(kw)
    return RunConfig(**base)


def _model(ckpt):
    m = lapdtr.create_model(MODEL, **KW)
    m.load_state_dict(load_file(ckpt))
    return m.eval()


def _summarized(m, x, cuts, settings):
    """The model split at ``cuts`` (unit indices), boundary ``i`` encoded and decoded at
    ``settings[i] = (keep, wire)`` in this process; also each boundary's packet bytes."""
    ul = lapdtr.units(m, 224)
    bounds = [0, *cuts, len(ul)]
    sizes = []
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            keep, wire = settings[i] if i < len(cuts) else (1.0, "fp32")
            probe = AttentionProbe(attention_source(m, ul[b - 1]), importance_kind(m)) \
                if keep < 1.0 else None
            for u in ul[a:b]:
                x = u.fn(m, x)
            if i < len(cuts):
                codec = lapdtr.summarize.BoundaryCodec(tuple(x.shape[1:]), keep=keep, wire=wire,
                                                       num_prefix=m.num_prefix_tokens)
                packet = codec.encode(x, probe.importance() if probe else None)
                if probe:
                    probe.remove()
                sizes.append(pack_packet(packet).numel() if len(packet) > 1 else
                             packet[0].numel() * packet[0].element_size())
                x = codec.decode(packet)
    return x, sizes


def test_keep_one_fp32_is_exact_through_the_runtime(tmp_path, ckpt):
    cfg = _cfg(tmp_path, ckpt, summarize={"keep": 1.0, "wire": "fp32"})
    r = run(cfg, timeout_s=200)
    assert r.completed == 3
    outs = load_outputs(cfg.out)
    m = _model(ckpt)
    for q in range(3):
        with torch.no_grad():
            want = m(request_input(cfg.seed, q, 2, 224))
        assert torch.equal(outs[f"request{q}"], want), q
    (b,) = [b for k in r.ranks for b in k.boundaries.values()]
    assert b["payload_bytes"] == b["dense_fp32_bytes"] == 3 * 2 * 197 * 192 * 4


@pytest.mark.parametrize("world,cuts,keep,wire", [
    (2, [2], 0.5, "fp16"),
    (3, ["blocks.1", "blocks.3"], {"blocks.1": 0.5, "blocks.3": 0.25}, "int8"),
])
def test_summarized_run_matches_the_same_summary_in_one_process(tmp_path, ckpt, world, cuts,
                                                                 keep, wire):
    cfg = _cfg(tmp_path, ckpt, world_size=world, cuts=cuts, summarize={"keep": keep,
                                                                       "wire": wire})
    r = run(cfg, timeout_s=300)
    assert r.completed == 3 and r.lost == 0
    m = _model(ckpt)
    ul = lapdtr.units(m, 224)
    cuts = [[u.name for u in ul].index(c) if isinstance(c, str) else c for c in cuts]
    keeps = [keep.get(ul[c].name, 1.0) if isinstance(keep, dict) else keep for c in cuts]
    stages = sorted(r.plan["stages"], key=lambda s: s["index"])
    assert [s["keep_ratio"] for s in stages] == [*keeps, 1.0]
    outs = load_outputs(cfg.out)
    sizes = []
    for q in range(3):
        x = request_input(cfg.seed, q, 2, 224)
        want, sizes = _summarized(m, x, cuts, [(k, wire) for k in keeps])
        with torch.no_grad():
            full = m(x)
        assert_close_scaled(outs[f"request{q}"], want, msg=f"request{q}")
        # the summary is not a no-op: the unsummarized model's logits differ
        assert (want - full).abs().max() > 1e-3 * full.abs().max()
    sent = {u: b for k in r.ranks for u, b in k.boundaries.items()}
    assert sorted(sent) == sorted(ul[c - 1].name for c in cuts)
    for c, k, size in zip(cuts, keeps, sizes):
        b = sent[ul[c - 1].name]
        assert b["items"] == 3 and b["keep"] == k and b["wire"] == wire
        assert b["bytes"] == 3 * size, (c, b)  # exact: the codec's packet, as packed
        assert b["dense_fp32_bytes"] == 3 * 2 * 197 * 192 * 4  # the model's, unsummarized
        codec = codec_for_unit(m, ul[c - 1], keep=k, wire=wire)
        if c == cuts[0]:
            assert b["payload_bytes"] == 3 * codec.nbytes(2)
            assert b["tokens"] == m.num_prefix_tokens + codec.k + 1
    assert f"boundary after {ul[cuts[0] - 1].name} (r0): keep {keeps[0]:g} {wire}, 3 items, " \
        f"{3 * sizes[0]} bytes sent" in lapdtr.runtime.format_report(r)


def test_bad_summarize_settings_name_what_is_allowed(tmp_path, ckpt):
    with pytest.raises(ValueError, match=r"summarize.keep: .*\(0, 1\]"):
        _cfg(tmp_path, ckpt, summarize={"keep": 1.5}).validate()
    with pytest.raises(ValueError, match=r"summarize: unknown key\(s\) \['ratio'\]; allowed"):
        _cfg(tmp_path, ckpt, summarize={"ratio": 0.5}).validate()
    with pytest.raises(ValueError, match=r"summarize.wire: .*fp8.*fp32, fp16, bf16, int8"):
        _cfg(tmp_path, ckpt, summarize={"wire": "fp8"}).validate()
    # a cut after the embedding: no attention ranks its tokens
    with pytest.raises(ValueError, match=r"after unit 'embed', but the next stage cannot take "
                                         r"fewer tokens .*blocks.0 .. blocks.3"):
        prepare(_cfg(tmp_path, ckpt, cuts=[1], summarize={"keep": 0.5}).validate(), 2)
    with pytest.raises(ValueError, match=r"summarize.keep: \['blocks.3'\] are not cuts of the "
                                         r"plan; its cuts .*: \['blocks.1'\]"):
        prepare(_cfg(tmp_path, ckpt, summarize={"keep": {"blocks.3": 0.5}}).validate(), 2)
    # a CNN has no attention source
    with pytest.raises(ValueError, match=r"the resnet adapter offers no attention source .*vit"):
        prepare(RunConfig(model="resnet18", world_size=2, cuts=[2], requests=1, out=str(tmp_path),
                          plots=False, img_size=64, summarize={"keep": 0.5}).validate(), 2)
    # a plan whose last stage (the logits) is summarized
    from lapdtr.plan.types import Plan

    cfg = _cfg(tmp_path, ckpt)
    plan = prepare(cfg.validate(), 2)["plan"]
    plan["stages"][-1]["keep_ratio"] = 0.5
    Plan.from_dict(plan).save(tmp_path / "p.json")
    with pytest.raises(ValueError, match=r"stage 1 is the last .* asks keep_ratio=0.5; allowed "
                                         r"there: 1.0"):
        prepare(_cfg(tmp_path, ckpt, cuts=None, plan=str(tmp_path / "p.json")).validate(), 2)


def test_a_rank_killed_mid_run_resumes_summarized_packets(tmp_path, ckpt):
    """Rank 1 of three is killed at request 1: items resume from the summarized packets the
    survivors cached (decoded by the new owner as they were encoded), and the re-plan keeps
    summarizing where its cuts allow (its stages' keep ratios carried over)."""
    from lapdtr.runtime import FaultSpec

    cfg = _cfg(tmp_path, ckpt, world_size=3, cuts=[2, 4], requests=4, heartbeat_timeout_s=1.5,
               summarize={"keep": 0.5, "wire": "fp16"}, faults=[FaultSpec("kill", 1, 1)])
    r = run(cfg, timeout_s=300)
    assert r.completed == 4 and r.lost == 0 and r.duplicates == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1])]
    stages = sorted(r.plan["stages"], key=lambda s: s["index"])
    assert {s["rank"] for s in stages} <= {0, 2}
    m = _model(ckpt)
    names = [u.name for u in lapdtr.units(m, 224)]
    old = {2: 0.5, 4: 0.5}
    new = {names.index(s["units"][-1]) + 1: s["keep_ratio"] for s in stages[:-1]}
    assert any(k == 0.5 for k in new.values())  # the re-plan still summarizes
    resumed = {int(k): v[0] for k, v in r.replans[0].resume_points.items()}
    outs = load_outputs(cfg.out)
    for q in range(4):
        x = request_input(cfg.seed, q, 2, 224)
        with torch.no_grad():
            full = m(x)
        # each item ran under the first plan, the re-plan, or the first up to where it resumed
        mixes = [old, new]
        if q in resumed:
            u = resumed[q]
            mixes.append({**{c: k for c, k in old.items() if c <= u},
                          **{c: k for c, k in new.items() if c > u}})
        errs = []
        for mix in mixes:
            cuts = sorted(mix)
            want = _summarized(m, x, cuts, [(mix[c], "fp16") for c in cuts])[0]
            errs.append(float((outs[f"request{q}"] - want).abs().max()))
        assert min(errs) <= 1e-3 * float(full.abs().max()), (q, errs, mixes)


@pytest.mark.parametrize("wire", ["fp32", "fp16", "int8"])
def test_a_summarized_map_decodes_to_the_full_grid(wire):
    """A map boundary (hierarchical models): the receiver gets the full grid back, kept tokens at
    their places and the fused token elsewhere, as the library's dense restore gives it."""
    from lapdtr.runtime.steps import Packet
    from lapdtr.runtime.summary import SummaryCodec

    m = lapdtr.create_model("resnet18").eval()
    ul = lapdtr.units(m, 64)
    cut = next(i for i, u in enumerate(ul) if u.out_format == "map" and i > 0) + 1
    codec = SummaryCodec(m, ul, wire)
    x = torch.randn(2, *ul[cut - 1].out_shape[1:])
    imp = torch.rand(2, x.shape[2] * x.shape[3])

    class Probe:  # the importance an attention source would give
        def importance(self):
            return imp

    codec._probes[cut - 1] = Probe()
    packet = codec.encode(x, unit=cut, keep=0.25)
    ref = lapdtr.summarize.BoundaryCodec(tuple(x.shape[1:]), keep=0.25, wire=wire, layout="map",
                                         restore="dense")
    assert [tuple(t.shape) for t in packet.tensors] == [s for _, s in ref.packet_specs(2)]
    got = codec.decode(Packet(tuple(packet.tensors)), unit=cut)
    assert got.shape == x.shape and torch.equal(got, ref.decode(ref.encode(x, imp)))
    # every token kept, int8: the map again, not its tokens
    full = codec.decode(codec.encode(x, unit=cut, keep=1.0), unit=cut)
    assert full.shape == x.shape


def test_a_plan_priced_summarized_runs_as_planned(tmp_path, ckpt):
    """A plan carrying keep ratios and a wire format (``lapdtr plan --keep 0.5 --wire int8``
    writes them; no ``summarize`` block in the run config): the run summarizes as planned."""
    from lapdtr.plan.types import Plan

    plan = prepare(_cfg(tmp_path, ckpt).validate(), 2)["plan"]
    plan["stages"][0]["keep_ratio"] = 0.5
    plan["meta"]["wire"] = "int8"
    Plan.from_dict(plan).save(tmp_path / "p.json")
    cfg = _cfg(tmp_path / "run", ckpt, cuts=None, plan=str(tmp_path / "p.json"), requests=2)
    r = run(cfg, timeout_s=200)
    assert r.completed == 2
    m = _model(ckpt)
    ul = lapdtr.units(m, 224)
    (b,) = [b for k in r.ranks for b in k.boundaries.values()]
    assert (b["keep"], b["wire"]) == (0.5, "int8")
    assert b["payload_bytes"] == 2 * codec_for_unit(m, ul[1], keep=0.5, wire="int8").nbytes(2)
    outs = load_outputs(cfg.out)
    for q in range(2):
        x = request_input(cfg.seed, q, 2, 224)
        assert_close_scaled(outs[f"request{q}"], _summarized(m, x, [2], [(0.5, "int8")])[0])
    # a wire format alone (keep 1 everywhere) is honoured too, not dropped for the identity
    plan["stages"][0]["keep_ratio"] = 1.0
    Plan.from_dict(plan).save(tmp_path / "p.json")
    r = run(_cfg(tmp_path / "run2", ckpt, cuts=None, plan=str(tmp_path / "p.json"), requests=1),
            timeout_s=200)
    (b,) = [b for k in r.ranks for b in k.boundaries.values()]
    assert b["wire"] == "int8" and b["payload_bytes"] < b["dense_fp32_bytes"] / 3


@pytest.mark.parametrize("world,cuts,keep,wire", [(2, ["blocks.2"], 0.25, "int8"),
                                                  (3, ["blocks.1", "blocks.2"], 0.5, "fp16")])
def test_a_summarized_rope_eva_runs_dense_through_the_runtime(tmp_path, world, cuts, keep, wire):
    """A DINOv3-style Eva (RoPE, class and 4 register tokens) with summarized boundaries: each
    rank ranks its tokens by its last block's rotated attention, the next rank restores the full
    sequence (the kept tokens keep their rotation); outputs match the same summary in one
    process, bytes are the codec's."""
    from lapdtr.summarize import summarized_forward

    name, kw = "vit_small_patch16_dinov3", {"depth": 3, "num_classes": 10}
    ck = informative_checkpoint(tmp_path / "eva.safetensors", name, kw, img_size=64)
    cfg = RunConfig(model=name, model_kwargs=kw, img_size=64, world_size=world, cuts=cuts,
                    requests=2, batch_size=2, out=str(tmp_path / "run"), save_outputs=True,
                    plots=False, checkpoint=ck, summarize={"keep": keep, "wire": wire})
    r = run(cfg, timeout_s=300)
    assert r.completed == 2 and r.lost == 0
    m = lapdtr.create_model(name, img_size=64, **kw)
    m.load_state_dict(load_file(ck))
    m.eval()
    ul = lapdtr.units(m, 64)
    outs = load_outputs(cfg.out)
    for q in range(2):
        x = request_input(cfg.seed, q, 2, 64)
        with torch.no_grad():
            want = summarized_forward(m, cuts, x, [(keep, wire)] * len(cuts), unit_list=ul)
            full = m(x)
        assert_close_scaled(outs[f"request{q}"], want, msg=f"request{q}")
        assert (want - full).abs().max() > 1e-3 * full.abs().max()
    sent = {u: b for k in r.ranks for u, b in k.boundaries.items()}
    names = [u.name for u in ul]
    for c in cuts:
        before = ul[names.index(c) - 1]
        codec = codec_for_unit(m, before, keep=keep, wire=wire)
        assert codec.restore == "dense"
        b = sent[before.name]
        assert b["payload_bytes"] == 2 * codec.nbytes(2)
        assert b["dense_fp32_bytes"] == 2 * 2 * (5 + 16) * 384 * 4


def test_a_summarized_tiny_vit_runs_dense_through_the_runtime(tmp_path):
    """TinyViT: the rank before the cut ranks its grid by the window attention its last block
    received, the next rank gets the full map back; outputs match the same summary in one
    process. In fp32: int8 codes of TinyViT's conv outputs flip by one step between processes
    (1e-7 differences from other conv algorithms at another thread count), which moves the
    logits by ~1e-4 of their size."""
    from lapdtr.summarize import summarized_forward

    name, kw = "tiny_vit_5m_224", {"num_classes": 10}
    ck = informative_checkpoint(tmp_path / "tv.safetensors", name, kw, img_size=160)
    cut = "stages.2.blocks.2"  # after stages.2.blocks.1 (a 10 x 10 map, padded windows of 14)
    cfg = RunConfig(model=name, model_kwargs=kw, img_size=160, world_size=2, cuts=[cut],
                    requests=2, batch_size=2, out=str(tmp_path / "run"), save_outputs=True,
                    plots=False, checkpoint=ck, summarize={"keep": 0.25, "wire": "fp32"})
    r = run(cfg, timeout_s=300)
    assert r.completed == 2 and r.lost == 0
    m = lapdtr.create_model(name, img_size=160, **kw)
    m.load_state_dict(load_file(ck))
    m.eval()
    ul = lapdtr.units(m, 160)
    outs = load_outputs(cfg.out)
    for q in range(2):
        x = request_input(cfg.seed, q, 2, 160)
        with torch.no_grad():
            want = summarized_forward(m, [cut], x, [(0.25, "fp32")], unit_list=ul)
            full = m(x)
        assert_close_scaled(outs[f"request{q}"], want, msg=f"request{q}")
        assert (want - full).abs().max() > 1e-3 * full.abs().max()
    (b,) = [b for k in r.ranks for b in k.boundaries.values()]
    before = ul[[u.name for u in ul].index(cut) - 1]
    assert b["payload_bytes"] == 2 * codec_for_unit(m, before, keep=0.25, wire="fp32").nbytes(2)

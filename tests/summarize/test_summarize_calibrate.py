"""summarized_forward and calibrate_keep on a small DeiT (depth 4, 3 heads, patch 8, 32 px: 16
patch tokens + the class token, informative random weights): keep 1 / fp32 is model(x) bit for
bit; a summarized boundary is the codec run by hand; the calibrated choice meets its target and
no cheaper row of its table does; a looser target never costs more bytes; bad input names what is
wrong and what is allowed. calibrate_cut: the candidates are the boundaries after a block; its
cut is the cheapest in bytes among the cuts that meet the target (whatever their order), its
result there is calibrate_keep's, a cut that misses is kept with its reason, and no cut meeting
is a CalibrationMiss."""
import pytest
import torch

import lapdtr
from lapdtr import partition, units
from lapdtr.summarize import AttentionProbe, attention_source, codec_for_unit, importance_kind
from lapdtr.summarize.calibrate import (Calibration, CalibrationMiss, CutCalibration,
                                        boundary_codecs, calibrate_cut, calibrate_keep,
                                        cut_candidates, summarized_forward)
from lapdtr.testing import informative_weights_

KEEPS = (1.0, 0.5, 0.25, 0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster for a model this small on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    m = lapdtr.create_model("deit_tiny_patch16_224", img_size=32, depth=4, num_heads=3,
                            patch_size=8, num_classes=10)
    informative_weights_(m, seed=0)
    return m, units(m, 32)


@pytest.fixture(scope="module")
def x():
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cuts", [["blocks.2"], [2, 4], ["blocks.1", "blocks.2", "blocks.3"]])
def test_keep_one_fp32_is_exact(deit, x, cuts):
    m, ul = deit
    with torch.no_grad():
        want = m(x)
    out = summarized_forward(m, cuts, x, [(1.0, "fp32")] * len(cuts), unit_list=ul)
    assert torch.equal(out, want)
    assert torch.equal(summarized_forward(m, cuts, x, [(1.0, "fp32")] * len(cuts)), want)


def test_summarized_boundary_is_the_codec_by_hand(deit, x):
    m, ul = deit
    first, second = partition(m, ["blocks.2"], unit_list=ul)
    last = ul[[u.name for u in ul].index("blocks.2") - 1]
    codec = codec_for_unit(m, last, keep=0.5, wire="int8")
    with torch.no_grad(), AttentionProbe(attention_source(m, last), importance_kind(m)) as p:
        b = first(x)
        want = second(codec.decode(codec.encode(b, p.importance())))
    out = summarized_forward(m, ["blocks.2"], x, [(0.5, "int8")], unit_list=ul)
    assert torch.equal(out, want)
    with torch.no_grad():
        assert not torch.equal(out, m(x))


def test_later_boundary_carries_the_shorter_sequence(deit, x):
    m, ul = deit
    c0, c1 = boundary_codecs(m, ["blocks.1", "blocks.3"], [(0.5, "fp32"), (0.5, "fp16")],
                             unit_list=ul)
    assert c0.shape == (17, 192) and c0.out_shape() == (1 + 8 + 1, 192)
    assert c1.shape == (10, 192) and c1.k == 4
    out = summarized_forward(m, ["blocks.1", "blocks.3"], x, [(0.5, "fp32"), (0.5, "fp16")],
                             unit_list=ul)
    assert out.shape == (48, 10) and torch.isfinite(out).all()


def _fidelity(m, ul, cuts, x, settings, labels=None):
    with torch.no_grad():
        ref = m(x)
    out = summarized_forward(m, cuts, x, settings, unit_list=ul)
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    acc = None if labels is None else float((out.argmax(1) == labels).float().mean())
    return agree, acc


def _check_choice(cal: Calibration, target=None, drop=None):
    c = cal.choice
    assert c.meets and c in cal.table
    if target is not None:
        assert c.agreement >= target
    if drop is not None:
        assert c.accuracy >= cal.base_accuracy - drop - 1e-9
    for r in cal.table:  # every row's verdict is right, and no cheaper one meets the target
        ok = (target is None or r.agreement >= target) and \
            (drop is None or r.accuracy >= cal.base_accuracy - drop - 1e-9)
        assert r.meets == ok, r
        if r.total_bytes < c.total_bytes:
            assert not r.meets, (r, c)


def test_choice_meets_target_and_is_cheapest(deit, x):
    m, ul = deit
    cal = calibrate_keep(m, ["blocks.2"], x, target_agreement=0.9, keeps=KEEPS, unit_list=ul)
    assert cal.search == "product" and len(cal.table) == len(KEEPS) * 4
    assert cal.boundaries == ("blocks.1",)
    _check_choice(cal, target=0.9)
    # the table's figures are what summarized_forward gives
    agree, _ = _fidelity(m, ul, ["blocks.2"], x, cal.settings)
    assert agree == pytest.approx(cal.choice.agreement)
    exact = next(r for r in cal.table if r.settings == ((1.0, "fp32"),))
    assert exact.agreement == 1.0 and exact.rel_error == 0.0 and exact.ratio == 1.0
    assert cal.choice.bytes == (codec_for_unit(m, ul[2], keep=cal.settings[0][0],
                                               wire=cal.settings[0][1]).nbytes(1),)
    assert cal.ratio < 1.0  # int8 at keep 1 alone beats fp32 and keeps near-perfect agreement


def test_looser_target_never_costs_more(deit, x):
    m, ul = deit
    costs = [calibrate_keep(m, ["blocks.2"], x, target_agreement=t, keeps=KEEPS,
                            unit_list=ul).total_bytes for t in (1.0, 0.95, 0.8, 0.5, 0.0)]
    assert costs == sorted(costs, reverse=True) and costs[-1] < costs[0], costs


def test_accuracy_target_with_labels(deit, x):
    m, ul = deit
    with torch.no_grad():
        labels = m(x).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10  # base accuracy 0.75
    cal = calibrate_keep(m, ["blocks.2"], x, max_accuracy_drop=0.05, labels=labels,
                         keeps=KEEPS, unit_list=ul)
    assert cal.base_accuracy == pytest.approx(0.75)
    _check_choice(cal, drop=0.05)
    _, acc = _fidelity(m, ul, ["blocks.2"], x, cal.settings, labels)
    assert acc == pytest.approx(cal.choice.accuracy)
    both = calibrate_keep(m, ["blocks.2"], x, target_agreement=0.95, max_accuracy_drop=0.05,
                          labels=labels, keeps=KEEPS, unit_list=ul)
    _check_choice(both, target=0.95, drop=0.05)
    assert both.total_bytes >= cal.total_bytes


def test_two_boundaries_product_and_greedy(deit, x):
    m, ul = deit
    kw = dict(target_agreement=0.9, keeps=(1.0, 0.5, 0.25), wires=("fp16", "int8"), unit_list=ul)
    prod = calibrate_keep(m, ["blocks.1", "blocks.3"], x, **kw)
    assert prod.search == "product" and len(prod.table) == 36
    _check_choice(prod, target=0.9)
    greedy = calibrate_keep(m, ["blocks.1", "blocks.3"], x, max_product=1, **kw)
    assert greedy.search == "greedy"
    assert greedy.choice.meets and greedy.choice.agreement >= 0.9
    assert greedy.total_bytes >= prod.total_bytes  # the product search is optimal
    agree, _ = _fidelity(m, ul, ["blocks.1", "blocks.3"], x, greedy.settings)
    assert agree == pytest.approx(greedy.choice.agreement)


def test_bad_input(deit, x):
    m, ul = deit
    xs = x[:8]
    kw = dict(unit_list=ul)
    with pytest.raises(ValueError, match=r"keep ratio 0 is not allowed: it must lie in \(0, 1\]"):
        calibrate_keep(m, ["blocks.2"], xs, target_agreement=0.9, keeps=(1.0, 0), **kw)
    with pytest.raises(ValueError, match=r"keep ratio 1.5 .* \(0, 1\]"):
        summarized_forward(m, ["blocks.2"], xs, [(1.5, "fp32")], **kw)
    with pytest.raises(ValueError, match="wire format 'fp8' is not supported; supported: "
                                         "fp32, fp16, bf16, int8"):
        calibrate_keep(m, ["blocks.2"], xs, target_agreement=0.9, wires=("int8", "fp8"), **kw)
    with pytest.raises(ValueError, match="no fidelity target: give target_agreement"):
        calibrate_keep(m, ["blocks.2"], xs, **kw)
    with pytest.raises(ValueError, match=r"target_agreement: expected a fraction \[0, 1\]"):
        calibrate_keep(m, ["blocks.2"], xs, target_agreement=99, **kw)
    with pytest.raises(ValueError, match="max_accuracy_drop needs labels"):
        calibrate_keep(m, ["blocks.2"], xs, max_accuracy_drop=0.01, **kw)
    with pytest.raises(ValueError, match=r"labels must be one class index per calibration "
                                         r"image: shape \[8\]"):
        calibrate_keep(m, ["blocks.2"], xs, max_accuracy_drop=0.01,
                       labels=torch.zeros(5, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match=r"no setting of keeps \[0.1\] x wires \['int8'\] meets "
                                         r"top-1 agreement >= 1.0000 .*the closest reached top-1 "
                                         r"agreement 0\.\d+ with blocks.1: keep 0.1 int8"):
        calibrate_keep(m, ["blocks.2"], x, target_agreement=1.0, keeps=(0.1,), wires=("int8",),
                       **kw)
    with pytest.raises(ValueError, match=r"unit 'embed' of the vit model has no attention; "
                                         r"units with one: blocks.0 .. blocks.3"):
        calibrate_keep(m, [1], xs, target_agreement=0.9, **kw)
    with pytest.raises(ValueError, match=r"1 setting\(s\) for 2 boundary\(ies\) \(after "
                                         r"blocks.0, blocks.2\): give one \(keep, wire\)"):
        summarized_forward(m, ["blocks.1", "blocks.3"], xs, [(1.0, "fp32")], **kw)
    with pytest.raises(ValueError, match=r"a boundary setting is a pair \(keep, wire\)"):
        summarized_forward(m, ["blocks.2"], xs, [0.5], **kw)
    with pytest.raises(ValueError, match="cut 'blocks.9' is not a unit or module name"):
        summarized_forward(m, ["blocks.9"], xs, [(1.0, "fp32")], **kw)


def _check_cut_choice(cc: CutCalibration, target=None, drop=None):
    """The chosen cut's setting meets the target, every row of every cut has the right verdict,
    and no row of any cut that meets the target has fewer bytes than the choice."""
    assert cc.row(cc.cut).calibration is cc.calibration
    _check_choice(cc.calibration, target, drop)
    for r in cc.per_cut:
        if r.calibration is None:
            assert r.miss
            continue
        _check_choice(r.calibration, target, drop)
        assert r.calibration.total_bytes >= cc.total_bytes, (r.cut, cc.cut)
        for row in r.calibration.table:
            if row.total_bytes < cc.total_bytes:
                assert not row.meets, (r.cut, row)


def test_cut_candidates(deit):
    m, ul = deit
    assert cut_candidates(m, unit_list=ul) == ["blocks.1", "blocks.2", "blocks.3", "head"]
    assert cut_candidates(m, img_size=32) == ["blocks.1", "blocks.2", "blocks.3", "head"]


def test_calibrate_cut_takes_the_fewest_bytes(deit, x):
    m, ul = deit
    kw = dict(target_agreement=0.9, keeps=(1.0, 0.1), wires=("fp16", "int8"), unit_list=ul)
    # the cheapest cut ("head": its next stage reads the class token alone) in the middle of the
    # candidates, so taking the first or the last that meets would be caught
    cc = calibrate_cut(m, x, ["blocks.2", "head", "blocks.1"], **kw)
    assert [r.cut for r in cc.per_cut] == ["blocks.2", "head", "blocks.1"]
    assert [r.boundary for r in cc.per_cut] == ["blocks.1", "blocks.3", "blocks.0"]
    assert cc.cut == "head" and cc.boundary == "blocks.3" and cc.settings == ((0.1, "int8"),)
    assert cc.total_bytes < min(r.calibration.total_bytes for r in cc.per_cut if r.cut != "head")
    _check_cut_choice(cc, target=0.9)
    # its result at the chosen cut is calibrate_keep's there, and summarized_forward agrees
    keep = calibrate_keep(m, [cc.cut], x, **kw)
    assert keep.choice == cc.choice and keep.table == cc.calibration.table
    agree, _ = _fidelity(m, ul, [cc.cut], x, cc.settings)
    assert agree == pytest.approx(cc.choice.agreement)
    assert calibrate_cut(m, x, **kw).cut == "head"  # the default candidates include it


def test_calibrate_cut_holds_the_target(deit, x):
    m, ul = deit
    kw = dict(keeps=(1.0, 0.25, 0.1), wires=("fp32", "int8"), unit_list=ul)
    cands = ["blocks.3", "blocks.1", "blocks.2"]
    loose = calibrate_cut(m, x, cands, target_agreement=0.0, **kw)
    strict = calibrate_cut(m, x, cands, target_agreement=1.0, **kw)
    _check_cut_choice(loose, target=0.0)
    _check_cut_choice(strict, target=1.0)
    assert loose.settings[0][0] == 0.1 and loose.choice.agreement < 1.0
    assert strict.choice.agreement == 1.0
    # the target binds: cheaper rows exist that miss it, and the choice costs more than loose
    assert strict.total_bytes > loose.total_bytes
    assert any(row.total_bytes < strict.total_bytes and not row.meets
               for r in strict.per_cut for row in r.calibration.table)
    # with labels: the accuracy drop is held at the chosen cut
    with torch.no_grad():
        labels = m(x).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10
    acc = calibrate_cut(m, x, cands, max_accuracy_drop=0.02, labels=labels, **kw)
    _check_cut_choice(acc, drop=0.02)
    assert acc.calibration.base_accuracy == pytest.approx(0.75)


def test_calibrate_cut_misses(deit, x):
    m, ul = deit
    kw = dict(keeps=(0.1,), wires=("int8",), unit_list=ul)
    # keep 0.1 in int8: only the cut before the head holds agreement 1; the others miss
    cc = calibrate_cut(m, x, ["blocks.1", "blocks.2", "head"], target_agreement=1.0, **kw)
    assert cc.cut == "head"
    missed = [r for r in cc.per_cut if not r.meets]
    assert [r.cut for r in missed] == ["blocks.1", "blocks.2"]
    assert all(r.calibration is None and "no setting of keeps [0.1]" in r.miss for r in missed)
    d = cc.to_dict()
    assert d["cut"] == "head" and [r["meets"] for r in d["per_cut"]] == [False, False, True]
    with pytest.raises(CalibrationMiss, match=r"no candidate cut meets the target: cut at "
                                              r"blocks.1: no setting .*; cut at blocks.2: "):
        calibrate_cut(m, x, ["blocks.1", "blocks.2"], target_agreement=1.0, **kw)
    assert issubclass(CalibrationMiss, ValueError)


def test_calibrate_cut_bad_input(deit, x):
    m, ul = deit
    xs = x[:8]
    kw = dict(target_agreement=0.9, keeps=(1.0,), wires=("int8",), unit_list=ul)
    with pytest.raises(ValueError, match="no candidate cut: give at least one"):
        calibrate_cut(m, xs, [], **kw)
    with pytest.raises(ValueError, match="candidate cuts name the same cut more than once: "
                                         "blocks.2"):
        calibrate_cut(m, xs, ["blocks.2", 3], **kw)
    with pytest.raises(ValueError, match="cut 'blocks.9' is not a unit or module name"):
        calibrate_cut(m, xs, ["blocks.9"], **kw)
    with pytest.raises(ValueError, match=r"unit 'embed' of the vit model has no attention"):
        calibrate_cut(m, xs, [1], target_agreement=0.9, keeps=(0.5,), unit_list=ul)
    with pytest.raises(ValueError, match="no fidelity target"):
        calibrate_cut(m, xs, ["blocks.2"], unit_list=ul)
    with pytest.raises(ValueError, match="max_accuracy_drop needs labels"):
        calibrate_cut(m, xs, ["blocks.2"], max_accuracy_drop=0.01, unit_list=ul)

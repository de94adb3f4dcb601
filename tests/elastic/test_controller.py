"""The width controller: scripted energy traces give the expected widths; a noisy trace does not
make it flap; bad policies are named."""
import random

import pytest

from lapdtr.elastic import ElasticError
from lapdtr.elastic.controller import WidthController, WidthPolicy

QUARTERS = [0.25, 0.5, 0.75, 1.0]  # a 4-head layer


def _drain(ctrl, trace, dt=0.1):
    return [ctrl.update(e, i * dt) for i, e in enumerate(trace)]


def _steps(seq):
    out = [seq[0]]
    for r in seq[1:]:
        if r != out[-1]:
            out.append(r)
    return out


def test_width_grows_with_the_energy_left_not_the_papers_inverse():
    c = WidthController(WidthPolicy("linear", min_ratio=0.25, hysteresis=0.0, min_dwell_s=0),
                        100.0, allowed=QUARTERS)
    assert c.update(100.0, 0) == 1.0  # full battery: full width (the paper's rule gives 0)
    c2 = WidthController(WidthPolicy("linear", min_ratio=0.25, hysteresis=0.0, min_dwell_s=0),
                         100.0, allowed=QUARTERS)
    assert c2.update(10.0, 0) == 0.25  # nearly empty: the minimum


def test_a_scripted_drain_steps_down_through_every_allowed_width():
    c = WidthController(WidthPolicy("linear", min_ratio=0.25, hysteresis=0.05, min_dwell_s=0.5),
                        100.0, allowed=QUARTERS)
    trace = [100 - i for i in range(101)]  # 1 J per 0.1 s
    seq = _drain(c, trace)
    assert _steps(seq) == [1.0, 0.75, 0.5, 0.25]
    # widths round to the nearest allowed (boundaries at 87.5, 62.5, 37.5 J); each step comes
    # once the reading is h = 5% of E_max below its boundary: 82, 57, 32 J
    times = [t for t, _ in c.history]
    assert times == pytest.approx([0.0, 1.8, 4.3, 6.8])
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:]))


def test_a_noisy_trace_does_not_flap():
    rng = random.Random(0)
    clean = [100 - 0.2 * i for i in range(500)]
    noisy = [e + rng.uniform(-3, 3) for e in clean]  # +-3% of E_max, as a coarse counter reads
    policy = WidthPolicy("linear", min_ratio=0.25, hysteresis=0.05, min_dwell_s=1.0)
    a = WidthController(policy, 100.0, allowed=QUARTERS)
    b = WidthController(policy, 100.0, allowed=QUARTERS)
    seq_clean, seq_noisy = _drain(a, clean), _drain(b, noisy)
    assert _steps(seq_noisy) == _steps(seq_clean) == [1.0, 0.75, 0.5, 0.25]
    # without the band it flaps on the same trace
    c = WidthController(WidthPolicy("linear", min_ratio=0.25, hysteresis=0.0, min_dwell_s=0),
                        100.0, allowed=QUARTERS)
    assert len(_steps(_drain(c, noisy))) > 6


def test_recharging_goes_back_up_only_past_the_band():
    c = WidthController(WidthPolicy("linear", hysteresis=0.05, min_dwell_s=0), 100.0,
                        allowed=QUARTERS)
    assert _drain(c, [100, 30])[-1] == 0.25  # 30 J: the nearest allowed width is 0.25
    assert c.update(40.0, 1.0) == 0.25  # past the 0.25/0.5 boundary (37.5 J), inside the band
    assert c.update(43.0, 2.0) == 0.5


def test_threshold_and_plan_policies():
    t = WidthController(WidthPolicy("threshold", min_ratio=0.25, steps=[[0.6, 1.0], [0.3, 0.5]],
                                    hysteresis=0, min_dwell_s=0), 10.0)
    assert [t.update(e, i) for i, e in enumerate([9, 6, 5.9, 3, 2.9])] == [1.0, 1.0, 0.5, 0.5,
                                                                           0.25]
    p = WidthController(WidthPolicy("plan", plan_ratio=0.5), 10.0, allowed=QUARTERS)
    assert [p.update(e, i) for i, e in enumerate([10, 1, None])] == [0.5, 0.5, 0.5]


def test_no_meter_runs_full_width():
    c = WidthController(WidthPolicy("linear"), 10.0, allowed=QUARTERS)
    assert c.update(None, 0.0) == 1.0


@pytest.mark.parametrize("policy, match", [
    (dict(kind="cubic"), r"'cubic' is not allowed; allowed: \['linear', 'threshold', 'plan'\]"),
    (dict(min_ratio=0), r"min_ratio: 0 is not a width ratio; allowed: a number in \(0, 1\]"),
    (dict(min_ratio=1.2), r"\(0, 1\]"),
    (dict(hysteresis=-0.1), "hysteresis: -0.1; allowed: a number >= 0"),
    (dict(hysteresis=0.6), "allowed: 0 <= hysteresis < 0.5"),
    (dict(kind="threshold"), "needs \\(energy fraction, ratio\\) pairs"),
    (dict(kind="threshold", steps=[[1.5, 1.0]]), r"energy fraction 1.5; allowed: 0..1"),
    (dict(kind="threshold", steps=[[0.5, 0]]), r"steps\[0\] ratio: 0 is not a width ratio"),
    (dict(steps=[[0.5, 0.5]]), "only the 'threshold' policy takes steps"),
])
def test_bad_policies_are_named(policy, match):
    with pytest.raises(ElasticError, match=match):
        WidthController(WidthPolicy(**policy), 10.0)


def test_bad_budget_and_allowed_are_named():
    with pytest.raises(ElasticError, match="e_max_j: 0; allowed: a positive energy budget"):
        WidthController(WidthPolicy(), 0)
    with pytest.raises(ElasticError, match=r"allowed: 2 is not a width ratio"):
        WidthController(WidthPolicy(), 10.0, allowed=[0.5, 2])


def test_min_dwell_holds_a_width_however_fast_the_energy_falls():
    c = WidthController(WidthPolicy("linear", hysteresis=0.0, min_dwell_s=1.0), 100.0,
                        allowed=QUARTERS)
    _drain(c, [100 - 10 * i for i in range(11)] + [0] * 10)  # empty within 1 s
    assert c.history == [(0.0, 1.0), (pytest.approx(1.0), 0.25)]  # one change, after 1 s

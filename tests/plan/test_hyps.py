"""HyPS: mandatory split points split horizontally into the fewest groups, optional split points."""
from __future__ import annotations

import pytest

from lapdtr.plan import create_plan
from lapdtr.plan.hyps import mandatory_split_points, optional_split_points
from lapdtr.profile.types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile

MB = 10**6


def _vgg_like():
    """conv, conv, pool, conv, pool, fc6 (huge), fc7, fc8 — the HyPS VGG16 example in small."""
    spec = [  # name, params, rows in -> out, channels out, out bytes
        ("conv1", 1 * MB, 32, 32, 64, 4 * MB), ("conv2", 1 * MB, 32, 32, 64, 4 * MB),
        ("pool1", 0, 32, 16, 64, 1 * MB), ("conv3", 2 * MB, 16, 16, 128, 2 * MB),
        ("pool2", 0, 16, 8, 128, MB // 2), ("fc6", 400 * MB, 1, 1, 4096, 16384),
        ("fc7", 60 * MB, 1, 1, 4096, 16384), ("fc8", 16 * MB, 1, 1, 1000, 4000)]
    units, prev = [], 3 * 32 * 32 * 4
    for i, (name, params, hin, hout, c, out) in enumerate(spec):
        fmt = "map" if hout > 1 else "logits"
        units.append(UnitProfile(
            index=i, name=name, kind="block", modules=[name], in_format="map", out_format=fmt,
            in_shape=[1, 3, hin, hin], out_shape=[1, c, hout, hout] if fmt == "map" else [1, c],
            flops=10**8, num_params=params // 4, param_bytes=params, in_bytes=prev, out_bytes=out,
            peak_bytes=prev + out, latency_s=0.0))
        prev = out
    return ModelProfile(model="vgg-like", family="toy", img_size=32, batch_size=1,
                        dtype="float32", device="cpu", units=units,
                        total_flops=sum(u.flops for u in units), model_flops=0,
                        total_latency_s=0.0)


def _pis(n, mem=150 * MB):
    return [DeviceProfile(f"pi{i}", gflops=13.5, memory_bytes=mem, power_active_w=6.4,
                          energy_per_byte_j=2e-8, links=[LinkProfile("*", 12.5e6, 2e-3)])
            for i in range(n)]


def test_mandatory_and_optional_split_points():
    mp = _vgg_like()
    # fc6 fits on no 150 MB device; split into equal groups: 3 groups of 133 MB fit
    assert mandatory_split_points(mp, _pis(4)) == {5: 3}
    assert mandatory_split_points(mp, _pis(4, mem=500 * MB)) == {}
    # a parameter threshold (HyPS's "maximum number of parameters supported by the device")
    assert mandatory_split_points(mp, _pis(4, mem=10**10), param_threshold_bytes=100 * MB) \
        == {5: 4}
    opt = optional_split_points(mp)
    assert 3 in opt and 5 in opt  # after pool1 and pool2


def test_hyps_plan_isolates_and_splits_the_big_layer():
    mp = _vgg_like()
    devices = _pis(4)
    plan = create_plan(mp, devices, strategy="hyps")
    fc6 = [s for s in plan.shards if s.unit == "fc6"]
    assert len(fc6) == 3 and sorted((s.start, s.stop) for s in fc6) == [(0, 1366), (1366, 2731),
                                                                        (2731, 4096)]
    assert len({s.rank for s in fc6}) == 3
    fc6_stages = [s for s in plan.stages if "fc6" in s.units]
    assert all(s.units == ["fc6"] for s in fc6_stages)  # a V-partition of its own
    for p, d in zip(plan.predictions, devices):
        assert p.memory_bytes <= d.memory_bytes
    cover = [u for s in plan.stages for u in s.units if u != "fc6"]
    assert cover == [u.name for u in mp.units if u.name != "fc6"]
    assert plan.meta["mandatory_split_points"] == {"fc6": 3}


def test_hyps_errors_when_even_the_split_cannot_fit():
    with pytest.raises(ValueError, match="fc6"):
        create_plan(_vgg_like(), _pis(2), strategy="hyps")

"""Tang & Stefanov's analytical energy models: the equations on hand-sized cases, and the paper's
findings on the CNNs available here (ResNet-50, VGG-16, SqueezeNet) with Jetson-TX2 devices."""
from __future__ import annotations

import pytest

from lapdtr.energy.analytical import (Window, _h_comm, data_energy, ensembled_energy, halo_rows,
                                      horizontal_energy, sequential_energy, split_evenly,
                                      split_proportional, vertical_energy)
from lapdtr.profile.types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile


def _unit(i, flops, out_bytes, in_bytes, rows=8, ch=4, fmt="map"):
    return UnitProfile(index=i, name=f"l{i}", kind="block", modules=[f"l{i}"], in_format="map",
                       out_format=fmt, in_shape=[1, ch, rows, rows], out_shape=[1, ch, rows, rows],
                       flops=flops, num_params=0, param_bytes=100, in_bytes=in_bytes,
                       out_bytes=out_bytes, peak_bytes=in_bytes + out_bytes, latency_s=0.0)


def _model(units):
    return ModelProfile(model="toy", family="toy", img_size=8, batch_size=1, dtype="float32",
                        device="cpu", units=units, total_flops=sum(u.flops for u in units),
                        model_flops=0, total_latency_s=0.0)


def _dev(name, gflops=1.0, power=2.0, epb=1e-3):
    return DeviceProfile(name, gflops=gflops, power_active_w=power, energy_per_byte_j=epb,
                         links=[LinkProfile("*", 1e6, 1e-3)])


# ------------------------------------------------------------------------------ the equations

def test_sequential_eqs_14_to_17():
    mp = _model([_unit(0, 10**9, 1000, 500), _unit(1, 2 * 10**9, 2000, 1000),
                 _unit(2, 10**9, 40, 2000)])
    a, b = _dev("a", gflops=1.0, power=2.0, epb=1e-3), _dev("b", gflops=2.0, power=3.0, epb=2e-3)
    en, lat = sequential_energy(mp, [a, b], [0, 0, 1])
    # eq. 15: sum of P * t with t = flops / (gflops * 1e9); eq. 17: l_z's partition only sends
    assert en[0].compute_j == pytest.approx(2.0 * 3.0)
    assert en[0].external_comm_j == pytest.approx(2000 * 1e-3)
    assert en[1].compute_j == pytest.approx(3.0 * 0.5)
    assert en[1].external_comm_j == pytest.approx(2000 * 2e-3)  # l_q's partition only receives
    assert en[0].bytes_sent == en[1].bytes_received == 2000
    assert lat == pytest.approx(3.0 + (1e-3 + 2000 / 1e6) + 0.5)
    en, _ = sequential_energy(mp, [a, b], [0, 0, 1], internal_energy_per_byte_j=1e-6)
    assert en[0].internal_comm_j == pytest.approx((1000 + 2000) * 1e-6)  # eq. 16
    with pytest.raises(ValueError, match="consecutive"):
        sequential_energy(mp, [a, b], [0, 1, 0])


def test_vertical_eqs_18_to_22_sub_partitions():
    mp = _model([_unit(i, 10**9, 100 * (i + 1), 100 * i or 50) for i in range(4)])
    a, b = _dev("a"), _dev("b")
    en, _ = vertical_energy(mp, [a, b], [0, 1, 1, 0])
    # a: sub-partitions {l0} (sends Y0) and {l3} (receives X3 = Y2); b: {l1, l2} receives, sends
    assert en[0].bytes_sent == 100 and en[0].bytes_received == 300
    assert en[1].bytes_received == 100 and en[1].bytes_sent == 300
    assert en[0].external_comm_j == pytest.approx(400 * 1e-3)
    assert en[0].compute_j == en[1].compute_j == pytest.approx(2 * 2.0)


def test_data_halo_eqs_1_to_5():
    # 8 output rows in two parts; a 3x3 / stride 1 / pad 1 next layer needs one row across
    need = halo_rows([0, 4], [4, 4], Window(3, 1, 1), 8)
    assert need == [(0, 5), (3, 8)]
    assert _h_comm(0, 4, 0, 5) == 1 and _h_comm(4, 8, 3, 8) == 1  # eq. 1 cases 3 and 1
    assert _h_comm(2, 4, 1, 6) == 3 and _h_comm(0, 8, 0, 8) == 0  # cases 2 and 4
    # stride-2 3x3: output rows [2, 4) read input rows [3, 8)
    assert halo_rows([2], [2], Window(3, 2, 1), 8) == [(3, 8)]
    mp = _model([_unit(0, 8 * 10**9, 8 * 64, 8 * 64), _unit(1, 8 * 10**9, 8 * 64, 8 * 64)])
    en, _, rows = data_energy(mp, [_dev("a"), _dev("b")], windows={"l1": Window(3, 1, 1)})
    assert rows[1] == [(0, 4, 0, 1), (4, 8, 1, 0)]
    row = 64  # bytes per row of l0's output
    for e in en:  # eq. 7: half of each layer; eq. 9: one halo row each way
        assert e.compute_j == pytest.approx(2.0 * 8.0)
        assert e.bytes_received == row and e.bytes_sent == row


def test_data_gathers_rowless_units_on_one_rank():
    mp = _model([_unit(0, 10**9, 8 * 64, 8 * 64), _unit(1, 10**8, 40, 8 * 64, fmt="logits")])
    mp.units[1].out_shape = [1, 10]
    en, _, rows = data_energy(mp, [_dev("a"), _dev("b"), _dev("c")])
    assert rows[1] is None
    assert en[0].bytes_received == pytest.approx(8 * 64 * 5 / 8)  # rows of b and c
    assert "l1" in en[0].units and "l1" not in en[1].units


def test_horizontal_eqs_10_to_13():
    mp = _model([_unit(i, 10**9, 4000, 4000, ch=8) for i in range(3)])
    devs = [_dev("a"), _dev("b"), _dev("c"), _dev("d")]
    en, _, sizes = horizontal_energy(mp, devs)
    assert sizes == [[2, 2, 2, 2]] * 3
    for e in en:
        assert e.compute_j == pytest.approx(3 * 2.0 / 4)  # eq. 11: k = C(j) / C
        # eq. 13: (1 - k) of every output but the last is received; own slice sent to 3 peers
        assert e.bytes_received == pytest.approx(2 * 4000 * 0.75)
        assert e.bytes_sent == pytest.approx(2 * 4000 * 0.25 * 3)
    inner, *_ = horizontal_energy(mp, devs, inner_bytes={"l1": 1000})
    assert inner[0].bytes_received - en[0].bytes_received == pytest.approx(750)


def test_hybrid_sizes_follow_capability_and_ensembled_exchanges_at_block_ends():
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert split_proportional(10, [1, 1, 3]) == [2, 2, 6]
    mp = _model([_unit(i, 10**9, 4000, 4000, ch=8) for i in range(4)])
    fast, slow = _dev("fast", gflops=3.0), _dev("slow", gflops=1.0)
    en, _, sizes = horizontal_energy(mp, [fast, slow], weights=[3.0, 1.0])
    assert sizes[0] == [6, 2]
    assert en[0].compute_s == pytest.approx(en[1].compute_s)  # balanced time
    en, _, _, blocks = ensembled_energy(mp, [fast, slow], blocks=[[0, 1], [2, 3]])
    assert blocks == [[0, 1], [2, 3]]
    assert en[0].bytes_received == pytest.approx(4000 / 2)  # only after unit 1


# --------------------------------------------------------------- the paper's findings on CNNs

def _tx2(i):
    """A Jetson TX2 as in configs/devices/jetson_tx2_x4.yaml (data-sheet compute and power,
    Gigabit Ethernet at an estimated 4 nJ per byte)."""
    return DeviceProfile(name=f"tx2-{i}", kind="jetson", gflops=665.6, memory_bytes=8 * 2**30,
                         power_active_w=15.0, power_idle_w=2.0, energy_per_byte_j=4e-9,
                         links=[LinkProfile("*", 125e6, 2e-4)])


@pytest.fixture(scope="session")
def cnn_profiles():
    """Profiles (FLOPs from torch.utils.flop_counter on one image), row windows and the inner
    exchange of the CNNs, computed once per session (profiles cached in $LAPDTR_CACHE)."""
    import lapdtr
    from lapdtr.energy.analytical import estimate_inner_exchange_bytes, estimate_unit_windows
    from lapdtr.profile import profile_model

    out = {}
    for name in ("resnet50", "vgg16", "squeezenet1_0"):
        model = lapdtr.create_model(name)  # every one is supported: a ValueError is a failure
        prof = profile_model(model, repeats=1, warmup=0)
        ul = lapdtr.units(model, prof.img_size)
        out[name] = (prof, estimate_unit_windows(model, ul), estimate_inner_exchange_bytes(model, ul))
    return out


def _chart(prof, windows, inner, k_max=4):
    from lapdtr.plan import create_plan

    base = create_plan(prof, [_tx2(0)], strategy="sequential",
                       objective="max-device-energy").meta["max_device_energy_j"]
    out = {}
    for s, obj, kw in (("data", "energy", {"windows": windows}),
                       ("horizontal", "energy", {"inner_bytes": inner}),
                       ("sequential", "max-device-energy", {}),
                       ("vertical", "max-device-energy", {})):
        out[s] = [create_plan(prof, [_tx2(i) for i in range(k)], strategy=s, objective=obj,
                              **kw).meta["max_device_energy_j"] / base
                  for k in range(1, k_max + 1)]
    return out


def test_profiles_count_flops_per_unit(cnn_profiles):
    prof = cnn_profiles["resnet50"][0]
    assert prof.total_flops == prof.model_flops  # units add up to the whole model
    assert 7.5e9 < prof.total_flops < 8.6e9  # 4.1 GMACs


def test_resnet50_horizontal_is_worst_and_rises_with_devices(cnn_profiles):
    chart = _chart(*cnn_profiles["resnet50"])
    h = chart["horizontal"]
    assert h[0] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(h, h[1:])) and h[1] > 1.0
    for k in range(1, 4):
        assert h[k] == max(c[k] for c in chart.values())
    for k in range(4):
        assert chart["vertical"][k] <= chart["sequential"][k] * (1 + 1e-9)
    assert chart["vertical"][3] < 0.5  # layer-wise strategies do cut per-device energy


def test_vgg16_vertical_beats_sequential_and_horizontal_is_least_effective(cnn_profiles):
    chart = _chart(*cnn_profiles["vgg16"])
    for k in range(1, 4):
        assert chart["vertical"][k] <= chart["sequential"][k] * (1 + 1e-9)
        assert chart["horizontal"][k] > max(chart["data"][k], chart["sequential"][k],
                                            chart["vertical"][k])
    for s in ("data", "sequential", "vertical"):  # these keep falling with more devices
        assert all(a > b for a, b in zip(chart[s], chart[s][1:]))


def test_squeezenet_horizontal_raises_per_device_energy(cnn_profiles):
    chart = _chart(*cnn_profiles["squeezenet1_0"])
    assert all(v > 1.0 for v in chart["horizontal"][1:])
    for k in range(4):
        assert chart["vertical"][k] <= chart["sequential"][k] * (1 + 1e-9)

"""Meter registry, the null and simulated meters, the power sampler and the Jetson rails meter
(against a fake sysfs tree)."""
import sys
import threading
import time

import pytest

from lapdtr.energy import (DrainNotSupported, EnergyMeter, EnergyMeterError, JetsonMeter,
                           NullMeter, PowerSampler, SensorUnavailable, SimulatedBattery,
                           create_meter, create_meter_for_device, list_meters, register_meter)
from lapdtr.energy import jetson, meters, nvml
from lapdtr.profile.types import DeviceProfile

# Arguments that let each registered meter be built on any machine (nvml is tested with a fake
# pynvml in test_nvml.py).
BUILDABLE = {
    "null": {},
    "simulated": {"capacity_j": 100.0, "power_active_w": 10.0, "power_idle_w": 2.0},
}


def test_all_meters_registered():
    assert {"nvml", "jetson", "simulated", "null"} <= set(list_meters())
    assert list_meters() == sorted(list_meters())


@pytest.mark.parametrize("name", list_meters())
def test_registered_meter_contract(name):
    cls = meters.get_meter_class(name)
    assert issubclass(cls, EnergyMeter) and cls.name == name
    assert isinstance(cls.measured, bool)
    with pytest.raises(ValueError, match=rf"(?s){name}.*'bogus_arg'.*allowed"):
        create_meter(name, bogus_arg=1)
    if name in BUILDABLE:
        m = create_meter(name, **BUILDABLE[name])
        assert isinstance(m, cls) and m.energy_j() == 0.0 and m.power_w() >= 0.0
        m.begin_window("w")
        w = m.end_window("w")
        assert w.name == "w" and w.energy_j == 0.0 and w.measured is cls.measured
        m.close()


def test_unknown_meter_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown energy meter 'tegrastats'.*allowed.*'null'"):
        create_meter("tegrastats")


def test_missing_required_argument():
    with pytest.raises(ValueError, match=r"missing required argument\(s\) \['capacity_j'\]"):
        create_meter("simulated", power_active_w=1.0, power_idle_w=0.5)


def test_register_meter(monkeypatch):
    monkeypatch.setattr(meters, "_METERS", dict(meters._METERS))

    @register_meter("constant-test")
    class Constant(NullMeter):
        def power_w(self):
            return 3.0

    assert "constant-test" in list_meters()
    assert create_meter("constant-test").power_w() == 3.0
    with pytest.raises(ValueError, match="already registered"):
        register_meter("simulated")(Constant)
    with pytest.raises(TypeError, match="not an EnergyMeter"):
        register_meter("x")(object)


def test_null_meter():
    m = create_meter("null")
    assert (m.energy_j(), m.power_w(), m.remaining_j(), m.measured) == (0.0, 0.0, None, False)
    assert m.label == "none" and m.can_drain is False
    assert (m.record_compute(1.0), m.record_idle(2.0), m.record_bytes(sent=10, received=5),
            m.record_bytes()) == (0.0, 0.0, 0.0, 0.0)
    assert (m.energy_j(), m.remaining_j()) == (0.0, None)
    with pytest.raises(DrainNotSupported, match=r"'null' \(NullMeter\) cannot be drained"):
        m.drain(1.0)


def _build(name, tmp_path, monkeypatch) -> EnergyMeter:
    """A meter of every registered name, on any machine: jetson on a fake sysfs file, nvml on
    the fake pynvml of test_nvml.py (a new meter adds its line here)."""
    if name == "jetson":
        return create_meter("jetson", rails={"VDD_IN": str(write(tmp_path / "p", 4000))},
                            budget_j=100.0, sample_interval_s=0.01)
    if name == "nvml":
        from test_nvml import FakeNvml

        monkeypatch.setattr(nvml, "_NVML", None)
        monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(energy_mj=[7_000]))
        return create_meter("nvml", budget_j=100.0)
    return create_meter(name, **BUILDABLE[name])


@pytest.mark.parametrize("name", list_meters())
def test_every_meter_takes_the_runtime_records(name, tmp_path, monkeypatch):
    """The runtime calls record_compute / record_idle / record_bytes on any meter, asks
    can_drain before drain, and reports label: no meter may lack them or reject them."""
    m = _build(name, tmp_path, monkeypatch)
    try:
        assert m.label == ("none" if name == "null" else "measured" if m.measured else "modelled")
        e0 = m.energy_j()
        drawn = [m.record_compute(0.5), m.record_idle(0.25), m.record_bytes(sent=1000, received=24),
                 m.record_bytes(1000), m.record_bytes()]
        assert all(isinstance(j, float) and j >= 0.0 for j in drawn), drawn
        if m.measured or name == "null":  # hardware saw the work (or nothing counts): no draw
            assert drawn == [0.0] * len(drawn)
        else:  # a modelled meter draws for what it is told
            assert sum(drawn) > 0.0 and m.energy_j() == pytest.approx(e0 + sum(drawn))
        assert m.can_drain is (name == "simulated")  # a battery that is modelled, not read
        if m.can_drain:
            rem = m.remaining_j()
            assert m.drain(1.0) == 1.0 and m.remaining_j() == pytest.approx(rem - 1.0)
        else:
            with pytest.raises(DrainNotSupported, match=rf"'{name}'.*cannot be drained"):
                m.drain(1.0)
            assert isinstance(DrainNotSupported("x"), EnergyMeterError)
    finally:
        m.close()



# ---------------------------------------------------------------- simulated battery

def battery(**kw):
    args = dict(capacity_j=1000.0, power_active_w=10.0, power_idle_w=2.0, energy_per_byte_j=1e-6)
    args.update(kw)
    return SimulatedBattery(**args)


def test_battery_power_model():
    b = battery()
    assert (b.budget_j, b.capacity_j, b.remaining_j(), b.measured) == (1000.0, 1000.0, 1000.0, False)
    assert b.power_w() == 2.0  # idle before anything is recorded
    assert b.record_compute(3.0) == 30.0
    assert b.power_w() == 10.0
    assert b.record_idle(5.0) == 10.0
    assert b.power_w() == 2.0
    assert b.record_bytes(sent=1_000_000, received=500_000) == pytest.approx(1.5)
    assert b.record_bytes(2_000_000) == pytest.approx(2.0)  # positional: bytes sent
    assert b.energy_j() == pytest.approx(43.5)
    assert b.remaining_j() == pytest.approx(956.5)
    assert b.drain(900.0) == 900.0
    assert b.remaining_j() == pytest.approx(56.5) and not b.depleted
    b.record_compute(10.0)  # 100 J more than is left: the battery is empty, not negative
    assert b.remaining_j() == 0.0 and b.depleted
    assert b.energy_j() == pytest.approx(143.5)  # the injected drain is not energy used
    snap = b.snapshot()
    assert snap["compute_time_s"] == 13.0 and snap["idle_time_s"] == 5.0
    assert (snap["bytes_sent"], snap["bytes_received"], snap["drained_j"]) == (3_000_000, 500_000, 900.0)


def test_battery_initial_charge_and_window():
    b = battery(initial_j=400.0)
    assert b.budget_j == 1000.0 and b.remaining_j() == 400.0
    b.begin_window("req")
    b.record_compute(2.0)
    w = b.end_window("req")
    assert w.energy_j == 20.0 and w.measured is False
    assert b.remaining_j() == 380.0


@pytest.mark.parametrize("kw, key", [
    ({"capacity_j": 0.0}, "capacity_j"),
    ({"capacity_j": -5.0}, "capacity_j"),
    ({"power_active_w": -1.0}, "power_active_w"),
    ({"power_idle_w": float("nan")}, "power_idle_w"),
    ({"energy_per_byte_j": -1e-9}, "energy_per_byte_j"),
    ({"initial_j": 2000.0}, "initial_j"),
    ({"initial_j": -1.0}, "initial_j"),
    ({"capacity_j": "lots"}, "capacity_j"),
])
def test_battery_rejects_bad_arguments(kw, key):
    with pytest.raises(ValueError, match=key):
        battery(**kw)


@pytest.mark.parametrize("call", [
    lambda b: b.record_compute(-1.0), lambda b: b.record_idle(-0.1),
    lambda b: b.record_bytes(sent=-1), lambda b: b.drain(-5.0), lambda b: b.record_compute(True),
])
def test_battery_rejects_negative_records(call):
    b = battery()
    with pytest.raises(ValueError, match=">= 0"):
        call(b)
    assert b.energy_j() == 0.0


def test_battery_is_thread_safe():
    b = battery(capacity_j=1e9, energy_per_byte_j=0.0)
    n_threads, n_calls = 8, 2000

    def work():
        for _ in range(n_calls):
            b.record_compute(0.001)
            b.record_bytes(sent=1, received=1)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.energy_j() == pytest.approx(n_threads * n_calls * 0.01)
    assert b.bytes_sent == b.bytes_received == n_threads * n_calls
    assert b.compute_time_s == pytest.approx(n_threads * n_calls * 0.001)


def device(**kw):
    args = dict(name="tx2", kind="jetson", gflops=665.6, memory_bytes=8 << 30, power_active_w=15.0,
                power_idle_w=2.0, energy_per_byte_j=4e-9, energy_budget_j=5000.0,
                energy_remaining_j=3000.0, meter="simulated")
    args.update(kw)
    return DeviceProfile(**args)


def test_battery_from_device():
    b = SimulatedBattery.from_device(device())
    assert (b.budget_j, b.remaining_j(), b.power_active_w, b.power_idle_w, b.energy_per_byte_j) == \
        (5000.0, 3000.0, 15.0, 2.0, 4e-9)
    assert SimulatedBattery.from_device(device(), initial_j=100.0).remaining_j() == 100.0
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['gpu_index'\]"):
        SimulatedBattery.from_device(device(), gpu_index=0)
    with pytest.raises(ValueError, match=r"device 'tx2'.*energy_budget_j"):
        SimulatedBattery.from_device(device(energy_budget_j=None, energy_remaining_j=None))


def test_create_meter_for_device():
    m = create_meter_for_device(device())
    assert isinstance(m, SimulatedBattery) and m.remaining_j() == 3000.0
    assert isinstance(create_meter_for_device(device(meter="null")), NullMeter)
    # ``meter: null`` in a YAML file is None; a profile without a meter has "null"
    assert isinstance(create_meter_for_device(device(meter=None)), NullMeter)
    assert create_meter_for_device(DeviceProfile(name="cpu0")).label == "none"
    with pytest.raises(ValueError, match="unknown energy meter 'rapl'"):
        create_meter_for_device(device(meter="rapl"))


class ZeroMeter(meters.BudgetedMeter):
    def energy_j(self):
        return 0.0

    def power_w(self):
        return 0.0


def test_budgeted_meter_initial_charge():
    assert ZeroMeter(budget_j=10.0).remaining_j() == 10.0
    assert ZeroMeter(budget_j=10.0, initial_j=4.0).remaining_j() == 4.0
    assert ZeroMeter().remaining_j() is None
    with pytest.raises(ValueError, match="needs budget_j"):
        ZeroMeter(budget_j=None, initial_j=5.0)
    with pytest.raises(ValueError, match=r"initial_j must be in \[0, budget_j=10"):
        ZeroMeter(budget_j=10.0, initial_j=11.0)


# ---------------------------------------------------------------- power sampler

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_sampler_trapezoid_rule_is_exact_for_linear_power():
    clock = FakeClock()
    sampler = PowerSampler(lambda: 10.0 + 2.0 * clock.t, interval_s=1.0, clock=clock, start=False)
    for t in (0.5, 1.0, 2.5, 4.0):
        clock.t = t
        sampler.sample()
    # integral of 10 + 2t over [0, 4] = 40 + 16
    assert sampler.energy_j() == pytest.approx(56.0)
    assert sampler.power_w() == pytest.approx(18.0)
    assert not sampler.running


def test_sampler_thread_integrates_and_stops():
    t0 = time.monotonic()
    sampler = PowerSampler(lambda: 20.0, interval_s=0.005)
    time.sleep(0.1)
    e = sampler.energy_j()
    elapsed = time.monotonic() - t0
    assert sampler.running and sampler.num_samples > 3
    assert 20.0 * 0.09 <= e <= 20.0 * elapsed + 1e-9
    sampler.close()
    assert not sampler.running


def test_sampler_thread_error_surfaces_on_next_reading():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 2:
            raise SensorUnavailable("sensor went away")
        return 1.0

    sampler = PowerSampler(flaky, interval_s=0.002)
    deadline = time.monotonic() + 2.0
    while sampler.running and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(SensorUnavailable, match="went away"):
        sampler.energy_j()
    with pytest.raises(SensorUnavailable):
        sampler.power_w()
    sampler.close()


def test_sampler_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval_s"):
        PowerSampler(lambda: 1.0, interval_s=0.0)


# ---------------------------------------------------------------- jetson rails (fake sysfs)

def write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def test_jetson_meter_sums_rails(tmp_path):
    gpu = write(tmp_path / "in_power0_input", 3000)  # mW
    volt = write(tmp_path / "in1_input", 5000)  # mV
    curr = write(tmp_path / "curr1_input", 400)  # mA -> 2 W
    m = create_meter("jetson", rails={"VDD_GPU": str(gpu), "VDD_CPU": (volt, curr)},
                     budget_j=100.0, sample_interval_s=0.005)
    try:
        assert m.measured is True
        assert m.power_w() == pytest.approx(5.0)
        m.begin_window("w")
        time.sleep(0.06)
        w = m.end_window("w")
        assert w.time_s >= 0.06
        assert w.energy_j == pytest.approx(5.0 * w.time_s, rel=0.1)
        assert w.too_short is False and w.measured is True
        m.begin_window("tiny")
        assert m.end_window("tiny").too_short is True  # shorter than two samples
        write(gpu, 8000)
        assert m.power_w() == pytest.approx(10.0)
        assert m.remaining_j() == pytest.approx(100.0 - m.energy_j(), abs=0.5)
    finally:
        m.close()
    assert not m._sampler.running


def test_jetson_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "0-0041" / "iio:device1" / "in_power0_input"
    with pytest.raises(SensorUnavailable, match=r"rail 'VDD_IN'.*in_power0_input"):
        JetsonMeter(rails={"VDD_IN": missing})


def test_jetson_bad_rails(tmp_path):
    f = write(tmp_path / "p", 1)
    with pytest.raises(ValueError, match="rail 'X'"):
        JetsonMeter(rails={"X": (f, f, f)})
    with pytest.raises(ValueError, match="non-empty dict"):
        JetsonMeter(rails={})
    bad = write(tmp_path / "bad", "n/a")
    with pytest.raises(EnergyMeterError, match="not an integer"):
        JetsonMeter(rails={"X": bad})


def test_jetson_discovers_rails(tmp_path, monkeypatch):
    iio = tmp_path / "ina3221x"
    for dev, chans in (("0-0040/iio:device0", ["VDD_SYS_GPU", "VDD_SYS_SOC"]),
                       ("0-0041/iio:device1", ["VDD_IN", "VDD_SYS_CPU"])):
        for n, label in enumerate(chans):
            write(iio / dev / f"rail_name_{n}", label)
            write(iio / dev / f"in_power{n}_input", 1000 * (n + 1))
    hw = tmp_path / "ina3221" / "7-0040" / "hwmon" / "hwmon3"
    write(hw / "in1_label", "VDD_CPU_GPU_CV")
    write(hw / "in1_input", 5000)
    write(hw / "curr1_input", 600)
    rails = jetson.discover_rails(iio_root=iio, hwmon_root=tmp_path / "ina3221")
    assert rails["VDD_IN"] == str(iio / "0-0041/iio:device1/in_power0_input")
    assert rails["VDD_SYS_CPU"].endswith("in_power1_input")
    assert rails["VDD_CPU_GPU_CV"] == (str(hw / "in1_input"), str(hw / "curr1_input"))
    monkeypatch.setattr(jetson, "IIO_ROOT", str(iio))
    monkeypatch.setattr(jetson, "HWMON_ROOT", str(tmp_path / "ina3221"))
    assert list(jetson.default_rails()) == ["VDD_IN"]  # the total only, not total + sub-rails
    m = JetsonMeter(sample_interval_s=0.01)
    try:
        assert m.power_w() == pytest.approx(1.0)
    finally:
        m.close()
    monkeypatch.setattr(jetson, "IIO_ROOT", str(tmp_path / "none"))
    assert set(jetson.default_rails()) == {"VDD_CPU_GPU_CV"}

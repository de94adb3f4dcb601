"""The nvml meter against a fake ``pynvml`` put where the wrapper imports it, with the errors a
real driver raises; one ``gpu`` test reads a real GPU."""
import ast
import sys
import time
import types
from pathlib import Path

import pytest

import lapdtr
from lapdtr.energy import (EnergyMeterError, GpuLost, NvmlMeter, NvmlNotSupported, NvmlUnavailable,
                           SensorUnavailable, create_meter, nvml)


class NVMLError(Exception):
    """Mirrors pynvml: an error carries its nvml.h code in ``value``; subclasses fix the code."""

    code = None

    def __init__(self, value=None):
        super().__init__(value)
        self.value = self.code if value is None else value

    def __str__(self):
        return f"fake NVML error {self.value}"


def _error(name, code):
    return type(name, (NVMLError,), {"code": code})


ERRORS = {"NVMLError_Uninitialized": 1, "NVMLError_NotSupported": 3,
          "NVMLError_NoPermission": 4, "NVMLError_DriverNotLoaded": 9,
          "NVMLError_LibraryNotFound": 12, "NVMLError_FunctionNotFound": 13,
          "NVMLError_GpuIsLost": 15}


class FakeNvml(types.ModuleType):
    """A stand-in for ``pynvml``: ``energy_mj`` (a list consumed one reading at a time, or an
    exception class), ``power_mw`` (a number or an exception class)."""

    def __init__(self, *, count=1, energy_mj=None, power_mw=100_000, init_error=None):
        super().__init__("pynvml")
        self.NVMLError = NVMLError
        for name, code in ERRORS.items():
            setattr(self, name, _error(name, code))
        self.NVML_ERROR_NOT_SUPPORTED = 3
        self.NVML_ERROR_GPU_IS_LOST = 15
        self.count = count
        self.energy_mj = list(energy_mj) if isinstance(energy_mj, list) else energy_mj
        self.power_mw = power_mw
        self.init_error = init_error
        self.init_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error:
            raise getattr(self, self.init_error)()

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_mj is None:
            raise self.NVMLError_NotSupported()
        if isinstance(self.energy_mj, str):
            raise getattr(self, self.energy_mj)()
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlDeviceGetPowerUsage(self, handle):
        if isinstance(self.power_mw, str):
            raise getattr(self, self.power_mw)()
        return self.power_mw


@pytest.fixture(autouse=True)
def reset_nvml_singleton(monkeypatch):
    monkeypatch.setattr(nvml, "_NVML", None)
    yield
    monkeypatch.setattr(nvml, "_NVML", None)


def install(monkeypatch, **kw) -> FakeNvml:
    fake = FakeNvml(**kw)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_energy_counter(monkeypatch):
    fake = install(monkeypatch, energy_mj=[1_000_000, 1_000_500, 1_002_000, 1_002_000])
    m = create_meter("nvml", gpu_index=0, budget_j=10.0)
    assert isinstance(m, NvmlMeter) and m.mode == "counter" and m.measured is True
    assert m.energy_j() == pytest.approx(0.5)  # mJ -> J, since the meter started
    assert m.energy_j() == pytest.approx(2.0)
    assert m.remaining_j() == pytest.approx(8.0)
    assert m.power_w() == pytest.approx(100.0)  # mW -> W
    NvmlMeter()  # a second meter reuses the initialised library
    assert fake.init_calls == 1
    m.close()


def test_short_windows_are_flagged(monkeypatch):
    install(monkeypatch, energy_mj=[0, 10, 20, 30, 40])
    m = NvmlMeter()
    m.begin_window("short")
    w = m.end_window("short")
    assert w.too_short is True and w.energy_j == pytest.approx(0.01) and w.measured is True
    m.begin_window("long")
    time.sleep(nvml.NVML_UPDATE_PERIOD_S + 0.01)
    assert m.end_window("long").too_short is False


def test_not_supported_falls_back_to_power_sampling(monkeypatch):
    install(monkeypatch, energy_mj=None, power_mw=50_000)
    t0 = time.monotonic()
    m = NvmlMeter(sample_interval_s=0.005, budget_j=100.0, initial_j=60.0)
    try:
        assert m.mode == "sampling" and m.min_window_s >= nvml.NVML_UPDATE_PERIOD_S
        time.sleep(0.08)
        e = m.energy_j()
        elapsed = time.monotonic() - t0
        assert m._sampler.num_samples > 3  # the thread sampled
        assert 50.0 * 0.075 <= e <= 50.0 * elapsed + 1e-9  # trapezoid of a constant 50 W
        assert m.power_w() == pytest.approx(50.0)
        assert m.remaining_j() == pytest.approx(60.0 - m.energy_j(), abs=0.5)
    finally:
        m.close()
    assert not m._sampler.running


def test_gpu_lost_while_reading_counter(monkeypatch):
    fake = install(monkeypatch, energy_mj=[5, 6])
    m = NvmlMeter()
    fake.energy_mj = "NVMLError_GpuIsLost"
    with pytest.raises(GpuLost, match="GPU 0.*lost"):
        m.energy_j()
    fake.power_mw = "NVMLError_GpuIsLost"
    with pytest.raises(GpuLost):
        m.power_w()


def test_gpu_lost_in_sampling_thread_surfaces(monkeypatch):
    fake = install(monkeypatch, energy_mj=None, power_mw=30_000)
    m = NvmlMeter(sample_interval_s=0.002)
    try:
        fake.power_mw = "NVMLError_GpuIsLost"
        deadline = time.monotonic() + 2.0
        while m._sampler.running and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(GpuLost):
            m.energy_j()
    finally:
        m.close()


def test_neither_energy_nor_power(monkeypatch):
    install(monkeypatch, energy_mj=None, power_mw="NVMLError_NotSupported")
    with pytest.raises(NvmlNotSupported, match="neither total energy nor power"):
        NvmlMeter()


def test_library_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with pytest.raises(NvmlUnavailable, match="pip install nvidia-ml-py"):
        create_meter("nvml")


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded",
                                   "NVMLError_NoPermission"])
def test_driver_errors_at_init(monkeypatch, error):
    install(monkeypatch, init_error=error)
    with pytest.raises(NvmlUnavailable, match="nvmlInit") as info:
        NvmlMeter()
    assert isinstance(info.value, SensorUnavailable)  # what a caller falls back on
    assert nvml._NVML is None  # a failed start is retried next time, not cached


def test_gpu_index_checks(monkeypatch):
    install(monkeypatch, count=2, energy_mj=[0])
    with pytest.raises(ValueError, match=r"gpu_index=2 is out of range.*2 GPU\(s\).*0\.\.1"):
        NvmlMeter(gpu_index=2)
    with pytest.raises(ValueError, match="gpu_index must be an int"):
        NvmlMeter(gpu_index=-1)
    assert NvmlMeter(gpu_index=1).gpu_index == 1
    install(monkeypatch, count=0)
    monkeypatch.setattr(nvml, "_NVML", None)
    with pytest.raises(NvmlUnavailable, match="no NVIDIA GPU"):
        NvmlMeter()


def test_error_translation(monkeypatch):
    fake = install(monkeypatch)

    @nvml.nvml_errors("doing a thing")
    def fails(exc):
        raise exc

    with pytest.raises(GpuLost, match="doing a thing"):
        fails(fake.NVMLError(15))  # by code, as a bare NVMLError(value) carries it
    with pytest.raises(NvmlNotSupported):
        fails(fake.NVMLError_FunctionNotFound())
    with pytest.raises(EnergyMeterError, match="doing a thing failed") as info:
        fails(fake.NVMLError(999))
    assert type(info.value) is EnergyMeterError
    with pytest.raises(KeyError):  # not an NVML error: passes through untouched
        fails(KeyError("x"))


def test_translation_of_the_real_pynvml_exceptions(monkeypatch):
    import pynvml as real  # nvidia-ml-py is in the dev extra: a missing one is a failure
    monkeypatch.setitem(sys.modules, "pynvml", real)
    with pytest.raises(GpuLost):
        with nvml.nvml_errors("reading"):
            raise real.NVMLError_GpuIsLost()
    with pytest.raises(NvmlNotSupported):
        with nvml.nvml_errors("reading"):
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)


def test_nvml_is_the_only_module_that_imports_pynvml():
    root = Path(lapdtr.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imports = {a.name.split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, ast.Import) for a in node.names}
        imports |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        if path.name == "nvml.py" and path.parent.name == "energy":
            top_level = {a.name for node in tree.body if isinstance(node, ast.Import)
                         for a in node.names}
            assert "pynvml" in imports and "pynvml" not in top_level  # lazily, inside a function
        else:
            assert "pynvml" not in imports, f"{path} imports pynvml"


@pytest.mark.gpu
def test_real_gpu_energy():
    pytest.importorskip("pynvml")
    try:
        m = NvmlMeter(gpu_index=0, sample_interval_s=0.02)
    except (NvmlUnavailable, ValueError) as e:
        pytest.skip(f"no NVIDIA GPU here: {e}")
    try:
        m.begin_window("idle")
        time.sleep(0.3)
        w = m.end_window("idle")
        assert w.measured is True and w.too_short is False
        assert w.energy_j > 0.0
        power = m.power_w()
        assert 1.0 < power < 2000.0
        # the window's mean power agrees with a point reading (the GPU idles throughout)
        assert 0.25 * power <= w.energy_j / w.time_s <= 4.0 * power
    finally:
        m.close()

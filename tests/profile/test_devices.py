"""Device files: every shipped file loads; bad input errors name the file, the device and the key."""
import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from lapdtr.energy import list_meters
from lapdtr.profile.devices import (link_between, load_devices, load_devices_dict, parse_bandwidth,
                                    parse_bytes, parse_energy, save_devices)
from lapdtr.profile.types import DeviceProfile, LinkProfile

DEVICE_DIR = Path(__file__).resolve().parents[2] / "configs" / "devices"
SHIPPED = sorted(DEVICE_DIR.glob("*.yaml"))


def test_the_three_example_files_ship():
    names = {p.name for p in SHIPPED}
    assert {"edge_heterogeneous.yaml", "jetson_tx2_x4.yaml", "gpu_node.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_device_file_loads(path):
    devices = load_devices(path)
    assert devices and all(isinstance(d, DeviceProfile) for d in devices)
    names = [d.name for d in devices]
    assert len(set(names)) == len(names)
    for d in devices:
        assert d.gflops > 0 and d.memory_bytes > 0 and d.meter in list_meters()
        assert 0 <= d.power_idle_w <= d.power_active_w
        if d.energy_budget_j is not None:
            assert 0 <= d.energy_min_j <= d.energy_remaining_j <= d.energy_budget_j
        for link in d.links:  # symmetric
            assert link_between(devices, link.peer, d.name).bytes_per_s == link.bytes_per_s


def test_edge_set_figures():
    devices = load_devices(DEVICE_DIR / "edge_heterogeneous.yaml")
    by = {d.name: d for d in devices}
    assert [d.name for d in devices] == ["xavier-nx", "jetson-tx2", "rpi4-a", "rpi4-b"]
    assert by["jetson-tx2"].energy_budget_j == pytest.approx(18.0 * 19.0 * 3600)  # 18 Ah at 19 V
    assert by["rpi4-a"].memory_bytes == 4 * 2**30
    assert by["rpi4-b"].energy_remaining_j == pytest.approx(20 * 3600)
    assert by["xavier-nx"].joules_per_flop < by["rpi4-a"].joules_per_flop
    fast = link_between(devices, "xavier-nx", "jetson-tx2")
    wifi = link_between(devices, "jetson-tx2", "rpi4-b")  # from default_link
    assert fast.bytes_per_s == 125e6 and fast.latency_s == pytest.approx(2e-4)
    assert wifi.bytes_per_s == 12.5e6 and wifi.latency_s == pytest.approx(3e-3)
    assert fast.peer == "jetson-tx2" and wifi.peer == "rpi4-b"


def test_tx2_x4_is_homogeneous():
    devices = load_devices(DEVICE_DIR / "jetson_tx2_x4.yaml")
    assert len(devices) == 4
    assert len({(d.gflops, d.memory_bytes, d.power_active_w, d.energy_budget_j) for d in devices}) == 1
    assert all(len(d.links) == 3 for d in devices)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    devices = load_devices(DEVICE_DIR / "edge_heterogeneous.yaml")
    devices[0].measured = {"gflops": True}
    devices[0].links[0].measured = devices[1].links[0].measured = True  # xavier-nx <-> jetson-tx2
    path = save_devices(devices, tmp_path / f"devices{suffix}")
    again = load_devices(path)
    assert [d.to_dict() for d in again] == [d.to_dict() for d in devices]


def test_link_between():
    devices = load_devices_dict({
        "devices": [{"name": n, "gflops": 1, "memory": "1GB"} for n in ("a", "b", "c")],
        "links": [{"a": "a", "b": "b", "bandwidth": "8Mbps", "latency_ms": 1}],
    })
    assert link_between(devices, "b", "a") == LinkProfile(peer="a", bytes_per_s=1e6,
                                                          latency_s=1e-3)
    assert link_between(devices, devices[0], devices[1]).peer == "b"
    assert link_between(devices, 1, 0) == link_between(devices, "b", "a")  # ranks
    with pytest.raises(ValueError, match=r"rank 3 is out of range; allowed: 0\.\.2"):
        link_between(devices, 0, 3)
    same = link_between(devices, "c", "c")
    assert math.isinf(same.bytes_per_s) and same.latency_s == 0.0
    with pytest.raises(ValueError, match="no link between devices 'a' and 'c'.*default_link"):
        link_between(devices, "a", "c")
    with pytest.raises(ValueError, match=r"unknown device 'z'; devices: \['a', 'b', 'c'\]"):
        link_between(devices, "a", "z")


def test_defaults():
    (d,) = load_devices_dict({"devices": [{"name": "x", "gflops": 2.5, "memory": 1024}]})
    assert (d.kind, d.meter, d.energy_budget_j, d.energy_remaining_j, d.links) == \
        ("cpu", "null", None, None, [])
    (d,) = load_devices_dict({"devices": [{"name": "x", "gflops": 1, "memory": 1,
                                           "energy_budget_j": "1kJ"}]})
    assert d.energy_remaining_j == d.energy_budget_j == 1000.0  # E_i defaults to E_max


@pytest.mark.parametrize("text, value", [
    ("4GiB", 4 * 2**30), ("512MB", 512_000_000), ("1.5 GB", 1_500_000_000), (2048, 2048),
    ("64KiB", 65536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text, value", [
    ("100Mbps", 12.5e6), ("1Gbps", 125e6), ("10 kbit/s", 1250.0), ("12.5MB/s", 12.5e6),
    (3e6, 3e6), ("1GiB/s", 2**30)])
def test_parse_bandwidth(text, value):
    assert parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize("text, value", [
    ("342Wh", 1_231_200.0), ("1.2MJ", 1.2e6), ("500kJ", 5e5), ("250mJ", 0.25), (7, 7.0),
    ("1kWh", 3.6e6)])
def test_parse_energy(text, value):
    assert parse_energy(text) == pytest.approx(value)


@pytest.mark.parametrize("parse, bad", [(parse_bytes, "4 parsecs"), (parse_bandwidth, "fast"),
                                        (parse_bandwidth, "100Mb"), (parse_energy, "3 calories"),
                                        (parse_bytes, True), (parse_energy, float("inf"))])
def test_parse_rejects(parse, bad):
    with pytest.raises(ValueError, match="expected"):
        parse(bad)


GOOD = {
    "devices": [
        {"name": "tx2", "kind": "jetson", "gflops": 665.6, "memory": "8GiB", "power_active_w": 15,
         "power_idle_w": 2, "energy_budget_j": 1000, "meter": "simulated"},
        {"name": "pi", "kind": "cpu", "gflops": 48, "memory": "4GiB", "power_active_w": 6.4,
         "power_idle_w": 2.7},
    ],
    "links": [{"a": "tx2", "b": "pi", "bandwidth": "100Mbps", "latency_ms": 3}],
}


def edit(path, value=None, *, delete=False):
    """A copy of GOOD with ``path`` (keys and indices) set to ``value`` or deleted."""
    data = copy.deepcopy(GOOD)
    node = data
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    elif isinstance(node, list) and path[-1] == len(node):
        node.append(value)
    else:
        node[path[-1]] = value
    return data


BAD = {
    "unknown device key": (edit(("devices", 0, "gflop"), 5), ["device 'tx2'", "'gflop'",
                                                              "unknown key", "allowed", "'gflops'"]),
    "negative memory": (edit(("devices", 1, "memory"), -4), ["device 'pi'", "'memory'", "> 0"]),
    "zero memory": (edit(("devices", 1, "memory"), "0GiB"), ["device 'pi'", "'memory'", "> 0"]),
    "memory unit": (edit(("devices", 1, "memory"), "4 parsecs"), ["'memory'", "GiB"]),
    "gflops type": (edit(("devices", 0, "gflops"), "fast"), ["device 'tx2'", "'gflops'",
                                                              "expected a number"]),
    "gflops bool": (edit(("devices", 0, "gflops"), True), ["'gflops'", "expected a number"]),
    "gflops zero": (edit(("devices", 0, "gflops"), 0), ["'gflops'", "> 0"]),
    "negative power": (edit(("devices", 1, "power_active_w"), -1.0), ["device 'pi'",
                                                                      "'power_active_w'", ">= 0"]),
    "idle above active": (edit(("devices", 1, "power_idle_w"), 9.0), ["'power_idle_w'",
                                                                      "allowed: 0..6.4"]),
    "negative per-byte": (edit(("devices", 1, "energy_per_byte_j"), -1e-9), ["'energy_per_byte_j'"]),
    "remaining above budget": (edit(("devices", 0, "energy_remaining_j"), 2000),
                               ["device 'tx2'", "'energy_remaining_j'", "allowed: 0..1000"]),
    "remaining without budget": (edit(("devices", 1, "energy_remaining_j"), 5),
                                 ["device 'pi'", "'energy_remaining_j'", "energy_budget_j"]),
    "min above budget": (edit(("devices", 0, "energy_min_j"), 5000), ["'energy_min_j'",
                                                                      "allowed: 0..1000"]),
    "unknown meter": (edit(("devices", 1, "meter"), "tegrastats"),
                      ["device 'pi'", "'meter'", "'tegrastats'", "'simulated'"]),
    "unknown kind": (edit(("devices", 1, "kind"), "tpu"), ["'kind'", "'tpu'", "'jetson'"]),
    "simulated without budget": (edit(("devices", 1, "meter"), "simulated"),
                                 ["device 'pi'", "'energy_budget_j'", "simulated"]),
    "missing gflops": (edit(("devices", 1, "gflops"), delete=True), ["device 'pi'", "'gflops'",
                                                                     "missing"]),
    "duplicate names": (edit(("devices", 1, "name"), "tx2"), ["devices[1]", "'name'",
                                                              "duplicate device name 'tx2'"]),
    "device not a mapping": (edit(("devices", 2), "gpu"), ["devices[2]", "expected a mapping"]),
    "link to unknown device": (edit(("links", 0, "b"), "xavier"),
                               ["'b'", "unknown device 'xavier'", "['tx2', 'pi']"]),
    "link to itself": (edit(("links", 0, "b"), "tx2"), ["'b'", "two different devices"]),
    "duplicate link": (edit(("links", 1), {"a": "pi", "b": "tx2", "bandwidth": 5}),
                       ["link 'pi'-'tx2'", "duplicate link"]),
    "link bandwidth": (edit(("links", 0, "bandwidth"), "fast"), ["'bandwidth'", "Mbps"]),
    "link unknown key": (edit(("links", 0, "jitter_ms"), 1), ["'jitter_ms'", "allowed"]),
    "negative latency": (edit(("links", 0, "latency_ms"), -1), ["'latency_ms'", ">= 0"]),
    "default link key": (edit(("default_link",), {"bandwidth": "1Gbps", "mtu": 1500}),
                         ["default_link", "'mtu'", "allowed"]),
    "old bandwidth key": (edit(("links", 0), {"a": "tx2", "b": "pi", "bandwidth_bps": 12.5e6}),
                          ["link 'tx2'-'pi'", "'bandwidth_bps'", "was renamed", "'bandwidth'",
                           "bytes per second", "bandwidth: 12500000.0"]),
    "old default link key": (edit(("default_link",), {"bandwidth_bps": 1e8}),
                             ["default_link", "'bandwidth_bps'", "was renamed", "'bandwidth'",
                              "bytes per second"]),
    "unknown top key": (edit(("device",), []), ["top level", "'device'", "allowed"]),
    "no devices": (edit(("devices",), []), ["'devices'", "non-empty list"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_device_file_names_file_device_and_key(tmp_path, case):
    data, fragments = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        load_devices(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_good_fixture_loads():
    devices = load_devices_dict(GOOD, source="good")
    assert [d.name for d in devices] == ["tx2", "pi"]
    assert devices[0].links == [LinkProfile(peer="pi", bytes_per_s=12.5e6, latency_s=3e-3)]


def test_duplicate_yaml_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("devices:\n  - name: a\n    gflops: 1\n    gflops: 2\n    memory: 1\n")
    with pytest.raises(ValueError, match=r"dup\.yaml.*duplicate key 'gflops'"):
        load_devices(path)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ValueError, match=r"device file .*nope\.yaml.* does not exist"):
        load_devices(tmp_path / "nope.yaml")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a valid device file"):
        load_devices(path)
    path = tmp_path / "list.yaml"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"list\.yaml: top level: expected a mapping"):
        load_devices(path)


def test_the_old_link_field_name_is_an_error_giving_the_new_one(tmp_path):
    link = {"peer": "pi", "bandwidth_bps": 12.5e6, "latency_s": 3e-3}
    with pytest.raises(ValueError, match=r"'bandwidth_bps' was renamed 'bytes_per_s'.*bytes per "
                                         r"second, not bits"):
        LinkProfile.from_dict(link)
    dev = DeviceProfile(name="tx2", links=[LinkProfile("pi", 12.5e6, 3e-3)]).to_dict()
    assert dev["links"][0]["bytes_per_s"] == 12.5e6 and "bandwidth_bps" not in dev["links"][0]
    assert DeviceProfile.from_dict(dev) == DeviceProfile(name="tx2",
                                                         links=[LinkProfile("pi", 12.5e6, 3e-3)])
    dev["links"] = [link]
    with pytest.raises(ValueError, match=r"DeviceProfile 'tx2': links\[0\]: key 'bandwidth_bps' "
                                         r"was renamed 'bytes_per_s'"):
        DeviceProfile.from_dict(dev)
    path = tmp_path / "device.json"
    path.write_text(json.dumps(dev))
    with pytest.raises(ValueError, match="was renamed 'bytes_per_s'"):
        DeviceProfile.load(path)

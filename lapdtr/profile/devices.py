"""Device files: a YAML (or JSON) list of devices and the links between them, read strictly into
``DeviceProfile``s (list order = rank order) and written back.

Schema::

    description: free text                       # optional
    devices:                                     # required, one entry per rank, in rank order
      - name: tx2-0                              # required, unique
        kind: jetson                             # cpu | cuda | jetson | simulated (default cpu)
        gflops: 665.6                            # required, sustained GFLOP/s, > 0
        memory: 8GiB                             # required, bytes: int or "4GiB", "512MB", ...
        power_active_w: 15.0                     # >= 0 (default 0)
        power_idle_w: 1.9                        # >= 0, <= power_active_w (default 0)
        energy_per_byte_j: 4.0e-9                # J per byte sent or received, >= 0 (default 0)
        energy_budget_j: 342Wh                   # E_max: J or "342Wh", "1.2MJ"; null = unlimited
        energy_remaining_j: 1.0e6                # E_i, 0..E_max (default E_max)
        energy_min_j: 5.0e4                      # E_min, 0..E_max (default 0)
        meter: simulated                         # one of lapdtr.energy.list_meters() (default null)
        measured: {gflops: true}                 # optional: which fields were measured
    links:                                       # optional, symmetric
      - {a: tx2-0, b: tx2-1, bandwidth: 1Gbps, latency_ms: 0.2}
    default_link: {bandwidth: 100Mbps, latency_ms: 2}   # optional: every pair not in links

Bandwidths are bits/s with a ``bps`` unit ("100Mbps", "1Gbps"), bytes/s with ``B/s`` ("12.5MB/s"),
or a plain number of bytes/s; ``LinkProfile.bytes_per_s`` holds bytes/s. The key ``bandwidth_bps``
(the old name of that field) is an error saying so.

``default_rank_devices(world_size)``: the devices of a run given only a world size — identical CPU
ranks with a link between every pair (figures documented there, labelled not measured)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import yaml

from .types import DeviceProfile, LinkProfile

KINDS = ("cpu", "cuda", "jetson", "simulated")
TOP_KEYS = ("description", "devices", "links", "default_link")
DEVICE_KEYS = ("name", "kind", "gflops", "memory", "power_active_w", "power_idle_w",
               "energy_per_byte_j", "energy_budget_j", "energy_remaining_j", "energy_min_j",
               "meter", "measured")
REQUIRED_DEVICE_KEYS = ("name", "gflops", "memory")
_PROFILE_FIELDS = [f.name for f in dataclasses.fields(DeviceProfile)]
LINK_KEYS = ("a", "b", "bandwidth", "latency_ms", "measured")
DEFAULT_LINK_KEYS = ("bandwidth", "latency_ms")

_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
               "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_ENERGY_UNITS = {"": 1.0, "J": 1.0, "mJ": 1e-3, "kJ": 1e3, "MJ": 1e6, "mWh": 3.6, "Wh": 3600.0,
                 "kWh": 3.6e6}
_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
           "Gi": 2**30}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_bytes(v) -> int:
    """Bytes from an int or a string such as "4GiB", "512MB", "1.5 GB" (GB = 1e9, GiB = 2**30)."""
    if _is_number(v):
        return int(v)
    if isinstance(v, str):
        m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", v.strip())
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected bytes as an int or a string like '4GiB', '512MB' (units: "
                     f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {v!r}")


def parse_bandwidth(v) -> float:
    """Bytes/s from a number (bytes/s), "100Mbps"/"1Gbps"/"10 kbit/s" (bits/s) or "12.5MB/s"
    (bytes/s)."""
    if _is_number(v):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(_NUMBER + r"\s*(|k|K|M|G|T|Ki|Mi|Gi)(bps|bit/s|b/s|B/s|Bps)", v.strip())
        if m:
            value = float(m.group(1)) * _PREFIX[m.group(2)]
            return value / 8 if m.group(3) in ("bps", "bit/s", "b/s") else value
    raise ValueError("expected a bandwidth as bytes/s (a number) or a string like '100Mbps', "
                     f"'1Gbps' (bits/s) or '12.5MB/s' (bytes/s), got {v!r}")


def parse_energy(v) -> float:
    """Joules from a number (J) or a string such as "342Wh", "1.2MJ", "500kJ"."""
    if _is_number(v):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", v.strip())
        if m and m.group(2) in _ENERGY_UNITS:
            return float(m.group(1)) * _ENERGY_UNITS[m.group(2)]
    raise ValueError("expected energy in joules (a number) or a string like '342Wh', '1.2MJ', "
                     f"'500kJ' (units: {list(_ENERGY_UNITS)[1:]}), got {v!r}")


class _Checker:
    """Builds error messages that name the file, the device (or link) and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, key: str | None, problem: str):
        at = f"{self.source}: {where}" + (f": key {key!r}" if key else "")
        raise ValueError(f"{at}: {problem}")

    def mapping(self, where: str, data, allowed, required=()) -> dict:
        if not isinstance(data, dict):
            self.fail(where, None, f"expected a mapping with keys {list(allowed)}, "
                                   f"got {type(data).__name__} {data!r}")
        for k in data:
            if k not in allowed:
                self.fail(where, k, f"unknown key; allowed: {list(allowed)}")
        for k in required:
            if k not in data:
                self.fail(where, k, f"missing (required keys: {list(required)})")
        return data

    def number(self, where: str, key: str, v, *, low: float = 0.0, strict: bool = False,
               parse=None, what: str = "a number") -> float:
        try:
            x = parse(v) if parse is not None else v
        except ValueError as e:
            self.fail(where, key, str(e))
        if not _is_number(x):
            self.fail(where, key, f"expected {what}, got {type(v).__name__} {v!r}")
        if (strict and not x > low) or (not strict and not x >= low):
            self.fail(where, key, f"must be {'>' if strict else '>='} {low:g}, got {v!r}")
        return x


def _parse_device(ck: _Checker, i: int, d, meters: list[str]) -> DeviceProfile:
    where = f"devices[{i}]"
    if isinstance(d, dict) and isinstance(d.get("name"), str):
        where = f"device {d['name']!r}"
    ck.mapping(where, d, DEVICE_KEYS, REQUIRED_DEVICE_KEYS)
    name = d["name"]
    if not isinstance(name, str) or not name.strip():
        ck.fail(where, "name", f"expected a non-empty string, got {name!r}")
    kind = d.get("kind", "cpu")
    if kind not in KINDS:
        ck.fail(where, "kind", f"got {kind!r}; allowed: {list(KINDS)}")
    meter = d.get("meter", "null")
    if meter not in meters:
        ck.fail(where, "meter", f"unknown meter {meter!r}; allowed: {meters}")
    gflops = ck.number(where, "gflops", d["gflops"], strict=True)
    memory = ck.number(where, "memory", d["memory"], strict=True, parse=parse_bytes,
                       what="bytes (an int or a string like '4GiB')")
    p_active = ck.number(where, "power_active_w", d.get("power_active_w", 0.0))
    p_idle = ck.number(where, "power_idle_w", d.get("power_idle_w", 0.0))
    if p_idle > p_active:
        ck.fail(where, "power_idle_w", f"{p_idle:g} W exceeds power_active_w = {p_active:g} W; "
                                       f"allowed: 0..{p_active:g}")
    per_byte = ck.number(where, "energy_per_byte_j", d.get("energy_per_byte_j", 0.0))
    budget = d.get("energy_budget_j")
    if budget is not None:
        budget = ck.number(where, "energy_budget_j", budget, parse=parse_energy)
    remaining = d.get("energy_remaining_j")
    e_min = ck.number(where, "energy_min_j", d.get("energy_min_j", 0.0), parse=parse_energy)
    if remaining is not None:
        remaining = ck.number(where, "energy_remaining_j", remaining, parse=parse_energy)
        if budget is None:
            ck.fail(where, "energy_remaining_j", "given without energy_budget_j (E_max); set "
                                                 "energy_budget_j too")
        if remaining > budget:
            ck.fail(where, "energy_remaining_j", f"{remaining:g} J exceeds energy_budget_j = "
                                                 f"{budget:g} J; allowed: 0..{budget:g}")
    elif budget is not None:
        remaining = budget
    if budget is not None and e_min > budget:
        ck.fail(where, "energy_min_j", f"{e_min:g} J exceeds energy_budget_j = {budget:g} J; "
                                       f"allowed: 0..{budget:g}")
    if meter == "simulated" and budget is None:
        ck.fail(where, "energy_budget_j", "meter 'simulated' needs a battery capacity: set "
                                          "energy_budget_j")
    measured = d.get("measured", {})
    if not isinstance(measured, dict) or not all(
            k in _PROFILE_FIELDS and isinstance(v, bool)
            for k, v in measured.items()):
        ck.fail(where, "measured", f"expected a mapping from DeviceProfile fields {_PROFILE_FIELDS} "
                                   f"to true/false, got {measured!r}")
    return DeviceProfile(name=name, kind=kind, gflops=float(gflops), memory_bytes=int(memory),
                         power_active_w=float(p_active), power_idle_w=float(p_idle),
                         energy_per_byte_j=float(per_byte), energy_budget_j=budget,
                         energy_remaining_j=remaining, energy_min_j=float(e_min), meter=meter,
                         links=[], measured=dict(measured))


def _parse_link(ck: _Checker, where: str, d, allowed, required) -> tuple[float, float, bool]:
    if isinstance(d, dict) and "bandwidth_bps" in d:
        ck.fail(where, "bandwidth_bps", "was renamed: a link's bandwidth is key 'bandwidth' "
                                        "(LinkProfile.bytes_per_s), in bytes per second as a plain "
                                        "number, or with a unit: '1Gbps' (bits/s), '125MB/s' "
                                        f"(bytes/s); e.g. bandwidth: {d['bandwidth_bps']!r}")
    ck.mapping(where, d, allowed, required)
    bandwidth = ck.number(where, "bandwidth", d["bandwidth"], strict=True, parse=parse_bandwidth,
                          what="a bandwidth")
    latency_ms = ck.number(where, "latency_ms", d.get("latency_ms", 0.0))
    measured = d.get("measured", False)
    if not isinstance(measured, bool):
        ck.fail(where, "measured", f"expected true/false, got {measured!r}")
    return bandwidth, latency_ms / 1e3, measured


def load_devices_dict(data, *, source: str = "<devices>") -> list[DeviceProfile]:
    """Devices (rank order) from the parsed contents of a device file; errors name ``source``."""
    from ..energy import list_meters  # the energy package registers the meters

    ck = _Checker(source)
    ck.mapping("top level", data, TOP_KEYS, ("devices",))
    if "description" in data and not isinstance(data["description"], str):
        ck.fail("top level", "description", f"expected a string, got {data['description']!r}")
    entries = data["devices"]
    if not isinstance(entries, list) or not entries:
        ck.fail("top level", "devices", f"expected a non-empty list of devices, got {entries!r}")
    meters = list_meters()
    devices: list[DeviceProfile] = []
    for i, d in enumerate(entries):
        dev = _parse_device(ck, i, d, meters)
        if any(o.name == dev.name for o in devices):
            ck.fail(f"devices[{i}]", "name", f"duplicate device name {dev.name!r}; names must "
                                             "be unique")
        devices.append(dev)
    names = [d.name for d in devices]
    pairs: dict[frozenset, LinkProfile] = {}
    links = data.get("links", [])
    if not isinstance(links, list):
        ck.fail("top level", "links", f"expected a list of links, got {links!r}")
    for j, link in enumerate(links):
        where = f"links[{j}]"
        if isinstance(link, dict) and "a" in link and "b" in link:
            where = f"link {link.get('a')!r}-{link.get('b')!r}"
        bandwidth, latency_s, measured = _parse_link(ck, where, link, LINK_KEYS,
                                                     ("a", "b", "bandwidth"))
        for end in ("a", "b"):
            if link[end] not in names:
                ck.fail(where, end, f"unknown device {link[end]!r}; devices: {names}")
        if link["a"] == link["b"]:
            ck.fail(where, "b", f"a link joins two different devices, got {link['a']!r} twice")
        pair = frozenset((link["a"], link["b"]))
        if pair in pairs:
            ck.fail(where, None, "duplicate link between the same two devices")
        pairs[pair] = LinkProfile(peer="", bytes_per_s=bandwidth, latency_s=latency_s,
                                  measured=measured)
    default = None
    if data.get("default_link") is not None:
        bandwidth, latency_s, _ = _parse_link(ck, "default_link", data["default_link"],
                                              DEFAULT_LINK_KEYS, ("bandwidth",))
        default = LinkProfile(peer="", bytes_per_s=bandwidth, latency_s=latency_s)
    for dev in devices:
        for peer in names:
            if peer == dev.name:
                continue
            link = pairs.get(frozenset((dev.name, peer)), default)
            if link is not None:
                dev.links.append(LinkProfile(peer=peer, bytes_per_s=link.bytes_per_s,
                                             latency_s=link.latency_s, measured=link.measured))
    return devices


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_devices(path: str | os.PathLike) -> list[DeviceProfile]:
    """Devices from a YAML (or ``.json``) device file, in rank order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"device file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, _StrictLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid device file: {e}") from e
    return load_devices_dict(data, source=str(path))


def dump_devices_dict(devices: list[DeviceProfile]) -> dict:
    """The device-file form of ``devices`` (the inverse of ``load_devices_dict``)."""
    entries, links = [], []
    names = [d.name for d in devices]
    for i, d in enumerate(devices):
        entry = {"name": d.name, "kind": d.kind, "gflops": d.gflops, "memory": d.memory_bytes,
                 "power_active_w": d.power_active_w, "power_idle_w": d.power_idle_w,
                 "energy_per_byte_j": d.energy_per_byte_j, "energy_budget_j": d.energy_budget_j,
                 "energy_remaining_j": d.energy_remaining_j, "energy_min_j": d.energy_min_j,
                 "meter": d.meter}
        if d.measured:
            entry["measured"] = dict(d.measured)
        entries.append(entry)
        for link in d.links:
            if link.peer not in names:
                raise ValueError(f"device {d.name!r}: link to unknown device {link.peer!r}; "
                                 f"devices: {names}")
            if names.index(link.peer) > i:
                links.append({"a": d.name, "b": link.peer, "bandwidth": link.bytes_per_s,
                              "latency_ms": link.latency_s * 1e3, "measured": link.measured})
    out = {"devices": entries}
    if links:
        out["links"] = links
    return out


def save_devices(devices: list[DeviceProfile], path: str | os.PathLike) -> Path:
    """Write ``devices`` as a device file (YAML, or JSON for a ``.json`` path) that
    ``load_devices`` reads back to equal profiles. Links are written once per pair (from the
    lower rank's side)."""
    data = dump_devices_dict(devices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def get_device(devices: list[DeviceProfile], name: str) -> DeviceProfile:
    for d in devices:
        if d.name == name:
            return d
    raise ValueError(f"unknown device {name!r}; devices: {[d.name for d in devices]}")


def _device_name(devices: list[DeviceProfile], d: str | int | DeviceProfile) -> str:
    if isinstance(d, DeviceProfile):
        return d.name
    if isinstance(d, int) and not isinstance(d, bool):
        if not 0 <= d < len(devices):
            raise ValueError(f"rank {d} is out of range; allowed: 0..{len(devices) - 1}")
        return devices[d].name
    return d


def link_between(devices: list[DeviceProfile], a: str | int | DeviceProfile,
                 b: str | int | DeviceProfile) -> LinkProfile:
    """The link from ``a`` to ``b`` (names, ranks = list indices, or profiles). A device to itself
    is free: infinite bandwidth, zero latency. No link between two devices is a ``ValueError``
    naming both."""
    a, b = _device_name(devices, a), _device_name(devices, b)
    dev_a, dev_b = get_device(devices, a), get_device(devices, b)
    if a == b:
        return LinkProfile(peer=b, bytes_per_s=math.inf, latency_s=0.0)
    for src, dst in ((dev_a, b), (dev_b, a)):
        for link in src.links:
            if link.peer == dst:
                return LinkProfile(peer=b, bytes_per_s=link.bytes_per_s,
                                   latency_s=link.latency_s, measured=link.measured)
    raise ValueError(f"no link between devices {a!r} and {b!r}; {a!r} links to "
                     f"{[l.peer for l in dev_a.links]}, {b!r} links to "
                     f"{[l.peer for l in dev_b.links]} (add it under 'links' or set "
                     "'default_link' in the device file)")


# Figures of ``default_rank_devices``: documented defaults, not measured on the host they run on.
# Link: a gloo send/recv ping-pong between two local processes (torch 2.14, one x86 Xeon VM,
# messages of 4 B to 32 MB) took 80-90 us one way and moved 2.5-2.9 GB/s from 4 MB up.
DEFAULT_RANK_BYTES_PER_S = 2.5e9  # bytes (not bits) per second
DEFAULT_RANK_LATENCY_S = 85e-6
# Compute: ``measure_gflops()`` (1024^2 fp32 matmul) on one thread of that Xeon gave 190 GFLOP/s;
# a rank shares its host's cores with the others, so the default is about half of that.
DEFAULT_RANK_GFLOPS = 100.0


def default_rank_devices(world_size: int, *, gflops: float | None = None, bandwidth=None,
                         latency_s: float | None = None, memory_bytes: int = 0,
                         names=None) -> list[DeviceProfile]:
    """The devices of a run launched with only a world size: ``world_size`` identical CPU devices
    named ``rank0`` .. ``rank{N-1}`` (or ``names``, in rank order) with a link between every pair.

    ``gflops`` (default ``DEFAULT_RANK_GFLOPS``), ``bandwidth`` (bytes/s as a number, or a string
    such as ``"10Gbps"`` / ``"2.5GB/s"``; default ``DEFAULT_RANK_BYTES_PER_S``) and ``latency_s``
    (one way; default ``DEFAULT_RANK_LATENCY_S``) are the documented defaults above unless given;
    ``measured`` says so (False: defined, not measured on this host — pass
    ``gflops=measure_gflops()`` for a measured figure). ``memory_bytes`` 0 means no limit (local
    ranks share the host's memory). No power model: power and J/byte are 0, so energy objectives
    see no energy; use ``objective="throughput"`` on these devices to balance the pipeline.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    names = [f"rank{r}" for r in range(world_size)] if names is None else list(names)
    if len(names) != world_size or len(set(names)) != world_size \
            or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be {world_size} distinct non-empty strings, got {names!r}")
    ck = _Checker("default_rank_devices")
    g = ck.number("arguments", "gflops", DEFAULT_RANK_GFLOPS if gflops is None else gflops,
                  strict=True)
    bw = ck.number("arguments", "bandwidth",
                   DEFAULT_RANK_BYTES_PER_S if bandwidth is None else bandwidth, strict=True,
                   parse=parse_bandwidth, what="a bandwidth")
    lat = ck.number("arguments", "latency_s",
                    DEFAULT_RANK_LATENCY_S if latency_s is None else latency_s)
    mem = ck.number("arguments", "memory_bytes", memory_bytes, parse=parse_bytes,
                    what="bytes (an int or a string like '4GiB')")
    measured = {"gflops": False, "memory_bytes": False, "links": False}
    return [DeviceProfile(name=n, kind="cpu", gflops=float(g), memory_bytes=int(mem),
                          links=[LinkProfile(peer=p, bytes_per_s=float(bw), latency_s=float(lat),
                                             measured=False) for p in names if p != n],
                          measured=dict(measured))
            for n in names]

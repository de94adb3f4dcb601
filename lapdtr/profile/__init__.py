"""Profiles: per-unit model costs and per-device capabilities (``profile.json``)."""
from .devices import (default_rank_devices, link_between, load_devices, load_devices_dict,
                      save_devices)
from .device import available_memory_bytes, measure_device, measure_gflops
from .profiler import default_cache_dir, profile_cache_path, profile_model, versions
from .types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile, width_key

__all__ = ["DeviceProfile", "LinkProfile", "ModelProfile", "UnitProfile", "available_memory_bytes",
           "default_cache_dir", "default_rank_devices", "link_between", "load_devices",
           "load_devices_dict", "save_devices", "measure_device", "measure_gflops",
           "profile_cache_path", "profile_model", "versions", "width_key"]

"""Placement of ranks on a host's CPUs: pinned blocks of CPUs, and whether ranks share cores."""
import os

import pytest

from lapdtr.runtime import RunConfig
from lapdtr.runtime.placement import place_rank


@pytest.mark.parametrize("rank, world, threads, cpus, want_cpus, want_threads, over", [
    (0, 2, None, [0, 1], [0], 1, False),
    (1, 2, None, [0, 1], [1], 1, False),
    (1, 2, 2, [0, 1, 2, 3], [2, 3], 2, False),      # blocks of threads_per_rank CPUs
    (1, 2, None, [4, 5, 6, 7], [6, 7], 2, False),   # the CPUs this process may use, in order
    (2, 3, None, [0, 1], None, 1, True),            # 3 ranks on 2 CPUs: float
    (3, 4, 1, [0, 1], None, 1, True),
])
def test_place_rank(rank, world, threads, cpus, want_cpus, want_threads, over):
    pin = not over and hasattr(os, "sched_setaffinity")
    p = place_rank(rank, world, threads, pin, cpus)
    if not pin:
        want_cpus = None
    assert (p.cpus, p.threads, p.oversubscribed) == (want_cpus, want_threads, over)
    assert place_rank(rank, world, threads, False, cpus).cpus is None
    assert place_rank(rank, world, threads, None, cpus).cpus is None  # off unless asked


def test_forced_pinning_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match="pin_cpus: true, but 4 local rank.*2 CPU"):
        place_rank(0, 4, 1, True, [0, 1])


def test_pin_cpus_config_values():
    with pytest.raises(ValueError, match="pin_cpus: expected true or false"):
        RunConfig(pin_cpus="yes").validate()
    assert RunConfig(pin_cpus=False).validate().pin_cpus is False


def test_tune_malloc_config_values():
    with pytest.raises(ValueError, match="tune_malloc: expected true or false"):
        RunConfig(tune_malloc="no").validate()
    assert RunConfig().validate().tune_malloc is True


_MALLINFO = """
import ctypes, sys, torch
from lapdtr.runtime.placement import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2") or (sys.argv[1] == "tuned" and not tune_malloc()):
    print("unsupported"); sys.exit(0)
libc.mallinfo2.restype = Info
m0 = libc.mallinfo2()
x = torch.ones(6 * 2**20)  # 24 MB, more than any block freed so far
m1 = libc.mallinfo2()
del x
m2 = libc.mallinfo2()
# bytes in fresh mmaps for x; heap bytes for x; heap bytes still held after freeing x
print(m1.hblkhd - m0.hblkhd, m1.arena - m0.arena, m2.arena - m0.arena)
"""


def _mallinfo(mode):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    if out == ["unsupported"]:
        pytest.skip("not glibc >= 2.33: tune_malloc changes nothing here, or cannot be seen")
    return [int(v) for v in out]


def test_tune_malloc_keeps_large_blocks_on_the_heap():
    """A batch's activations (here 24 MB): glibc by default maps a block that size afresh and
    unmaps it when freed, so every batch faults it in again; tuned, it comes from the heap and
    stays there for the next batch."""
    size = 24 * 2**20
    mapped, heap, kept = _mallinfo("default")
    assert mapped >= size and heap < size  # the default: a fresh mapping, gone when freed
    mapped, heap, kept = _mallinfo("tuned")
    # from the heap (grown by most of it: some was free there already), and not given back
    assert mapped == 0 and heap >= size // 2 and kept == heap, (mapped, heap, kept)

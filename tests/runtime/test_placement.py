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

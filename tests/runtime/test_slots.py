"""CPU slots: at most n co-located ranks inside a slot at once; the automatic choice."""
import json
import multiprocessing as mp
import time

import pytest

from lapdtr.runtime import RunConfig
from lapdtr.runtime.slots import CpuSlots, auto_slots


@pytest.mark.parametrize("local, threads, cores, want", [
    (2, 1, 2, 0),  # fits: no limit
    (3, 1, 2, 2),
    (4, 1, 2, 2),
    (4, 2, 2, 1),
    (8, 2, 16, 0),
    (9, 2, 16, 8),
])
def test_auto_slots(local, threads, cores, want):
    assert auto_slots(local, threads, cores) == want


def _hold(rank, n, directory, out, rounds):
    slots = CpuSlots(n, rank, directory)
    spans = []
    for _ in range(rounds):
        with slots:
            t0 = time.monotonic()
            time.sleep(0.02)
            spans.append((t0, time.monotonic()))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"spans": spans, "wait_s": slots.wait_s, "acquired": slots.acquired}, f)


@pytest.mark.parametrize("n", [1, 2])
def test_at_most_n_inside_at_once(tmp_path, n):
    d, out = tmp_path / "slots", tmp_path / "out"
    out.mkdir()
    procs = [mp.get_context("fork").Process(target=_hold, args=(r, n, str(d), str(out), 6))
             for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = [json.loads((out / f"{r}.json").read_text()) for r in range(4)]
    assert all(r["acquired"] == 6 for r in res)
    events = sorted([(t0, 1) for r in res for t0, _ in r["spans"]]
                    + [(t1, -1) for r in res for _, t1 in r["spans"]], key=lambda e: (e[0], e[1]))
    inside = peak = 0
    for _, step in events:
        inside += step
        peak = max(peak, inside)
    assert peak == n  # never more than n, and the slots were used
    assert sum(r["wait_s"] for r in res) > 0.02  # 4 ranks on n < 4 slots had to wait


def test_bad_slot_counts_are_named():
    with pytest.raises(ValueError, match="cpu_slots: expected at least 1"):
        CpuSlots(0, 0)
    with pytest.raises(ValueError, match="cpu_slots: expected an integer >= 0"):
        RunConfig(cpu_slots=-1).validate()
    assert RunConfig(cpu_slots=0).validate().cpu_slots == 0

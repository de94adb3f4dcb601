"""Journal: exact round trips, durable appends, identity checks that touch nothing, torn lines."""
import json
import os

import pytest
import torch

from lapdtr.runtime import journal as journal_mod
from lapdtr.runtime.journal import Journal

ID = {"model": "deit_tiny_patch16_224", "checkpoint": "sha256:ab12", "plan": "sha256:cd34",
      "inputs": {"kind": "synthetic", "seed": 0}}


def _awkward(dtype):
    """Values whose bits matter: NaN payloads, -0.0, inf, subnormals, extremes."""
    if dtype == torch.int64:
        return torch.tensor([[-2**63, 2**63 - 1, 0], [1, -1, 12345678901234]], dtype=dtype)
    t = torch.randn(3, 5, 7).to(dtype)
    flat = t.view(-1)
    flat[:4] = torch.tensor([float("nan"), -0.0, float("inf"), torch.finfo(dtype).tiny / 4])
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    t = _awkward(dtype)
    with Journal(tmp_path / "j", ID) as j:
        assert j.record(7, t, extra={"latency_s": 0.25})
        got = j.output(7)
    with Journal(tmp_path / "j", ID) as j:  # and from disk
        again = j.output(7)
        assert j.extra(7) == {"latency_s": 0.25}
    for g in (got, again):
        assert g.dtype == dtype and g.shape == t.shape
        assert torch.equal(g.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_odd_shapes_and_views(tmp_path):
    with Journal(tmp_path, ID) as j:
        base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
        cases = {0: torch.tensor(3.5), 1: torch.empty(0, 3), 2: base.t(), 3: base[:, ::2],
                 4: torch.tensor([True, False])}
        for k, t in cases.items():
            j.record(k, t)
        for k, t in cases.items():
            assert torch.equal(j.output(k), t) and j.output(k).shape == t.shape


def test_persists_across_reopen_and_records_once(tmp_path):
    with Journal(tmp_path, ID) as j:
        assert j.record(0, torch.ones(2)) is True
        assert j.record(1, torch.zeros(2)) is True
        assert j.record(1, torch.full((2,), 9.0)) is False  # answered already: nothing written
        size = os.path.getsize(tmp_path / "journal.jsonl")
        assert len(j) == 2
    with Journal(tmp_path, ID) as j:
        assert j.completed() == {0, 1} and len(j) == 2 and 1 in j and 2 not in j
        assert j.record(1, torch.full((2,), 9.0)) is False
        assert os.path.getsize(tmp_path / "journal.jsonl") == size
        assert torch.equal(j.output(1), torch.zeros(2))
        assert j.record(2, torch.ones(3))
    with Journal(tmp_path, ID) as j:
        assert j.completed() == {0, 1, 2}
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(x)["request"] for x in lines] == [0, 1, 2]


def test_identity_mismatch_names_fields_and_touches_nothing(tmp_path):
    with Journal(tmp_path, ID) as j:
        j.record(0, torch.ones(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = {**ID, "plan": "sha256:ffff", "extra_field": 1}
    del other["inputs"]
    with pytest.raises(ValueError) as e:
        Journal(tmp_path, other)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert 'plan: expected "sha256:ffff", found "sha256:cd34"' in msg
    assert 'inputs: expected "(absent)"' in msg
    assert 'extra_field: expected 1, found "(absent)"' in msg
    assert "model:" not in msg and "checkpoint:" not in msg  # equal fields are not listed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with Journal(tmp_path, dict(reversed(list(ID.items())))) as j:  # key order does not matter
        assert j.completed() == {0}


def test_torn_last_line_is_dropped_and_truncated(tmp_path):
    with Journal(tmp_path, ID) as j:
        j.record(0, torch.ones(4))
        j.record(1, torch.full((4,), 2.0))
    log = tmp_path / "journal.jsonl"
    good = log.read_bytes()
    torn = json.dumps({"request": 2, "output": {"dtype": "float32", "shape": [4],
                                                "data": "AAAA"}})[:25]
    log.write_bytes(good + torn.encode())
    with Journal(tmp_path, ID) as j:
        assert j.completed() == {0, 1}
        assert log.read_bytes() == good  # truncated on open, before any append
        j.record(2, torch.full((4,), 3.0))
    with Journal(tmp_path, ID) as j:
        assert j.completed() == {0, 1, 2}
        assert torch.equal(j.output(2), torch.full((4,), 3.0))


def test_damage_before_the_last_line_is_an_error(tmp_path):
    with Journal(tmp_path, ID) as j:
        j.record(0, torch.ones(1))
        j.record(1, torch.ones(1))
    log = tmp_path / "journal.jsonl"
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(lines[0][:-3] + b"\n" + lines[1] + b"\n")
    before = log.read_bytes()
    with pytest.raises(ValueError, match="line 1 is not a journal record"):
        Journal(tmp_path, ID)
    assert log.read_bytes() == before


def test_every_record_is_fsynced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(journal_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    j = Journal(tmp_path, ID)
    opened = len(calls)
    assert opened >= 2  # state.json and the directory
    for k in range(5):
        j.record(k, torch.ones(3))
        assert len(calls) == opened + k + 1
    j.record(0, torch.ones(3))  # a duplicate writes nothing
    assert len(calls) == opened + 5
    j.close()


def test_one_writer_and_bad_input(tmp_path):
    with Journal(tmp_path, ID) as j:
        with pytest.raises(ValueError, match="open in another process"):
            Journal(tmp_path, ID)
        with pytest.raises(ValueError, match="request must be an int"):
            j.record("3", torch.ones(1))
        with pytest.raises(ValueError, match="torch.Tensor"):
            j.record(3, [1.0])
        with pytest.raises(KeyError, match="request 9 is not in journal"):
            j.output(9)
    with pytest.raises(ValueError, match="closed"):
        j.record(3, torch.ones(1))
    with pytest.raises(ValueError, match="JSON-able"):
        Journal(tmp_path / "x", {"model": object()})

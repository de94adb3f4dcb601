import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lapdtr.data import (Accuracy, PredictionWriter, read_predictions, reference_accuracy,
                         topk_predictions)


def test_topk_predictions_are_softmax_probs_most_probable_first():
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)], [2.0, 2.0 + math.log(4.0), 2.0]])
    assert topk_predictions(logits, 2) == [[[2, 0.6], [1, 0.3]], [[1, 0.666667], [0, 0.166667]]]
    assert [c for c, _ in topk_predictions(logits, 10)[0]] == [2, 1, 0]  # k capped at classes
    with pytest.raises(ValueError, match="logits"):
        topk_predictions(torch.zeros(3), 1)


def test_writer_appends_one_complete_line_per_input(tmp_path):
    path = tmp_path / "run" / "predictions.jsonl"
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)], [5.0, 0.0, 0.0]])
    with PredictionWriter(path, topk=2) as w:
        assert w.write_batch(logits, request=0, indices=[0, 1], targets=torch.tensor([2, -1])) == 2
        w.write(2, 1, [[1, 0.5], [0, 0.25]], None)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and path.read_text().endswith("\n")
    assert json.loads(lines[0]) == {"index": 0, "request": 0, "topk": [[2, 0.6], [1, 0.3]], "target": 2}
    assert json.loads(lines[1])["target"] is None and json.loads(lines[1])["topk"][0][0] == 0
    assert json.loads(lines[2]) == {"index": 2, "request": 1, "topk": [[1, 0.5], [0, 0.25]], "target": None}
    assert read_predictions(path) == [json.loads(x) for x in lines]
    with pytest.raises(ValueError, match="indices"):
        with PredictionWriter(path) as w:
            w.write_batch(logits, request=0, indices=[0])


def test_a_crash_leaves_complete_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    code = (f"import os\nfrom lapdtr.data import PredictionWriter\n"
            f"w = PredictionWriter({str(path)!r})\n"
            "for i in range(3):\n    w.write(i, i, [[0, 1.0]], i)\n"
            "os._exit(9)  # no close, no interpreter shutdown: only what was flushed survives\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert [p["index"] for p in read_predictions(path)] == [0, 1, 2]


def test_read_tolerates_a_torn_last_line_and_writer_cuts_it(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionWriter(path) as w:
        for i in range(3):
            w.write(i, 0, [[1, 0.9]], 1)
    with open(path, "a") as f:
        f.write('{"index": 3, "request": 0, "to')  # the crash came mid-line
    assert [p["index"] for p in read_predictions(path)] == [0, 1, 2]
    with PredictionWriter(path) as w:  # resuming: the torn tail goes, new lines start clean
        w.write(3, 1, [[0, 0.7]], None)
    assert [p["index"] for p in read_predictions(path)] == [0, 1, 2, 3]
    assert len(path.read_text().splitlines()) == 4


def test_read_refuses_a_broken_line_before_the_end(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"index": 0}\n{"index": 1, "to\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON line"):
        read_predictions(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_predictions(tmp_path / "nope.jsonl")


def test_accuracy_hand_computed():
    # 6 classes; row ranks (most probable first):
    #   row 0: 5 4 3 2 1 0 -> target 5: top1 hit
    #   row 1: 0 1 2 3 4 5 -> target 4: 5th place, top5 hit, top1 miss
    #   row 2: 0 1 2 3 4 5 -> target 5: 6th place, miss both
    #   row 3: unlabelled (-1) -> ignored
    up = torch.arange(6, dtype=torch.float32)
    logits = torch.stack([up, -up, -up, up])
    acc = Accuracy()
    acc.update(logits[:2], torch.tensor([5, 4]))
    acc.update(logits[2:], [5, -1])
    assert acc.count == 3 and acc.num_ignored == 1
    assert acc.top1 == pytest.approx(1 / 3) and acc.top5 == pytest.approx(2 / 3)
    assert acc.to_dict() == {"count": 3, "top1": 1 / 3, "top5": 2 / 3, "num_ignored": 1}


def test_accuracy_with_fewer_than_five_classes_and_no_labels():
    acc = Accuracy()
    acc.update(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), [0, 0])
    assert (acc.top1, acc.top5) == (0.5, 1.0)  # top-5 is top-3 with three classes
    none = Accuracy()
    none.update(torch.zeros(2, 4), [-1, -1])
    assert none.to_dict() == {"count": 0, "top1": None, "top5": None, "num_ignored": 2}
    with pytest.raises(ValueError, match="class 7 is out of range for 3 logits"):
        acc.update(torch.zeros(1, 3), [7])
    with pytest.raises(ValueError, match="do not match"):
        acc.update(torch.zeros(2, 3), [1])


class _FlipsWhenTraining(nn.Module):
    def forward(self, x):
        return -x if self.training else x


def test_reference_accuracy_runs_the_model_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 3), _FlipsWhenTraining())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3, 4))
        model[0].bias.zero_()
    x = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 1, 0], [0, 0, 3.0, 0], [0, 0, 3.0, 0]])
    t = torch.tensor([0, 2, 2, -1])  # hits, misses (2nd of 3), hits, ignored
    model.train()
    loader = [(x[:2], t[:2]), (x[2:], t[2:])]
    assert reference_accuracy(model, loader) == {"count": 3, "top1": 2 / 3, "top5": 1.0,
                                                 "num_ignored": 1}
    assert model.training  # restored

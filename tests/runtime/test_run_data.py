"""``lapdtr run`` on real inputs: the ``data:`` block, predictions.jsonl, accuracy beside the
single-process reference, and resuming from the journal a restarted run keeps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lapdtr.data import DataConfig, build_dataset, digits_model_kwargs, read_predictions
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.stages import load_model

ROOT = Path(__file__).resolve().parents[2]
KW = digits_model_kwargs("resnet10t", 32)


def _digits():
    """The run's inputs, preprocessed for the model as the run does."""
    from lapdtr.runtime.stages import build_host

    host, _ = build_host("resnet10t", KW, 32)
    return build_dataset(DataConfig(kind="digits"), host, img_size=32)


def _cfg(ckpt, out, **kw):
    d = {"model": "resnet10t", "model_kwargs": KW, "img_size": 32, "world_size": 3,
         "checkpoint": str(ckpt), "data": "digits", "batch_size": 8, "out": str(out),
         "plots": False, "cuts": ["layer1.0", "layer3.0"], **kw}
    return RunConfig.from_dict(d)


@pytest.fixture(scope="module")
def digits_run(digits_trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-run")
    cfg = _cfg(digits_trained["path"], out, resume=True, save_outputs=True)
    return cfg, run(cfg, timeout_s=300)


def test_digits_run_accuracy_equals_the_single_process_model(digits_run, digits_trained):
    cfg, r = digits_run
    ds = _digits()
    n = len(ds)
    assert n == 359 and r.meta["data"]["inputs"] == n
    assert r.completed == r.requests == -(-n // 8) == 45  # the last request is short (7)
    assert [len(k.units) > 0 for k in r.ranks] == [True] * 3
    acc, ref = r.meta["accuracy"], r.meta["reference_accuracy"]
    assert acc["count"] == ref["count"] == n
    assert acc["top1"] == ref["top1"] and acc["top5"] == ref["top5"]
    assert acc["top1"] > 0.9  # trained here: not chance (0.1)
    # the reference is the checkpoint whole in one process: recompute it independently
    model = load_model("resnet10t", digits_trained["path"], KW)
    x = torch.stack([ds[i][0] for i in range(n)])
    t = torch.tensor([ds[i][1] for i in range(n)])
    with torch.no_grad():
        y = model(x)
    assert int((y.argmax(1) == t).sum()) / n == acc["top1"]
    # outputs of the distributed run match the whole model's, request by request
    from safetensors.torch import load_file

    outs = load_file(str(Path(cfg.out) / "outputs.safetensors"))
    assert sorted(outs) == sorted(f"request{i}" for i in range(45))
    got = torch.cat([outs[f"request{i}"] for i in range(45)])
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_predictions_have_one_line_per_input_in_order(digits_run):
    cfg, r = digits_run
    lines = read_predictions(Path(cfg.out) / "predictions.jsonl")
    ds = _digits()
    assert [ln["index"] for ln in lines] == list(range(len(ds)))
    assert [ln["request"] for ln in lines] == [i // 8 for i in range(len(ds))]
    assert [ln["target"] for ln in lines] == [ds[i][1] for i in range(len(ds))]
    assert all(len(ln["topk"]) == 5 for ln in lines)
    top1 = sum(ln["topk"][0][0] == ln["target"] for ln in lines) / len(lines)
    assert top1 == pytest.approx(r.meta["accuracy"]["top1"])


def test_a_restarted_run_computes_only_what_its_journal_lacks(digits_run, tmp_path):
    cfg, first = digits_run
    out = Path(cfg.out)
    before = (out / "predictions.jsonl").read_text()
    log = out / "journal" / "journal.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 45
    # the crash: 5 requests answered but never recorded, and a torn line after them
    log.write_text("".join(lines[:40]) + lines[40][:30])
    (out / "predictions.jsonl").write_text(before[:len(before) // 3] + '{"index": 1')
    again = run(cfg, timeout_s=300)
    assert again.meta["resumed_requests"] == 40
    assert again.completed == again.requests == 5  # computed now: only the missing ones
    assert (out / "predictions.jsonl").read_text() == before  # rebuilt, no line twice
    assert again.meta["accuracy"] == first.meta["accuracy"]
    assert len(log.read_text().splitlines()) == 45


def test_a_journal_of_another_run_is_refused_untouched(digits_run):
    cfg, _ = digits_run
    log = Path(cfg.out) / "journal" / "journal.jsonl"
    before = log.read_bytes()
    other = _cfg(cfg.checkpoint, cfg.out, resume=True, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        run(other, timeout_s=120)
    assert log.read_bytes() == before


def test_a_data_root_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=r"data\.root: .*no-such-folder.* does not exist"):
        RunConfig.from_dict({"model": "resnet10t", "data": {"kind": "image_folder",
                                                            "root": str(missing)}})
    with pytest.raises(ValueError, match=r"data\.kind: 'imagenet' is not allowed"):
        RunConfig.from_dict({"model": "resnet10t", "data": {"kind": "imagenet"}})
    with pytest.raises(ValueError, match="data: kind 'digits' runs in mode 'pipeline'"):
        RunConfig.from_dict({"model": "resnet10t", "mode": "tensor", "data": "digits"})
    with pytest.raises(ValueError, match=r"data\.reference: expected true or false"):
        RunConfig.from_dict({"model": "resnet10t", "data": {"kind": "digits", "reference": 1}})


def test_requests_cap_data_and_default_to_sixteen_synthetic():
    assert RunConfig().num_requests == 16
    assert RunConfig(requests=3).num_requests == 3
    cfg = RunConfig.from_dict({"data": "digits", "requests": 2, "batch_size": 4})
    assert cfg.data.kind == "digits" and cfg.requests == 2
    assert RunConfig.from_dict(cfg.to_dict()).data == cfg.data  # config.json reads back


def _write_folder(root: Path, per_class: int = 3):
    """Digits test images as PNG files, root/<class>/<i>.png (real labelled images, offline)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    count = {}
    for img, t in zip(d.images, d.target):
        if count.get(int(t), 0) >= per_class:
            continue
        count[int(t)] = count.get(int(t), 0) + 1
        (root / str(t)).mkdir(parents=True, exist_ok=True)
        px = (img / 16.0 * 255).astype("uint8")
        Image.fromarray(px, mode="L").convert("RGB").resize((32, 32)).save(
            root / str(t) / f"{count[int(t)]}.png")
    return sum(count.values())


def test_classify_an_image_folder_on_two_ranks(digits_trained, tmp_path):
    n = _write_folder(tmp_path / "images")
    out = tmp_path / "cls"
    p = subprocess.run([sys.executable, str(ROOT / "infer" / "classify.py"), "--model",
                        "resnet10t", "--checkpoint", str(digits_trained["path"]),
                        "--model-kwargs", json.dumps(KW), "--root", str(tmp_path / "images"),
                        "--nproc", "2", "--img-size", "32", "--batch-size", "4", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout[p.stdout.index("{"):])
    report = json.loads((out / "report.json").read_text())
    assert printed == report["meta"]["accuracy"]
    assert printed["count"] == n == 30
    assert report["meta"]["reference_accuracy"] == printed
    assert len(read_predictions(out / "predictions.jsonl")) == n


def test_classify_names_a_missing_folder(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "infer" / "classify.py"), "--model",
                        "resnet10t", "--root", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert "data.root" in p.stderr and "does not exist" in p.stderr


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None,
                    reason="torchrun is not installed")
def test_torchrun_restart_of_infer_run_resumes_from_its_journal(digits_trained, tmp_path):
    """infer/run.py under torchrun --max-restarts 1: rank 1 is SIGKILLed at request 20 (torchrun
    then tears the group down and restarts it); the restarted attempt computes only the requests
    the journal lacks, and predictions.jsonl equals a run that was never interrupted."""
    import yaml

    cfg = _cfg(digits_trained["path"], tmp_path / "run",
               faults=[{"kind": "kill", "rank": 1, "at_request": 20}]).to_dict()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "3", "--max-restarts",
                        "1", str(ROOT / "infer" / "run.py"), "--config", str(path)],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "not injected again" in p.stderr  # the second attempt ran
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    resumed = report["meta"]["resumed_requests"]
    assert 0 < resumed < 45 and report["completed"] == 45 - resumed
    lines = read_predictions(tmp_path / "run" / "predictions.jsonl")
    assert [ln["index"] for ln in lines] == list(range(359))  # each input once, in order
    journal = (tmp_path / "run" / "journal" / "journal.jsonl").read_text().splitlines()
    assert sorted(json.loads(ln)["request"] for ln in journal) == list(range(45))
    ref = run(_cfg(digits_trained["path"], tmp_path / "whole", world_size=1, cuts=None),
              timeout_s=300)
    assert report["meta"]["accuracy"] == ref.meta["accuracy"]
    want = read_predictions(tmp_path / "whole" / "predictions.jsonl")
    assert [ln["topk"][0][0] for ln in lines] == [ln["topk"][0][0] for ln in want]

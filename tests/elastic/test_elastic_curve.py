"""``lapdtr elastic-curve``: every allowed width in the table, JSON and PNG; FLOPs fall with the
width; accuracy on the digits where asked, usable as plan_widths' accuracy; bad input named."""
import json

import pytest

import lapdtr
from lapdtr.cli import main
from lapdtr.elastic.curve import curve_accuracy
from lapdtr.elastic.policy import allowed_widths
from lapdtr.elastic.train import train_elastic_digits

MODEL = "deit_tiny_patch16_224"
KW = dict(depth=1, num_heads=4, embed_dim=32, patch_size=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("curve") / "deit-elastic.safetensors"
    return train_elastic_digits(MODEL, path, img_size=16, epochs=1, model_kwargs=KW,
                                batch_size=128)


def _curve(args, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["elastic-curve", "--model", MODEL, "--repeats", "2", "--warmup", "0",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *args])
    text = capsys.readouterr()
    assert rc == 0, text.err
    return json.loads((out / "elastic_curve.json").read_text()), out, text.out


def test_curve_with_digits_has_every_width_flops_falling_and_accuracy(ckpt, tmp_path, capsys):
    curve, out, text = _curve(["--checkpoint", ckpt["path"], "--data", "digits"], tmp_path,
                              capsys)
    model = lapdtr.create_model(MODEL, **ckpt["model_kwargs"])  # kwargs read from the file
    want = allowed_widths(model)
    assert want == [1.0, 0.75, 0.5, 0.25]
    assert curve["widths"] == want and [r["width"] for r in curve["rows"]] == want
    assert curve["img_size"] == 16 and curve["model_kwargs"] == ckpt["model_kwargs"]
    flops = [r["flops"] for r in curve["rows"]]
    assert all(a > b for a, b in zip(flops, flops[1:]))
    assert curve["rows"][0]["flops_ratio"] == 1.0 and curve["rows"][-1]["flops_ratio"] < 0.6
    assert all(r["latency_s"] > 0 for r in curve["rows"])
    assert [r["heads"] for r in curve["rows"]] == [[[k, 4]] for k in (4, 3, 2, 1)]
    # the accuracy is the trainer's, per width, and plan_widths reads it
    assert curve["accuracy"] == ckpt["accuracy"]
    assert [r["top1"] for r in curve["rows"]] == [ckpt["accuracy"][f"{w:.6f}"] for w in want]
    acc = curve_accuracy(out)
    assert sorted(acc) == sorted(want)
    png = (out / "elastic_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = [line.split() for line in text.splitlines()]
    assert [t[0] for t in table if t and t[0][0].isdigit()] == ["1", "0.75", "0.5", "0.25"]
    assert "%" in text and "wrote" in text


def test_curve_accuracy_is_plan_widths_accuracy(ckpt, tmp_path, capsys):
    from lapdtr.plan import plan_widths
    from lapdtr.profile import DeviceProfile, LinkProfile, profile_model

    curve, out, _ = _curve(["--checkpoint", ckpt["path"], "--data", "digits"], tmp_path, capsys)
    model = lapdtr.create_model(MODEL, **ckpt["model_kwargs"])
    prof = profile_model(model, img_size=16, repeats=1, warmup=0, widths="all",
                         use_cache=False)
    dev = DeviceProfile(name="d0", kind="simulated", gflops=10.0, memory_bytes=10**9,
                        power_active_w=5.0, power_idle_w=0.5, energy_per_byte_j=1e-9,
                        links=[LinkProfile(peer="*", bytes_per_s=1e8, latency_s=1e-3)])
    plan = plan_widths(prof, [dev], strategy="lapdtr", accuracy=curve["accuracy"])
    assert plan.meta["width_selection"]["accuracy_source"] == "given"
    plan = plan_widths(prof, [dev], strategy="lapdtr", accuracy=curve_accuracy(curve))
    assert plan.meta["width_selection"]["accuracy_source"] == "given"


def test_curve_without_data_has_no_accuracy(tmp_path, capsys):
    curve, out, text = _curve(["--model-kwargs", json.dumps(KW), "--img-size", "16"],
                              tmp_path, capsys)
    assert curve["accuracy"] is None and all(r["top1"] is None for r in curve["rows"])
    assert curve["widths"] == [1.0, 0.75, 0.5, 0.25]
    assert "random weights" in text and (out / "elastic_curve.png").is_file()
    with pytest.raises(ValueError, match="has no accuracy"):
        curve_accuracy(curve)


@pytest.mark.parametrize("args, message", [
    (["--model", "not_a_model"], "model 'not_a_model'"),
    (["--model", "resnet10t"], "'resnet10t' is a resnet model, a family without elastic "
                               "layers; allowed: a model of ['edgevit', 'efficientvit_b'"),
    (["--model", MODEL, "--checkpoint", "/nonexistent/x.safetensors"],
     "checkpoint '/nonexistent/x.safetensors' does not exist"),
    (["--model", MODEL, "--model-kwargs", "{depth: 1"], "--model-kwargs: not JSON"),
    (["--model", MODEL, "--model-kwargs", "[1]"], "--model-kwargs: expected a JSON object"),
    (["--model", MODEL, "--model-kwargs", '{"depth": 1, "img_size": 16}', "--data", "digits"],
     "data 'digits' has 10 classes but the model has 1000 outputs; allowed: a 10-class model"),
])
def test_bad_input_is_named(args, message, tmp_path, capsys):
    assert main(["elastic-curve", *args, "--repeats", "1", "--no-cache",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "not_a_model" in args:
        assert "supported families" in err
    assert not (tmp_path / "o" / "elastic_curve.json").exists()


def test_a_checkpoint_of_another_model_is_named(ckpt, tmp_path, capsys):
    assert main(["elastic-curve", "--model", MODEL, "--checkpoint", ckpt["path"],
                 "--model-kwargs", '{"depth": 2, "num_heads": 4, "embed_dim": 32, '
                 '"patch_size": 8, "num_classes": 10, "img_size": 16}',
                 "--no-cache", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match model" in err and "missing" in err and "blocks.1." in err


def test_unknown_data_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["elastic-curve", "--model", MODEL, "--data", "imagenet", "--out", "/tmp/x"])
    err = capsys.readouterr().err
    assert "argument --data: invalid choice: 'imagenet'" in err and "digits" in err

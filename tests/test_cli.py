import json
import subprocess
import sys

from lapdtr.cli import main


def test_models_lists_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for fam in ("vit", "tiny_vit", "efficientvit_m", "efficientvit_b", "resnet", "mobilenet", "vgg"):
        assert f"\n{fam} " in "\n" + out
    assert "deit_tiny_patch16_224" in out


def test_profile_writes_json(tmp_path, capsys):
    assert main(["profile", "--model", "deit_tiny_patch16_224", "--repeats", "1", "--no-cache",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.11" in out and "total" in out and "GFLOP" in out
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert len(prof["units"]) == 14 and prof["model"] == "deit_tiny_patch16_224"
    assert json.loads((tmp_path / "device.json").read_text())["gflops"] > 0


def test_bad_model_is_a_clean_error(capsys):
    assert main(["profile", "--model", "not_a_model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'not_a_model': timm registers no such name" in err and "Traceback" not in err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "lapdtr.cli", "models"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "resnet" in r.stdout

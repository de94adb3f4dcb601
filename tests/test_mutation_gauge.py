"""The mutation gauge (``benchmarks/mutation.py``): every mutant still applies to the code (fast,
default run), and the gauge kills every mutant (minutes: ``-m slow``)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gauge():
    spec = importlib.util.spec_from_file_location("mutation_gauge", ROOT / "benchmarks" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutant_applies_to_the_current_code():
    gauge = _gauge()
    names = [m.name for m in gauge.MUTANTS]
    assert len(names) == len(set(names))
    for m in gauge.MUTANTS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.old) == 1, f"mutant {m.name}: its code is gone from {m.path}"
        assert m.old != m.new and m.tests


def test_unknown_mutant_is_named(capsys):
    with pytest.raises(SystemExit):
        _gauge().main(["--only", "no-such-mutant", "--list"])
    assert "unknown mutant(s) ['no-such-mutant']; mutants are:" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_gauge_kills_every_mutant(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=3500, cwd=ROOT)
    res = json.loads((tmp_path / "mutation.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert res["survived"] == [] and res["killed"] == len(_gauge().MUTANTS)

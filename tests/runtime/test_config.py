import pytest
import yaml

from lapdtr.runtime import FaultSpec, RunConfig, load_run_config
from lapdtr.runtime.cli import demo_config_path


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_shipped_configs_load():
    root = demo_config_path().parents[0]
    for name in ("demo.yaml", "pipeline_deit_tiny.yaml", "fault_kill.yaml"):
        cfg = load_run_config(root / name)
        assert cfg.model == "deit_tiny_patch16_224"
    demo = load_run_config(demo_config_path())
    assert demo.world_size == 3 and demo.requests == 200
    assert demo.devices == "configs/devices/demo.yaml"


def test_unknown_key_names_it_and_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modle'\].*allowed:.*'model'"):
        load_run_config(_write(tmp_path, {"modle": "deit_tiny_patch16_224"}))


@pytest.mark.parametrize("data, match", [
    ({"mode": "spiral"}, r"mode: 'spiral' is not allowed; allowed: \['auto', 'pipeline', 'tensor', 'ensemble'\]"),
    ({"backend": "mpi"}, r"backend: 'mpi' is not allowed"),
    ({"world_size": 0}, r"world_size: expected an integer >= 1, got 0"),
    ({"requests": "many"}, r"requests: expected int, got 'many'"),
    ({"micro_batches": 4, "batch_size": 2}, r"micro_batches: 4 is more than batch_size 2"),
    ({"heartbeat_timeout_s": 0.05, "heartbeat_interval_s": 0.1}, r"heartbeat_timeout_s"),
    ({"cuts": [2, 4], "world_size": 2}, r"cuts: 2 cuts make 3 stages, more than world_size=2"),
    ({"faults": [{"kind": "explode", "rank": 1}]}, r"faults\[0\].kind: 'explode' is not allowed"),
    ({"faults": [{"kind": "kill", "rank": 5}], "world_size": 2}, r"faults\[0\].rank: 5 is not a launched rank"),
    ({"faults": [{"kind": "kill", "rank": 0}]}, r"rank 0 is the coordinator"),
    ({"faults": [{"kind": "kill", "rank": 1, "when": 3}]}, r"faults\[0\]: unknown key"),
    ({"progress": "yes"}, r"progress: expected bool"),
])
def test_bad_values_name_key_and_allowed(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(_write(tmp_path, data))


def test_missing_file_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    cfg = RunConfig(faults=[FaultSpec("drain", 1, 3)], world_size=3).validate()
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_cli_reports_config_errors(tmp_path, capsys):
    from lapdtr.runtime.cli import main

    bad = _write(tmp_path, {"world_size": "three"})
    assert main(["run", "--config", str(bad)]) == 2
    assert "world_size: expected int, got 'three'" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "none.yaml")]) == 2

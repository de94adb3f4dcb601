import json

import pytest

from lapdtr.data import DATA_KINDS, DataConfig, parse_data_config


def test_parse_none_kind_and_mapping(tmp_path):
    assert parse_data_config(None) == DataConfig(kind="synthetic")
    assert parse_data_config("digits") == DataConfig(kind="digits", split="test")
    cfg = parse_data_config({"kind": "image_folder", "root": str(tmp_path), "limit": 4})
    assert (cfg.kind, cfg.root, cfg.limit, cfg.topk) == ("image_folder", str(tmp_path), 4, 5)
    assert parse_data_config(cfg) == cfg
    assert not parse_data_config(None).has_labels and cfg.has_labels


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ValueError, match=r"^data: unknown key\(s\) \['lmit'\]; allowed: \[.*'limit'.*\]"):
        parse_data_config({"kind": "digits", "lmit": 3})


def test_bad_kind_lists_allowed_kinds():
    allowed = str(list(DATA_KINDS)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=r"data.kind: 'imagenet' is not allowed; allowed: " + allowed):
        parse_data_config({"kind": "imagenet"})
    with pytest.raises(ValueError, match=r"data: 'imagenet' is not a data kind; allowed: " + allowed):
        parse_data_config("imagenet")


def test_image_folder_root_required_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match=r"data.root: kind 'image_folder' needs a root"):
        parse_data_config("image_folder")
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=rf"data.root: '{missing}' does not exist"):
        parse_data_config({"kind": "image_folder", "root": str(missing)})
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.root: .*f.png' is not a folder"):
        parse_data_config({"kind": "image_folder", "root": str(tmp_path / "f.png")})


@pytest.mark.parametrize("d, match", [
    ({"kind": "digits", "root": "/tmp"}, r"data.root: kind 'digits' reads no root"),
    ({"kind": "digits", "split": "val"}, r"data.split: 'val' is not allowed; allowed: \['test', 'train', 'all'\]"),
    ({"kind": "synthetic", "split": "train"}, r"data.split: kind 'synthetic' has no splits"),
    ({"limit": 0}, r"data.limit: expected an integer >= 1, got 0"),
    ({"limit": True}, r"data.limit: expected an integer >= 1, got True"),
    ({"shuffle": "yes"}, r"data.shuffle: expected true or false, got 'yes'"),
    ({"seed": -1}, r"data.seed: expected an integer >= 0"),
    ({"num_workers": 1.5}, r"data.num_workers: expected an integer >= 0"),
    ({"topk": 0}, r"data.topk: expected an integer >= 1"),
    ({"kind": 3}, r"data.kind: expected a string, got 3"),
])
def test_bad_values_name_the_key(d, match):
    with pytest.raises(ValueError, match=match):
        parse_data_config(d)


def test_where_prefixes_errors_and_non_mapping_is_refused():
    with pytest.raises(ValueError, match=r"^run.data.topk:"):
        parse_data_config({"topk": -2}, where="run.data")
    with pytest.raises(ValueError, match=r"data: expected a data kind .* got list"):
        parse_data_config(["digits"])


def test_round_trip_through_json(tmp_path):
    for cfg in (DataConfig(), DataConfig(kind="digits", split="all", limit=7, shuffle=True, seed=3,
                                         num_workers=1, topk=2),
                DataConfig(kind="image_folder", root=tmp_path)):
        cfg.validate()
        d = json.loads(json.dumps(cfg.to_dict()))
        assert DataConfig.from_dict(d) == cfg

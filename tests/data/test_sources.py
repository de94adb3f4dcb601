import pytest
import torch
import torch.nn.functional as F

import lapdtr
from lapdtr.data import (DataConfig, build_dataset, build_loader, digits_split, model_data_config,
                         synthetic_request)


@pytest.fixture(scope="module")
def model():
    return lapdtr.create_model("resnet10t")


# ---- synthetic ---------------------------------------------------------------------------------

def test_synthetic_request_is_the_runtime_formula():
    g = torch.Generator().manual_seed(7 * 1_000_003 + 5)
    expected = torch.randn(3, 3, 16, 16, generator=g)
    assert torch.equal(synthetic_request(7, 5, 3, 16), expected)
    assert synthetic_request(7, 5, 2, 16, in_chans=1).shape == (2, 1, 16, 16)


def test_synthetic_items_are_rows_of_requests_and_unlabelled(model):
    ds = build_dataset(DataConfig(), model, img_size=16, requests=4, batch_size=3, seed=7)
    assert len(ds) == 12 and not ds.has_labels and ds.num_classes is None
    x, t = ds[3 * 2 + 1]
    assert t == -1 and torch.equal(x, synthetic_request(7, 2, 3, 16)[1])
    batches = list(build_loader(DataConfig(), model, img_size=16, requests=4, batch_size=3, seed=7))
    assert len(batches) == 4
    for r, (xb, tb) in enumerate(batches):
        assert torch.equal(xb, synthetic_request(7, r, 3, 16)), r
        assert tb.tolist() == [-1, -1, -1]


def test_synthetic_needs_requests(model):
    with pytest.raises(ValueError, match="requests"):
        build_dataset(DataConfig(), model, img_size=16)


def test_limit_and_shuffle_fix_one_order(model):
    plain = build_dataset(DataConfig(), model, img_size=8, requests=5, batch_size=2)
    limited = build_dataset(DataConfig(limit=3), model, img_size=8, requests=5, batch_size=2)
    assert limited.indices == [0, 1, 2]
    assert [b[0].shape[0] for b in build_loader(DataConfig(limit=3), model, img_size=8,
                                                requests=5, batch_size=2)] == [2, 1]
    s1 = build_dataset(DataConfig(shuffle=True, seed=1), model, img_size=8, requests=5, batch_size=2)
    s1b = build_dataset(DataConfig(shuffle=True, seed=1), model, img_size=8, requests=5, batch_size=2)
    s2 = build_dataset(DataConfig(shuffle=True, seed=2), model, img_size=8, requests=5, batch_size=2)
    assert s1.indices == s1b.indices != s2.indices
    assert sorted(s1.indices) == plain.indices and s1.indices != plain.indices
    assert torch.equal(s1[0][0], plain[s1.indices[0]][0])


# ---- image_folder ------------------------------------------------------------------------------

def _write_folder(root, sizes=((40, 30), (50, 50), (33, 61))):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            a = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_image_folder_uses_timms_eval_transform(tmp_path, model):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    root = _write_folder(tmp_path / "imgs")
    cfg = DataConfig(kind="image_folder", root=str(root))
    ds = build_dataset(cfg, model, img_size=32)
    assert len(ds) == 6 and ds.has_labels and ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    tcfg = resolve_data_config({}, model=model)
    tcfg["input_size"] = (3, 32, 32)
    ref = create_transform(**tcfg, is_training=False)
    for i in (0, 5):
        path = ds.base.samples[ds.indices[i]][0]
        x, _ = ds[i]
        assert x.shape == (3, 32, 32)
        assert torch.equal(x, ref(Image.open(path).convert("RGB")))
    x, _ = build_dataset(cfg, model, img_size=None)[0]
    assert x.shape == resolve_data_config({}, model=model)["input_size"] == (3, 176, 176)
    xb, tb = next(iter(build_loader(cfg, model, img_size=32, batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and tb.tolist() == [0, 0, 0, 1]


def test_image_folder_without_images_names_the_root(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"data.root: '{empty}' holds no class folders of images"):
        build_dataset(DataConfig(kind="image_folder", root=str(empty)), model, img_size=32)
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=rf"data.root: '{empty}' holds no class folders of images"):
        build_dataset(DataConfig(kind="image_folder", root=str(empty)), model, img_size=32)
    gone = tmp_path / "gone"
    cfg = DataConfig(kind="image_folder", root=str(empty))
    cfg.root = str(gone)  # vanished after the config was read
    with pytest.raises(ValueError, match=rf"data.root: '{gone}' does not exist"):
        build_dataset(cfg, model, img_size=32)


# ---- digits ------------------------------------------------------------------------------------

def test_digits_split_is_deterministic_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    labels = torch.tensor(load_digits().target)
    train, test = digits_split()
    assert (train, test) == digits_split(0.8, 0)
    assert sorted(train + test) == list(range(1797)) and not set(train) & set(test)
    assert abs(len(train) - 0.8 * 1797) < 10
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int((labels[test] == c).sum()) - 0.2 * n_c) <= 1
    assert digits_split(seed=1)[1] != test
    assert len(digits_split(0.5)[0]) == pytest.approx(1797 / 2, abs=10)
    with pytest.raises(ValueError, match="train_fraction"):
        digits_split(1.0)


def test_digits_shapes_labels_and_normalization(model):
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = build_dataset(DataConfig(kind="digits"), model, img_size=32)
    _, test = digits_split()
    assert ds.indices == test and ds.num_classes == 10 and ds.has_labels
    assert ds.classes == [str(c) for c in range(10)]
    assert [ds[i][1] for i in range(20)] == d.target[test[:20]].tolist()
    mcfg = model_data_config(model)
    mean = torch.tensor(mcfg["mean"]).view(3, 1, 1)
    std = torch.tensor(mcfg["std"]).view(3, 1, 1)
    x, _ = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    img = torch.tensor(d.images[test[4]], dtype=torch.float32)[None, None] / 16
    up = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x, (up - mean) / std, atol=1e-6)
    assert torch.allclose(x * std + mean, up.expand(3, -1, -1), atol=1e-6)
    assert 0 <= float((x * std + mean).min()) and float((x * std + mean).max()) <= 1 + 1e-6
    train = build_dataset(DataConfig(kind="digits", split="train"), model, img_size=32)
    assert train.indices == digits_split()[0]
    assert len(build_dataset(DataConfig(kind="digits", split="all"), model, img_size=32)) == 1797


def test_digits_follow_the_models_channels_and_size():
    one = lapdtr.create_model("resnet10t", in_chans=1)
    ds = build_dataset(DataConfig(kind="digits", limit=5), one, img_size=20)
    assert len(ds) == 5 and ds[0][0].shape == (1, 20, 20)
    xb, tb = next(iter(build_loader(DataConfig(kind="digits", limit=5), one, img_size=20,
                                    batch_size=8)))
    assert xb.shape == (5, 1, 20, 20) and tb.dtype == torch.long


def test_real_data_capped_by_requests(model):
    ds = build_dataset(DataConfig(kind="digits"), model, img_size=8, requests=3, batch_size=4)
    assert ds.indices == digits_split()[1][:12]

import os

import pytest
import torch

os.environ.setdefault("LAPDTR_CACHE", "/tmp/lapdtr-test-cache")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_trained(tmp_path_factory):
    """resnet10t trained on the digits here (32 px, 2 epochs): ``train_digits_checkpoint``'s
    result, with ``wall_s``; shared by the data and runtime tests."""
    import time

    from lapdtr.data import train_digits_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "resnet10t-digits.safetensors"
    t0 = time.perf_counter()
    res = train_digits_checkpoint("resnet10t", path, img_size=32, epochs=2, num_threads=1)
    res["wall_s"] = time.perf_counter() - t0
    print(f"\ntrain_digits_checkpoint(resnet10t, 32 px, 2 epochs): train {res['train_s']:.1f} s, "
          f"total {res['wall_s']:.1f} s, test top-1 {res['test_top1']:.4f}")
    return res

"""``lapdtr.testing``: informative weights make every unit visible, and the sensitivity check
rejects what it should."""
import pytest
import torch

import lapdtr
from lapdtr.testing import (REL_TOL, assert_close_scaled, assert_sees_every_unit, informative_weights_,
                            scaled_atol)


def test_default_resnet_init_hides_blocks_and_informative_weights_show_them():
    torch.manual_seed(0)
    model = lapdtr.create_model("resnet18", num_classes=10)
    ul = lapdtr.units(model, 32)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(AssertionError, match=r"cannot see unit\(s\) layer1.0 \(skipped"):
        assert_sees_every_unit(model, x, unit_list=ul)  # timm's zero-init last BN per block
    informative_weights_(model, seed=1, probe=x)
    with torch.no_grad():
        assert float(model(x).abs().max()) == pytest.approx(1.0, rel=1e-5)
    seen = assert_sees_every_unit(model, x, unit_list=ul)
    assert set(seen) == {u.name for u in ul} and min(seen.values()) > 100


def test_informative_weights_clear_cached_attention_biases():
    """EfficientViT-M caches its attention bias tables in eval mode: a model redrawn after a
    forward must compute with the new tables, as a copy loaded from its state dict does."""
    model = lapdtr.create_model("efficientvit_m0", img_size=64, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # fills the cache with timm's (zero) biases
        informative_weights_(model, seed=1, probe=x)
        copy = lapdtr.create_model("efficientvit_m0", img_size=64, num_classes=10)
        copy.load_state_dict(model.state_dict())
        assert torch.equal(model(x), copy(x))
    assert not model.training


def test_scaled_tolerance():
    ref = torch.tensor([[100.0, -3.0]])
    assert scaled_atol(ref) == pytest.approx(100 * REL_TOL)
    assert_close_scaled(ref + 0.9 * 100 * REL_TOL, ref)
    with pytest.raises(AssertionError, match="not close"):
        assert_close_scaled(ref + 1.1 * 100 * REL_TOL, ref)

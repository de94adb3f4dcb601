"""The Eva adapter (RoPE ViTs, DINOv3, EVA-02, RoPE-Mixed, Sapiens2, PE): units in sequence and
a 3-stage partition equal ``model(x)`` exactly on informative weights, every unit shows in the
output, each block unit rebuilds the rotary table from the host's ``rope`` module (RoPE-Mixed's
shared ``freqs`` owned by every block unit), and what units cannot run is named."""
import pytest
import torch

import lapdtr
from lapdtr.models import get_adapter_for_name, partition, unit_owned_names, units
from lapdtr.testing import assert_sees_every_unit, informative_weights_

SIZE = 64
# name -> create_model kwargs beyond depth=3, img_size=64: what each case covers
CASES = {
    "vit_small_patch16_rope_224": {},          # AttentionRope, RotaryEmbeddingCat, token pool
    "vit_small_patch16_dinov3": {},            # 4 register tokens, dynamic size, DINOv3 RoPE
    "eva02_tiny_patch14_224": {},              # EvaAttention with q/v bias, GluMlp, abs pos
    "vit_small_patch16_rope_mixed_224": {},    # RoPE-Mixed: learnable freqs shared by blocks
    # grouped-query attention in the middle block, qk norm, RoPE coordinate augmentation
    "vit_base_patch16_sapiens2": {"embed_dim": 192, "num_heads": 6, "num_kv_heads": (6, 3, 6)},
    "vit_pe_core_tiny_patch16_384": {},        # norm_pre, attention pooling head
}
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        m = lapdtr.create_model(name, depth=3, img_size=SIZE, **CASES[name])
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        _MODELS[name] = (informative_weights_(m, seed=1, probe=x), x)
    return _MODELS[name]


def _run(stages, x):
    with torch.no_grad():
        for s in stages:
            x = s(x)
    return x


@pytest.mark.parametrize("name", list(CASES))
def test_stages_equal_the_model_and_every_unit_shows(name):
    model, x = _model(name)
    assert get_adapter_for_name(name).name == "eva"
    ul = units(model, SIZE)
    n = len(ul)
    assert [u.name for u in ul] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert all(u.out_format == "tokens" for u in ul[:-1]) and ul[-1].out_format == "logits"
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(_run(partition(model, list(range(1, n)), unit_list=ul), x), ref)
    assert torch.equal(_run(partition(model, [1, n - 1], unit_list=ul), x), ref)
    # the same check would see any one unit skipped (blocks) or perturbed (embed, head)
    seen = assert_sees_every_unit(model, x, ref, unit_list=ul)
    assert list(seen) == [u.name for u in ul]


def test_block_units_carry_rope_and_mixed_freqs_are_shared():
    model, x = _model("vit_small_patch16_rope_mixed_224")
    ul = units(model, SIZE)
    for u in ul[1:-1]:
        assert u.modules == (u.name, "rope")
        assert "rope.freqs" in unit_owned_names(model, u.modules)
    assert "rope" in ul[0].modules  # Eva._pos_embed calls it
    s0, s1, s2 = partition(model, [2, 4], unit_list=ul)
    assert s1.rope is model.rope and s1.rope.freqs is model.rope.freqs
    assert "rope.freqs" in s1.state_dict() and "rope.freqs" not in s2.state_dict()
    # the table is rebuilt from the shared freqs: changing them changes every block unit
    with torch.no_grad():
        ref = _run([s0, s1, s2], x)
        saved = model.rope.freqs.clone()
        model.rope.freqs.mul_(1.5)
        try:
            assert not torch.equal(_run([s0, s1, s2], x), ref)
        finally:
            model.rope.freqs.copy_(saved)
    # RoPE without learnable state adds no key: every tensor is owned by exactly one stage
    plain, _ = _model("vit_small_patch16_rope_224")
    stages = partition(plain, [1, 3, 4], img_size=SIZE)
    keys = [k for s in stages for k in s.state_dict()]
    assert len(keys) == len(set(keys)) and set(keys) == set(plain.state_dict())


def test_dynamic_size_at_another_square_size_and_a_rectangle_is_named():
    model, _ = _model("vit_small_patch16_dinov3")  # dynamic_img_size: any size at run time
    x = torch.randn(3, 3, 96, 96)
    ul = units(model, 96)
    with torch.no_grad():
        assert torch.equal(_run(partition(model, [1, 2, 4], unit_list=ul), x), model(x))
    stages = partition(model, [1], unit_list=ul)
    with torch.no_grad(), pytest.raises(ValueError, match=r"29 tokens \(5 prefix tokens and "
                                        r"24 patches\) are neither a square patch grid nor the "
                                        r"model's own grid 4x4; allowed: square images"):
        _run(stages, torch.randn(1, 3, 64, 96))


def test_what_units_cannot_run_in_training_is_named():
    torch.manual_seed(0)
    model = lapdtr.create_model("vit_small_patch16_rope_224", depth=1, img_size=SIZE,
                                patch_drop_rate=0.25)
    stages = partition(model, [1, 2], img_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    for s in stages:
        s.train()
    with pytest.raises(ValueError, match=r"patch dropout .* allowed: eval mode, or "
                                         r"patch_drop_rate=0"):
        _run(stages, x)
    # Sapiens2's RoPE rescale augmentation: fine in eval (tested above), refused in training
    model, x = _model("vit_base_patch16_sapiens2")
    stages = partition(model, [1, 2], img_size=SIZE)
    try:
        for s in stages:
            s.train()
        with pytest.raises(ValueError, match=r"RoPE coordinate augmentation .* allowed: eval "
                                             r"mode"):
            _run(stages, x)
    finally:
        model.eval()

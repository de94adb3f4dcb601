import re

import pytest
import torch

from safetensors.torch import load_file

import lapdtr
from lapdtr.runtime import RankModel, check_checkpoint, write_checkpoint
from lapdtr.runtime.stages import build_host
from lapdtr.testing import assert_sees_every_unit, informative_weights_, write_informative_checkpoint

FAMILIES = [("deit_tiny_patch16_224", {"depth": 4}, 224),
            ("efficientvit_m0", {}, 128),
            ("tiny_vit_5m_224", {}, 224),
            ("resnet18", {}, 64)]


@pytest.mark.parametrize("name, kw, img", FAMILIES)
def test_rank_models_hold_only_their_units_and_chain_exactly(tmp_path, name, kw, img):
    ckpt = write_informative_checkpoint(tmp_path / "w.safetensors", name, model_kwargs=kw,
                                        seed=3, img_size=img)
    full = lapdtr.create_model(name, **kw)
    full.load_state_dict(load_file(str(ckpt)))
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    parts = [RankModel(name, ckpt, model_kwargs=kw, img_size=img) for _ in range(3)]
    n = parts[0].num_units
    bounds = [0, n // 3, 2 * n // 3, n]
    for pm, a, b in zip(parts, bounds, bounds[1:]):
        assert pm.param_bytes() == 0
        pm.load_units([u.name for u in pm.units[a:b]])
        assert 0 < pm.param_bytes() < full_bytes
    assert sum(pm.param_bytes() for pm in parts) == full_bytes
    x = torch.randn(2, 3, img, img)
    y = x
    for pm, a, b in zip(parts, bounds, bounds[1:]):
        y = pm.run(y, a, b)
    with torch.no_grad():
        ref = full(x)
    assert torch.equal(y, ref)
    # on these weights the comparison would see any one unit skipped or perturbed
    assert_sees_every_unit(full, x, ref, unit_list=parts[0].units)


def test_take_over_and_release_units(tmp_path):
    name, kw = "deit_tiny_patch16_224", {"depth": 4}
    ckpt = write_checkpoint(tmp_path / "w.safetensors", name, model_kwargs=kw)
    pm = RankModel(name, ckpt, model_kwargs=kw)
    pm.load_units(["embed", "blocks.0"])
    before = pm.param_bytes()
    loaded = pm.load_units(["blocks.1"])
    assert loaded > 0 and pm.param_bytes() == before + loaded
    pm.release_units(["embed"])
    assert pm.param_bytes() < before + loaded and "embed" not in pm.loaded
    with pytest.raises(AssertionError):
        pm.run(torch.randn(1, 3, 224, 224), 0, 1)
    with pytest.raises(ValueError, match=r"unknown unit\(s\) \['blocks.9'\]"):
        pm.load_units(["blocks.9"])
    stages = pm.partition([2])
    assert [s.unit_names for s in stages] == [["embed", "blocks.0"], ["blocks.1", "blocks.2", "blocks.3", "head"]]


def test_checkpoint_that_does_not_match_the_model_is_named(tmp_path):
    ckpt = write_checkpoint(tmp_path / "small.safetensors", "deit_tiny_patch16_224",
                            model_kwargs={"depth": 2})
    host, _ = build_host("deit_tiny_patch16_224", {"depth": 4})
    with pytest.raises(ValueError, match=r"small.safetensors.*does not match model "
                                         r"'deit_tiny_patch16_224': missing \d+ key\(s\): blocks.2"):
        check_checkpoint(ckpt, host, "deit_tiny_patch16_224")
    other = write_checkpoint(tmp_path / "s.safetensors", "deit_small_patch16_224",
                             model_kwargs={"depth": 4})
    pm = RankModel("deit_tiny_patch16_224", other, model_kwargs={"depth": 4})
    with pytest.raises(ValueError, match=r"shape mismatch: .*checkpoint \[.*384.*\] vs model"):
        pm.load_units(["embed"])
    with pytest.raises(ValueError, match="does not exist"):
        RankModel("deit_tiny_patch16_224", tmp_path / "none.safetensors").load_units(["embed"])


def test_torch_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    m = informative_weights_(lapdtr.create_model("resnet18"), seed=4)
    path = tmp_path / "r.pth"
    torch.save({"state_dict": m.state_dict()}, path)
    pm = RankModel("resnet18", path, img_size=64)
    pm.load_units([u.name for u in pm.units])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(pm.run(x, 0, pm.num_units), ref)
    assert_sees_every_unit(m, x, ref, unit_list=pm.units)


@pytest.mark.parametrize("name, content", [
    ("garbage.safetensors", bytes(range(256)) * 4),   # header length far past the file's end
    ("empty.safetensors", b""),
    ("text.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
])
def test_checkpoint_that_is_not_safetensors_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    host, _ = build_host("deit_tiny_patch16_224", {"depth": 1})
    with pytest.raises(ValueError, match=rf"checkpoint '.*{name}' is not a safetensors file"):
        check_checkpoint(path, host, "deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=rf"'.*{name}' is not a safetensors file"):
        RankModel("deit_tiny_patch16_224", path, model_kwargs={"depth": 1}).load_units(["embed"])


def test_truncated_safetensors_is_named(tmp_path):
    ckpt = write_checkpoint(tmp_path / "w.safetensors", "deit_tiny_patch16_224",
                            model_kwargs={"depth": 1})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"'.*cut.safetensors' is not a safetensors file, or a "
                                         r"damaged one \(SafetensorError"):
        RankModel("deit_tiny_patch16_224", cut, model_kwargs={"depth": 1}).load_units(["embed"])


def test_torch_checkpoint_of_garbage_is_named(tmp_path):
    host, _ = build_host("deit_tiny_patch16_224", {"depth": 1})
    for name, content in (("g.pth", bytes(range(256))), ("t.pt", b"hello"), ("e.bin", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"'.*{name}' is not a safetensors file .*nor a torch "
                                             r"checkpoint"):
            check_checkpoint(path, host, "deit_tiny_patch16_224")


def test_missing_checkpoint_is_named(tmp_path):
    host, _ = build_host("deit_tiny_patch16_224", {"depth": 1})
    for path in (tmp_path / "none.safetensors", tmp_path / "none.pth"):
        with pytest.raises(ValueError, match=f"checkpoint '{re.escape(str(path))}' does not exist"):
            check_checkpoint(path, host, "deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=f"checkpoint '{re.escape(str(tmp_path))}' is not a "
                                         "file"):
        check_checkpoint(tmp_path, host, "deit_tiny_patch16_224")


def test_legacy_torch_checkpoint_loads(tmp_path):
    """A torch file in the pre-1.6 format cannot be memory-mapped: it loads without mmap."""
    torch.manual_seed(0)
    m = lapdtr.create_model("deit_tiny_patch16_224", depth=1)
    path = tmp_path / "old.pth"
    torch.save(m.state_dict(), path, _use_new_zipfile_serialization=False)
    pm = RankModel("deit_tiny_patch16_224", path, model_kwargs={"depth": 1})
    pm.load_units([u.name for u in pm.units])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(pm.run(x, 0, pm.num_units), m(x))


def test_units_that_share_a_module_release_it_only_with_the_last_of_them(tmp_path):
    """vit_srelpos lists its one relative-position-bias module in every block unit: releasing
    one of two loaded blocks keeps the shared tensors (the other block still runs, exactly);
    releasing the last frees them; loading reads a shared tensor only when no loaded unit
    holds it."""
    name, kw, img = "vit_srelpos_small_patch16_224", {"depth": 3, "img_size": 64}, 64
    ckpt = write_informative_checkpoint(tmp_path / "w.safetensors", name, model_kwargs=kw,
                                        seed=3, img_size=img)
    full = lapdtr.create_model(name, **kw)
    full.load_state_dict(load_file(str(ckpt)))
    ul = lapdtr.models.units(full, img)
    shared = lapdtr.models.unit_owned_names(full, ["shared_rel_pos"])
    assert shared and all("shared_rel_pos" in ul[i].modules for i in (1, 2, 3))
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        tokens = [x]
        for u in ul:
            tokens.append(u.fn(full, tokens[-1]))
        assert torch.equal(tokens[-1], full(x))

    pm = RankModel(name, ckpt, model_kwargs=kw, img_size=img)
    params = lambda: dict(pm.host.named_parameters())  # noqa: E731
    own = {u: lapdtr.models.unit_owned_names(full, [u]) for u in ("blocks.0", "blocks.1")}
    nbytes = lambda keys: sum(full.state_dict()[k].numel() * 4 for k in keys)  # noqa: E731
    assert pm.load_units(["blocks.0", "blocks.1"]) == nbytes(own["blocks.0"] + own["blocks.1"]
                                                             + shared)
    pm.release_units(["blocks.0"])
    assert pm.loaded == {"blocks.1"}
    assert all(params()[k].device.type == "meta" for k in own["blocks.0"])
    assert all(params()[k].device.type == "cpu" for k in shared + own["blocks.1"])
    assert torch.equal(pm.run(tokens[2], 2, 3), tokens[3])  # blocks.1, with the shared bias
    # a block loaded while another holds the shared module reads only its own tensors
    assert pm.load_units(["blocks.0"]) == nbytes(own["blocks.0"])
    assert torch.equal(pm.run(tokens[1], 1, 3), tokens[3])
    # stages of the rank model each own the shared tensors under their timm keys
    s0, s1 = pm.partition([2])
    assert set(shared) <= set(s0.state_dict()) & set(s1.state_dict())
    pm.release_units(["blocks.0", "blocks.1"])
    assert not pm.loaded and pm.param_bytes() == 0
    assert all(params()[k].device.type == "meta" for k in shared)
    with pytest.raises(AssertionError, match="blocks.1 is not loaded"):
        pm.run(tokens[2], 2, 3)
    # every unit loaded once more: the whole chain equals the model
    pm.load_units([u.name for u in pm.units])
    assert torch.equal(pm.run(x, 0, pm.num_units), tokens[-1])


def test_rope_mixed_builds_on_meta_and_each_part_holds_the_shared_frequencies(tmp_path):
    """RoPE-Mixed Eva: one ``rope.freqs`` Parameter that every unit owns, and an ``__init__``
    that fills buffers from it (so ``build_host`` builds it on the CPU, then frees it). Two rank
    models of the two halves each hold the frequencies once and chain to the model exactly."""
    name, kw, img = "vit_small_patch16_rope_mixed_224", {"depth": 3, "img_size": 64}, 64
    ckpt = write_informative_checkpoint(tmp_path / "w.safetensors", name, model_kwargs=kw,
                                        seed=3, img_size=img)
    full = lapdtr.create_model(name, **kw)
    full.load_state_dict(load_file(str(ckpt)))
    freqs = full.rope.freqs.numel() * full.rope.freqs.element_size()
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    parts = [RankModel(name, ckpt, model_kwargs=kw, img_size=img) for _ in range(2)]
    assert all(pm.param_bytes() == 0 for pm in parts)
    n = parts[0].num_units
    loaded = [pm.load_units([u.name for u in pm.units[a:b]])
              for pm, (a, b) in zip(parts, [(0, 2), (2, n)])]
    assert sum(loaded) == full_bytes + freqs  # the shared tensor on both ranks, read once each
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        assert torch.equal(parts[1].run(parts[0].run(x, 0, 2), 2, n), full(x))
    parts[0].release_units(["embed"])  # blocks.0 still needs the frequencies
    assert parts[0].host.rope.freqs.device.type == "cpu"

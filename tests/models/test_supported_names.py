"""The supported list tells the truth: a name is listed when an adapter handles the class it
builds (decided on the meta device), and every listed name partitions exactly. The default run
checks two names of every class an adapter handles; ``-m slow`` checks every listed name under
30M parameters."""
import pytest
import timm
import torch

import lapdtr
from lapdtr.models import get_adapter_for_name, list_adapters, units
from lapdtr.models.names import model_class_name
from lapdtr.testing import informative_weights_

CAP = 30_000_000


def _params_on_meta(name):
    with torch.device("meta"):
        m = timm.create_model(name)
    return sum(p.numel() for p in m.parameters())


def _by_class():
    supported = lapdtr.list_supported_models()
    out = {}
    for fam, names in supported.items():
        for n in names:
            out.setdefault(model_class_name(n), []).append(n)
    return out


def _exact(name):
    """Units in sequence equal ``model(x)`` exactly, on weights where no unit is invisible."""
    torch.manual_seed(0)
    adapter = get_adapter_for_name(name)
    size = 64
    model = lapdtr.create_model(name, img_size=size)
    try:
        ul = units(model, size)
    except ValueError:  # a model that needs another side (window, halo sizes): at its default
        torch.manual_seed(0)
        model = lapdtr.create_model(name)
        size = lapdtr.models.default_img_size(model)
        ul = units(model, size)
    x = torch.randn(2, 3, size, size)
    informative_weights_(model, seed=1, probe=x)
    with torch.no_grad():
        ref = model(x)
    if not torch.isfinite(ref).all():
        # the redrawn weights overflow the model itself (bat_resnext26ts: timm's
        # BilinearAttnTransform divides an underflowed sigmoid by its sum): timm's own init
        torch.manual_seed(0)
        model = lapdtr.create_model(name, img_size=size)
        with torch.no_grad():
            ref = model(x)
    assert torch.isfinite(ref).all(), name
    with torch.no_grad():
        y = x
        for s in lapdtr.partition(model, list(range(1, len(ul))), unit_list=ul):
            y = s(y)
    assert torch.equal(ref, y), (name, adapter.name)


def _sample():
    picks = []
    for cls, names in sorted(_by_class().items()):
        small = [n for n in sorted(names) if _params_on_meta(n) <= CAP]
        picks += [pytest.param(n, id=n) for n in small[:2]]
    return picks


def test_the_list_is_decided_by_class_not_by_name():
    supported = lapdtr.list_supported_models()
    for fam, names in supported.items():
        a = next(a for a in list_adapters() if a.name == fam)
        classes = {f"{t.__module__}.{t.__qualname__}" for t in a.model_types}
        assert names and all(model_class_name(n) in classes for n in names), fam
    listed = {n for names in supported.values() for n in names}
    # vit_* names that build other classes are listed only under the family that runs them
    vit = set(supported["vit"])
    assert all(model_class_name(n).endswith(("VisionTransformer", "VisionTransformerDistilled"))
               for n in vit)
    assert "resnet50" in supported["resnet"] and "deit_tiny_patch16_224" in vit
    assert listed <= set(timm.list_models())


def test_a_name_no_adapter_handles_names_its_class_and_the_families():
    with pytest.raises(ValueError, match=r"'convnext_tiny': it builds a ConvNeXt, which no "
                                         r"lapdtr adapter handles; supported families "
                                         r"\(classes\): vit \(VisionTransformer"):
        get_adapter_for_name("convnext_tiny")
    with pytest.raises(ValueError, match=r"unknown model 'deit_tinyy': timm registers no such "
                                         r"name \(close: .*deit_tiny"):
        lapdtr.create_model("deit_tinyy")


def test_edgevit_builds_on_the_meta_device():
    for name in ("edgevit_xxs", "edgevit_xs", "edgevit_s"):
        with torch.device("meta"):
            m = timm.create_model(name, drop_path_rate=0.1)
        assert {p.device.type for p in m.parameters()} == {"meta"}
    from lapdtr.runtime.stages import build_host

    host, ul = build_host("edgevit_xs", img_size=64)
    assert [u.name for u in ul][0] == units(lapdtr.create_model("edgevit_xs"), 64)[0].name


@pytest.mark.parametrize("name", _sample())
def test_two_names_of_every_class_partition_exactly(name):
    _exact(name)


@pytest.mark.slow
def test_every_listed_name_under_30m_parameters_partitions_exactly():
    failed = {}
    for cls, names in sorted(_by_class().items()):
        for n in names:
            if _params_on_meta(n) > CAP:
                continue
            try:
                _exact(n)
            except Exception as e:  # noqa: BLE001 - collect every failure, then report them
                failed[n] = f"{type(e).__name__}: {str(e)[:160]}"
    assert not failed, failed

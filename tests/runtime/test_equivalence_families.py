"""Issue 4's equivalence criterion for every model family: pipeline output on 2, 3 and 4 gloo
ranks equals the single-process model (``assert_close(atol=1e-5, rtol=0)``, fp32).

The cases are every class an adapter handles x world sizes, so a newly registered family (or a
class added to one) is tested without touching this file (with its first example of that class
at its default size, unless ``RECIPES`` names a smaller model). To stay cheap, each world size forks its ranks once and every rank calls
``run_rank`` for one family after another, each run under its own store prefix; the first case
of a world size pays for the whole batch, the others read its results.

The weights are redrawn (``lapdtr.testing.informative_weights_``) and saved as the run's checkpoint: with
timm's own random init the logits of some families hardly depend on the input (EfficientViT-M0
logits are below 1e-4, zero-initialized BN scales; EfficientViT-B0 logits differ by 5e-6
between two random inputs), so ``atol=1e-5`` would check almost nothing there. Each case
asserts that its reference logits differ between inputs by more than 100x the tolerance, and
that the model with any one unit skipped or perturbed is off by more than 100x the tolerance
(``assert_sees_every_unit``).
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

import lapdtr
from lapdtr.models.base import default_img_size, units
from lapdtr.runtime import RunConfig, RunReport, request_input, run_rank

from lapdtr.testing import assert_close_scaled, assert_sees_every_unit, informative_weights_

from runtime_helpers import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

ATOL = 1e-5
WORLD_SIZES = (2, 3, 4)
# one case per class an adapter handles: "family/Class"
CASES = [f"{a.name}/{t.__name__}" for a in lapdtr.list_adapters() for t in a.model_types]
HOST = "127.0.0.1"
REQUESTS, BATCH, MICRO_BATCHES = 2, 2, 2

# class -> (model, create_model kwargs, img_size, the format a boundary must carry): small
# variants so that every distributed run fits in CI. A class missing here runs the first of its
# family's examples that builds it (else its first supported name) at its default size, with
# cuts in the formats it has (see ``choose_cuts``).
RECIPES = {
    "VisionTransformer": ("deit_tiny_patch16_224",
                          {"depth": 3, "img_size": 64, "num_classes": 10}, 64, "tokens"),
    "VisionTransformerDistilled": ("deit_tiny_distilled_patch16_224",
                                   {"depth": 2, "img_size": 64, "num_classes": 10}, 64, "tokens"),
    "TinyVit": ("tiny_vit_5m_224", {"img_size": 64, "num_classes": 10}, 64, "map_nhwc"),
    "EfficientVitMsra": ("efficientvit_m0", {"img_size": 64, "num_classes": 10}, 64, "map"),
    "EfficientVit": ("efficientvit_b0", {"num_classes": 10}, 64, "map"),
    "ResNet": ("resnet18", {"num_classes": 10}, 64, "map"),
    "EfficientNet": ("mobilenetv2_100", {"num_classes": 10}, 64, "map"),
    "MobileNetV3": ("mobilenetv3_small_100", {"num_classes": 10}, 64, "map"),
    "VGG": ("vgg11", {"mlp_ratio": 0.01, "num_classes": 10}, 64, "map"),
    "EdgeVit": ("edgevit_xxs", {"img_size": 64, "num_classes": 10}, 64, "map"),
    "SqueezeNet": ("squeezenet1_1", {"num_classes": 10}, 64, "map"),
    # DINOv3-style: RoPE, a class token and 4 register tokens
    "Eva": ("vit_small_patch16_dinov3", {"depth": 3, "img_size": 64, "num_classes": 10}, 64,
            "tokens"),
    "VisionTransformerRelPos": ("vit_relpos_small_patch16_224",
                                {"depth": 3, "img_size": 64, "num_classes": 10}, 64, "tokens"),
    "ResNetV2": ("resnetv2_18", {"num_classes": 10}, 64, "map"),
    "ByobNet": ("gernet_s", {"num_classes": 10}, 64, "map"),
}


def _default_model(family: str, cls: str) -> str:
    from lapdtr.models.names import model_class_name

    adapter = next(a for a in lapdtr.list_adapters() if a.name == family)
    names = [*adapter.examples, *lapdtr.list_supported_models()[family]]
    return next(n for n in names if model_class_name(n).rsplit(".", 1)[-1] == cls)
# boundary formats in the order cuts are spent on them: the family-specific layouts first, the
# generic NCHW map last (every family has one after its stem); unknown formats come first of all
FORMAT_PRIORITY = ("map_nhwc", "tokens", "map")


def choose_cuts(boundary_formats: list[str], world: int) -> list[int]:
    """``world - 1`` cut indices (a cut ``c`` starts a stage at unit ``c``) for a model whose
    boundary ``c`` carries ``boundary_formats[c - 1]``: evenly spaced, then moved so that the
    boundaries carry every format present (as many as there are cuts, most specific first)."""
    n = len(boundary_formats) + 1
    if world - 1 > n - 1:
        raise ValueError(f"world={world} needs {world - 1} cuts but the model has {n} units")
    cuts: list[int] = []
    for k in range(1, world):
        target = k * n / world
        cuts.append(min((c for c in range(1, n) if c not in cuts),
                        key=lambda c: (abs(c - target), c)))
    order = sorted(dict.fromkeys(boundary_formats),
                   key=lambda f: FORMAT_PRIORITY.index(f) if f in FORMAT_PRIORITY else -1)
    fixed: set[int] = set()
    for f in order[:world - 1]:
        have = [c for c in cuts if c not in fixed and boundary_formats[c - 1] == f]
        if have:
            fixed.add(have[0])
            continue
        old, new = min(((c, b) for c in cuts if c not in fixed for b in range(1, n)
                        if b not in cuts and boundary_formats[b - 1] == f),
                       key=lambda cb: (abs(cb[0] - cb[1]), cb))
        cuts[cuts.index(old)] = new
        fixed.add(new)
    return sorted(cuts)


def test_choose_cuts_covers_the_characteristic_format():
    tiny_vit = ["map", "map", "map_nhwc", "map_nhwc", "map", "map_nhwc", "map_nhwc", "map"]
    assert [tiny_vit[c - 1] for c in choose_cuts(tiny_vit, 2)] == ["map_nhwc"]
    assert {tiny_vit[c - 1] for c in choose_cuts(tiny_vit, 3)} == {"map_nhwc", "map"}
    assert choose_cuts(["map"] * 11, 4) == [3, 6, 9]
    assert choose_cuts(["tokens"] * 4, 4) == [1, 2, 4]
    assert choose_cuts(["map", "tokens", "tokens", "tokens", "map"], 2) == [3]
    with pytest.raises(ValueError, match="world=4 needs 3 cuts"):
        choose_cuts(["map"], 4)


# ---------------------------------------------------------------------------------- per family

class _Case:
    """A class's model, informative checkpoint, references and the cuts per world size."""

    def __init__(self, case_id: str, root: Path):
        family, cls = case_id.split("/")
        self.model, self.kwargs, img, self.fmt = RECIPES.get(cls) or (
            _default_model(family, cls), {}, None, None)
        torch.manual_seed(0)
        model = lapdtr.create_model(self.model, **self.kwargs)
        assert type(model).__name__ == cls, (case_id, self.model, type(model).__name__)
        self.img = img or default_img_size(model)
        self.root = root
        self.units = units(model, self.img)
        self.formats = [u.out_format for u in self.units[:-1]]
        # the inputs every run of these configs sees (request_input reads seed and batch_size)
        inputs = [request_input(0, r, BATCH, self.img) for r in range(REQUESTS)]
        informative_weights_(model, seed=1, probe=inputs[0])
        if self.fmt is None:
            self.fmt = sorted(set(self.formats), key=lambda f: FORMAT_PRIORITY.index(f)
                              if f in FORMAT_PRIORITY else -1)[0]
        self.checkpoint = root / f"{cls}.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                  str(self.checkpoint), metadata={"model": self.model})
        with torch.no_grad():
            # per micro-batch, as the ranks compute it: fp32 convolutions give results that
            # depend on the batch size by ~1e-5 relative on these weights (the library picks
            # its algorithm per shape), which is not what this test is about
            self.reference = [torch.cat([model(mb) for mb in x.chunk(MICRO_BATCHES)])
                              for x in inputs]
        # the comparison of the test would reject this model with any one unit skipped/perturbed
        self.visible = assert_sees_every_unit(model, inputs[0], self.reference[0],
                                              unit_list=self.units, rel=ATOL)

    def config(self, world: int) -> RunConfig:
        return RunConfig(model=self.model, model_kwargs=self.kwargs, img_size=self.img,
                         world_size=world, cuts=choose_cuts(self.formats, world),
                         checkpoint=str(self.checkpoint), requests=REQUESTS, batch_size=BATCH,
                         micro_batches=MICRO_BATCHES, out=str(self.root / f"w{world}"),
                         save_outputs=True, plots=False, join_timeout_s=60.0,
                         threads_per_rank=1).validate()


# ------------------------------------------------------------------ one set of ranks per world

def _rank_main(rank: int, world: int, port: int, jobs: list, done_key: str) -> None:
    """Every rank runs the families of ``jobs`` one after another, each under its own prefix;
    a failed run leaves ``error-rank<r>.txt`` in its ``out`` and the rank goes on with the next.
    Rank 0 hosts the store (as under torchrun) and leaves last. The parent holds no store: a
    store's server thread in the parent at fork time can leave a forked child stuck connecting.
    """
    import torch.distributed as dist

    code = 0
    # before any op: the parent ran OpenMP regions, and libgomp's thread pool does not survive
    # fork (a forked child's first parallel region can hang); cfg.threads_per_rank keeps it at 1
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(HOST, port, is_master=rank == 0, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=60))
        for cfg_dict, prefix in jobs:
            cfg = RunConfig.from_dict(cfg_dict)
            try:
                report = run_rank(cfg, rank, world, HOST, port, prefix)
            except Exception as e:
                code = 1
                (Path(cfg.out) / f"error-rank{rank}.txt").write_text(
                    f"rank {rank}: {type(e).__name__}: {e}")
                continue
            if report is not None:
                report.save(Path(cfg.out) / "report.json")
        store.set(f"{done_key}/{rank}", "1")
        if rank == 0:
            deadline = time.time() + 30.0
            while time.time() < deadline and not store.check(
                    [f"{done_key}/{r}" for r in range(world)]):
                time.sleep(0.01)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # no finalizers in a forked copy of the pytest process


class _Runs:
    def __init__(self, root: Path, families_for_world):
        self.root, self.families_for_world = root, families_for_world
        self.cases: dict[str, _Case] = {}
        self.results: dict[int, dict] = {}
        self.wall_s: dict[int, float] = {}

    def case(self, case_id: str) -> _Case:
        if case_id not in self.cases:
            d = self.root / case_id.replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            self.cases[case_id] = _Case(case_id, d)
        return self.cases[case_id]

    def result(self, family: str, world: int):
        if world not in self.results:
            self._run_world(world, self.families_for_world(world) or [family])
        return self.results[world].get(family) or self._run_world(world, [family])[family]

    def _run_world(self, world: int, families: list[str]) -> dict:
        base = f"eq/{os.getpid()}-{time.time_ns()}/w{world}/"
        jobs, outs = [], {}
        for f in families:
            cfg = self.case(f).config(world)
            outs[f] = Path(cfg.out)
            outs[f].mkdir(parents=True, exist_ok=True)
            for stale in [*outs[f].glob("error-rank*.txt"), outs[f] / "report.json"]:
                stale.unlink(missing_ok=True)
            jobs.append((cfg.to_dict(), f"{base}{f}/"))
        # spawn, not fork: a forked copy of the pytest process carries whatever earlier tests
        # loaded (scikit-learn/scipy's OpenMP runtime), and one such child segfaulted in GC
        ctx = multiprocessing.get_context("spawn")
        t0 = time.time()
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, jobs, base + "done"),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = t0 + 60.0 + 20.0 * len(families)
        for p in procs:
            p.join(max(0.1, deadline - time.time()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        self.wall_s[world] = time.time() - t0
        out = self.results.setdefault(world, {})
        for f in families:
            errors = [e.read_text() for e in sorted(outs[f].glob("error-rank*.txt"))]
            if not errors and not (outs[f] / "report.json").exists():
                errors = [f"no report; ranks {hung} still running after {deadline - t0:.0f} s"
                          if hung else "no report"]
            out[f] = (errors, outs[f])
        return out


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    def families_for_world(world):
        return [it.callspec.params["case_id"] for it in request.session.items
                if getattr(it, "originalname", None) == "test_pipeline_equals_single_process"
                and it.module is request.module and it.callspec.params["world"] == world]

    r = _Runs(tmp_path_factory.mktemp("equivalence"), families_for_world)
    yield r
    if r.wall_s:
        print("\nequivalence: wall s per world size", {w: round(s, 1) for w, s in r.wall_s.items()})


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case_id", CASES)
def test_pipeline_equals_single_process(runs, case_id, world):
    from safetensors.torch import load_file

    case = runs.case(case_id)
    cfg = case.config(world)
    crossing = [case.formats[c - 1] for c in cfg.cuts]
    assert len(cfg.cuts) == world - 1 and case.fmt in crossing, (cfg.cuts, crossing)
    # the comparison means something at this tolerance: the logits depend on the input
    refs = torch.cat(case.reference)
    assert torch.isfinite(refs).all() and refs.abs().max() < 10.0
    assert (refs[1:] - refs[:1]).abs().max() > 100 * ATOL

    errors, out = runs.result(case_id, world)
    assert not errors, f"{case_id} ({case.model}) on {world} ranks failed: {errors}"
    report = RunReport.load(out / "report.json")
    assert report.completed == REQUESTS and report.duplicates == 0 and not report.replans
    assert [k.items for k in report.ranks] == [REQUESTS * MICRO_BATCHES] * world
    stages = sorted(report.plan["stages"], key=lambda s: s["index"])
    assert [s["rank"] for s in stages] == list(range(world))
    assert [s["units"][0] for s in stages[1:]] == [case.units[c].name for c in cfg.cuts]
    outs = load_file(str(out / "outputs.safetensors"))
    assert sorted(outs) == sorted(f"request{r}" for r in range(REQUESTS))
    for r, ref in enumerate(case.reference):
        assert_close_scaled(outs[f"request{r}"], ref, rel=ATOL)

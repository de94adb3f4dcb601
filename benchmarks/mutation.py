"""Mutation gauge: do the tests catch the bugs they exist for?

Each mutant is a small, hand-written bug in one core invariant (a unit dropped in a family's
adapter, stages reordered, a resume from unit 0, an inadmissible planner heuristic, a wrong shard
of a tensor-split layer ...). The gauge copies the project to a temporary folder, checks that the
chosen tests pass there unmutated, then applies one mutant at a time to the copy, runs the tests
that guard its invariant and prints whether they failed (killed) or passed (survived). It exits 1
if any mutant survived, 2 if the gauge itself cannot judge (a mutant no longer applies to the
code, a test selection collects nothing, the unmutated tests fail).

    python benchmarks/mutation.py                     # every mutant; writes runs/bench/mutation.json
    python benchmarks/mutation.py --list
    python benchmarks/mutation.py --only resnet-block-dropped resume-from-unit-0

A mutant whose code no longer matches (the guarded code was rewritten) is an error, not a pass:
update its ``old`` text with the code. Mutants of features that land later (elastic head slices,
summarization restore, transfer init) are added with those features.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = "tests/models/test_units.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    invariant: str
    path: str        # relative to the project root
    old: str         # must occur exactly once in ``path``
    new: str
    tests: tuple[str, ...]  # pytest arguments: paths, node ids, ``-k`` expressions


def _units(model: str) -> tuple[str, ...]:
    return (UNITS, "-k", f"single_unit_stages_equal_model and {model}")


MUTANTS = [
    # ---- a unit dropped in each family's adapter (shape-preserving, so nothing crashes)
    Mutant("vit-block-dropped", "units in sequence equal model(x): vit adapter",
           "lapdtr/models/vit.py", "        return m.blocks[i](x)",
           "        return x if i == 1 else m.blocks[i](x)", _units("deit_tiny_patch16_224")),
    Mutant("tiny-vit-block-dropped", "units in sequence equal model(x): tiny_vit adapter",
           "lapdtr/models/tiny_vit.py", "        x = m.stages[i].blocks[j](x)",
           "        x = x if (i, j) == (1, 0) else m.stages[i].blocks[j](x)",
           _units("tiny_vit_5m_224")),
    Mutant("efficientvit-m-block-dropped",
           "units in sequence equal model(x): efficientvit_m adapter (zero-init BN scales)",
           "lapdtr/models/efficientvit.py", "        return mod(x)\n",
           "        return x if path == 'stages.1.blocks.0' and type(m).__name__ == "
           "'EfficientVitMsra' else mod(x)\n", _units("efficientvit_m0")),
    Mutant("efficientvit-b-block-dropped", "units in sequence equal model(x): efficientvit_b adapter",
           "lapdtr/models/efficientvit.py", "        return mod(x)\n",
           "        return x if path == 'stages.1.blocks.1' and type(m).__name__ == "
           "'EfficientVit' else mod(x)\n", _units("efficientvit_b0")),
    Mutant("resnet-block-dropped",
           "units in sequence equal model(x): resnet adapter (zero-init last BN of each block)",
           "lapdtr/models/resnet.py", "        return getattr(m, layer)[j](x)",
           "        return x if (layer, j) == ('layer2', 1) else getattr(m, layer)[j](x)",
           _units("resnet18")),
    Mutant("mobilenet-block-dropped", "units in sequence equal model(x): mobilenet adapter",
           "lapdtr/models/mobilenet.py", "        return m.blocks[i][j](x)",
           "        return x if (i, j) == (2, 1) else m.blocks[i][j](x)",
           _units("mobilenetv2_100")),
    Mutant("vgg-relu-dropped", "units in sequence equal model(x): vgg adapter",
           "lapdtr/models/vgg.py", "            x = m.features[i](x)",
           "            x = x if i == 1 and type(m.features[i]).__name__ == 'ReLU' "
           "else m.features[i](x)", _units("vgg11")),
    Mutant("edgevit-block-dropped", "units in sequence equal model(x): edgevit adapter",
           "lapdtr/models/edgevit.py", "        return m.stages[i].blocks[j](x)",
           "        return x if (i, j) == (2, 0) else m.stages[i].blocks[j](x)",
           _units("edgevit_xxs")),
    Mutant("squeezenet-fire-dropped", "units in sequence equal model(x): squeezenet adapter",
           "lapdtr/models/squeezenet.py", "        return m.features[i](x)",
           "        return x if i == 4 else m.features[i](x)", _units("squeezenet1_1")),
    # ---- stages reordered (the middle stages swapped: shapes still fit)
    Mutant("stages-reordered", "partition: stages in sequence equal model(x)",
           "lapdtr/models/base.py",
           "    return [Stage(model, ul, a, b, index=i) for i, (a, b) in "
           "enumerate(zip(bounds, bounds[1:]))]",
           "    st = [Stage(model, ul, a, b, index=i) for i, (a, b) in "
           "enumerate(zip(bounds, bounds[1:]))]\n"
           "    return [st[0], *st[1:-1][::-1], st[-1]] if len(st) > 3 else st",
           (UNITS, "-k", "single_unit_stages_equal_model and (deit_tiny_patch16_224 or resnet18)")),
    # ---- recovery: every in-flight item recomputed from its input (outputs stay correct)
    Mutant("resume-from-unit-0", "recovery resumes each item from its furthest cached boundary",
           "lapdtr/runtime/coordinator.py", "                if k in held and held[k] > best_u:",
           "                if False:",
           ("tests/runtime/test_pipeline.py::test_sigkill_middle_rank_mid_stream",)),
    Mutant("resume-inventory-hidden",
           "recovery: the coordinator sees the survivors' caches (the report cannot tell)",
           "lapdtr/runtime/coordinator.py",
           "        inv[w.rank] = dict(w.inventory())", "        inv = {w.rank: {}}",
           ("tests/runtime/test_pipeline.py::test_sigkill_middle_rank_mid_stream",)),
    # ---- lapdtr.distribute: outputs in input order, the journal, the in-flight window
    Mutant("distribute-map-out-of-order", "dm.map yields the outputs in input order",
           "lapdtr/distribute.py", "                i, req = queue[0]",
           "                i, req = queue[-1]",
           ("tests/runtime/test_distribute.py", "-k", "one_process_equals")),
    Mutant("distribute-journal-ignored",
           "dm.map(journal=...) answers no request twice: recorded outputs are not recomputed",
           "lapdtr/distribute.py", "                    if jr is not None and i in jr:",
           "                    if False:",
           ("tests/runtime/test_distribute.py", "-k", "journal_yields")),
    Mutant("coordinator-window-counts-taken-outputs",
           "the in-flight window counts items not yet answered (not outputs still held)",
           "lapdtr/runtime/coordinator.py", "        return self.issued - self.n_done",
           "        return self.issued - len(self.outputs)",
           ("tests/runtime/test_distribute.py", "-k", "lapdtr_launch_every_family")),
    Mutant("heartbeat-death-silent",
           "a rank whose heartbeat died stops naming the cause (not a silent re-plan later)",
           "lapdtr/runtime/control.py", "        if self.error is not None:\n",
           "        if False:\n", ("tests/runtime/test_control.py",)),
    Mutant("journal-records-twice", "the journal records each request once",
           "lapdtr/runtime/journal.py", "        if request in self._index:\n            return False",
           "        if False:\n            return False", ("tests/runtime/test_journal.py",)),
    # ---- data in, predictions out; restart journal of a run
    Mutant("feed-resume-recomputes", "a resumed run computes only the requests its journal lacks",
           "lapdtr/runtime/feed.py", "        self.resumed = done", "        self.resumed = []",
           ("tests/runtime/test_run_data.py", "-k", "journal_lacks")),
    # ---- transport: packets of several tensors, tiny payloads inside the header
    Mutant("packet-first-tensor-only", "a packet of several tensors arrives whole",
           "lapdtr/runtime/worker.py",
           "packet.tensors[0] if len(packet.tensors) == 1 else packet)",
           "packet.tensors[0])", ("tests/runtime/test_pipeline.py", "-k", "packets_of_several")),
    Mutant("inline-payload-offset", "a payload inside its header is read from after the header",
           "lapdtr/runtime/transport.py",
           "                raw = cur[8 * _HEADER_LEN:8 * _HEADER_LEN + n]",
           "                raw = cur[8 * _HEADER_LEN - 8:8 * _HEADER_LEN - 8 + n]",
           ("tests/runtime/test_transport.py", "-k", "shapes_dtypes")),
    Mutant("stuck-peer-exit-skipped",
           "a survivor whose receive from a stopped rank cannot be cancelled exits cleanly",
           "lapdtr/runtime/launch.py", "        write_outputs(cfg, report, echo=False)\n"
           "    exit_now_if_stuck(0)", "        write_outputs(cfg, report, echo=False)\n    pass",
           ("tests/runtime/test_pipeline.py", "-k", "woken")),
    # ---- elastic widths
    Mutant("elastic-vit-v-rows", "a reduced-width ViT attention equals zeroing the dropped heads",
           "lapdtr/elastic/vit.py", "w[2 * A:2 * A + d], _rows(b, 2 * A, 2 * A + d)",
           "w[A:A + d], _rows(b, A, A + d)", ("tests/elastic/test_vit_elastic.py",)),
    Mutant("elastic-tiny-vit-bias-rows", "TinyViT keeps each kept head's own bias table",
           "lapdtr/elastic/tiny_vit.py", "self.get_attention_biases(x.device)[:k]",
           "self.get_attention_biases(x.device)[-k:]", ("tests/elastic/test_tiny_vit_elastic.py",)),
    Mutant("controller-no-hysteresis", "the width controller does not flap on a noisy reading",
           "lapdtr/elastic/controller.py", "                h = self.policy.hysteresis",
           "                h = 0.0", ("tests/elastic/test_controller.py",)),
    Mutant("runtime-width-not-applied", "a run's ranks run at the width their controller chose",
           "lapdtr/runtime/steps.py", "        if w.widths.apply(work.width):",
           "        if False:", ("tests/runtime/test_elastic_run.py",)),
    Mutant("elastic-efficientvit-m-no-cascade",
           "EfficientViT-M's first k heads keep the cascade (head i reads head i-1's output)",
           "lapdtr/elastic/efficientvit_m.py", "                feat = feat + feats_in[i]",
           "                feat = feats_in[i]", ("tests/elastic/test_efficientvit_m_elastic.py",)),
    Mutant("elastic-efficientvit-b-one-range",
           "EfficientViT-B's k heads read every one of proj's 1 + scales input ranges",
           "lapdtr/elastic/efficientvit_b.py",
           "w[:, s * T:s * T + k * d], p.conv.bias if s == 0 else None",
           "w[:, s * k * d:(s + 1) * k * d], p.conv.bias if s == 0 else None",
           ("tests/elastic/test_efficientvit_b_elastic.py",)),
    Mutant("elastic-edgevit-local-prop-rows",
           "EdgeViT's sr > 1 attention propagates the kept heads' own channels",
           "lapdtr/elastic/edgevit.py", "F.conv_transpose2d(x, lp.weight[:d], _rows(lp.bias, 0, d)",
           "F.conv_transpose2d(x, lp.weight[-d:], _rows(lp.bias, 0, d)",
           ("tests/elastic/test_edgevit_elastic.py",)),
    Mutant("importance-one-branch",
           "calibration importance masks a head in every branch where heads meet",
           "lapdtr/elastic/importance.py",
           "m = mask.repeat_interleave(per_head).repeat(repeats).view(shape)",
           "m = torch.cat([mask.repeat_interleave(per_head)] + [torch.ones_like(mask)"
           ".repeat_interleave(per_head)] * (repeats - 1)).view(shape)",
           ("tests/elastic/test_importance.py",)),
    Mutant("importance-weight-not-gradient",
           "hidden-unit importance is |weight x gradient|, not |weight|",
           "lapdtr/elastic/importance.py", "                    s = (p.detach() * p.grad).abs()",
           "                    s = p.detach().abs()", ("tests/elastic/test_importance.py",)),
    Mutant("profile-width-flops-full",
           "profiles carry the FLOPs each unit executes at each width",
           "lapdtr/profile/profiler.py",
           'prof.at_width[key] = {"flops": int(fc.get_total_flops()),',
           'prof.at_width[key] = {"flops": int(prof.flops),',
           ("tests/plan/test_plan_widths.py", "-k", "flops_measured")),
    Mutant("replan-resets-widths", "a re-plan keeps the widths the plan ran",
           "lapdtr/plan/redistribute.py",
           "    stamp_widths(new, width, by_device={s.device: s.width for s in plan.stages})\n",
           "", ("tests/plan/test_plan_widths.py", "-k", "replan")),
    Mutant("check-plan-any-width", "check_plan refuses a width the model cannot run",
           "lapdtr/runtime/prepare.py",
           "        if not any(abs(s.width - w) <= 1e-6 for w in allowed):",
           "        if False:", ("tests/plan/test_plan_widths.py", "-k", "check_plan")),
    Mutant("plan-policy-full-width", "a plan's stage widths are what its ranks run",
           "lapdtr/elastic/policy.py", "            return stage.width, 1.0",
           "            return 1.0, 1.0",
           ("tests/runtime/test_elastic_run.py", "-k", "plan_with_widths")),
    Mutant("drain-counted-as-energy", "an injected drain is never energy used",
           "lapdtr/energy/simulated.py", "            return self._drawn_j\n",
           "            return self._drawn_j + self.drained_j\n",
           ("tests/energy/test_meters.py",)),
    # ---- planner: an inadmissible heuristic (the energy relaxation overestimates by 50%)
    Mutant("planner-inadmissible-heuristic",
           "the lapdtr planner's A* heuristic is a lower bound (plans marked exact are optimal)",
           "lapdtr/plan/lapdtr_dp.py", "    return h, nxt, cls", "    return h * 1.5, nxt, cls",
           ("tests/plan/test_planners.py", "-k", "matches_exhaustive_search or "
            "certified_lower_bound")),
    # ---- tensor split: a shard of the wrong hidden units (fc1's bias of rank 0's range)
    Mutant("tensor-mlp-wrong-bias-shard", "tensor split equals the unsharded model",
           "lapdtr/runtime/tensor.py",
           "self.fc1 = _linear_like(_slice_param(mlp.fc1.weight, sl), _slice_param(mlp.fc1.bias, sl))",
           "self.fc1 = _linear_like(_slice_param(mlp.fc1.weight, sl), _slice_param(mlp.fc1.bias, "
           "slice(0, self.stop - self.start)))",
           ("tests/runtime/test_tensor.py", "-k", "sharded_mlp_math or tensor_mode_across_ranks")),
    # ---- issue 17: the new families' per-block state, and units that share a module
    Mutant("eva-rope-dropped", "units in sequence equal model(x): eva adapter (rotary table)",
           "lapdtr/models/eva.py", "        return m.blocks[i](x, rope=_rope_table(m, x, i))",
           "        return m.blocks[i](x, rope=None)", ("tests/models/test_eva_adapter.py",)),
    Mutant("relpos-shared-bias-dropped",
           "units in sequence equal model(x): vit_relpos adapter (shared bias)",
           "lapdtr/models/vit_relpos.py", "        return m.blocks[i](x, shared_rel_pos=shared)",
           "        return m.blocks[i](x, shared_rel_pos=None)",
           ("tests/models/test_more_adapters.py", "-k", "srelpos")),
    Mutant("resnetv2-final-norm-dropped", "units in sequence equal model(x): resnetv2 head",
           "lapdtr/models/resnetv2.py", "    return m.forward_head(m.norm(x))",
           "    return m.forward_head(x)", ("tests/models/test_more_adapters.py", "-k", "resnetv2")),
    Mutant("eva-elastic-mixed-rope-unsliced", "elastic Eva equals zeroing dropped heads",
           "lapdtr/elastic/eva.py", "                rope = rope[..., :k, :, :]",
           "                rope = rope[..., -k:, :, :]", ("tests/elastic/test_eva_elastic.py",)),
    Mutant("release-frees-shared", "releasing a unit keeps what a loaded unit still owns",
           "lapdtr/runtime/stages.py", "            if k in params and k not in kept:",
           "            if k in params:",
           ("tests/runtime/test_stages.py", "-k", "share or rope_mixed")),
    # ---- issue 12: the fused token is the importance-weighted mean of the dropped tokens
    Mutant("fuse-unweighted", "the fused token is the importance-weighted mean",
           "lapdtr/summarize/summarizer.py", "    w = w_rest.to(ct)\n",
           "    w = (w_rest > 0).to(ct)\n", ("tests/summarize/test_summarizer.py",)),
    # ---- issue 12 in the runtime: the probe, the report's bytes, keep ratios over a re-plan
    Mutant("runtime-probe-previous-block", "importance from the stage's last block",
           "lapdtr/runtime/summary.py", "        last = work.end - 1\n",
           "        last = work.end - 2\n",
           ("tests/runtime/test_summarized_run.py", "-k", "one_process")),
    Mutant("runtime-boundary-bytes-payload", "the report counts the bytes sent per boundary",
           "lapdtr/runtime/report.py", "        b[\"bytes\"] += int(sent)\n",
           "        b[\"bytes\"] += int(packet.nbytes)\n",
           ("tests/runtime/test_summarized_run.py", "-k", "one_process and fp16")),
    Mutant("replan-drops-keep", "a re-plan keeps summarizing where its cuts allow",
           "lapdtr/runtime/summary.py",
           "        s.keep_ratio = keep if nxt is not None and _summarizable(host, by_name[end]) else 1.0",
           "        s.keep_ratio = 1.0", ("tests/runtime/test_summarized_run.py", "-k", "killed")),
    Mutant("planner-prices-dense-bytes", "the planner prices a boundary at its codec's bytes",
           "lapdtr/plan/summarized.py",
           "                                   codec.summarizes, profiled, codec.nbytes(batch), why))",
           "                                   codec.summarizes, profiled, profiled, why))",
           ("tests/plan/test_plan_summarized.py",)),
    Mutant("eva-probe-without-rope", "an Eva block ranks tokens with q and k rotated by RoPE",
           "lapdtr/summarize/importance.py",
           "            q, k = rotate(q), rotate(k)",
           "            q, k = q, k", ("tests/summarize/test_summarize_eva.py", "-k", "explicit")),
    Mutant("tiny-vit-windows-misplaced", "TinyViT window importance lands on its grid positions",
           "lapdtr/summarize/importance.py",
           "        grid = imp.view(B, pH // ws, pW // ws, ws, ws).transpose(2, 3).reshape(B, pH, pW)",
           "        grid = imp.view(B, pH // ws, pW // ws, ws, ws).reshape(B, pH, pW)",
           ("tests/summarize/test_summarize_tiny_vit.py",)),
    Mutant("auto-mode-always-pipeline", "mode auto runs a channel-shard plan in tensor mode",
           "lapdtr/runtime/config.py",
           "            self.mode = mode_for_plan(plan, f\"plan {self.plan}\") if plan is not None \\",
           "            self.mode = \"pipeline\" if True else None if plan is not None \\",
           ("tests/runtime/test_plan_modes.py", "-k", "auto")),
]

# ------------------------------------------------------------------------------------ running

def _copy_project(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache",
                                    ".hypothesis", "bench_out", "*.pyc")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests" / "runtime"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["LAPDTR_CACHE"] = str(copy / ".lapdtr-cache")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _check_imports_copy(copy: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import lapdtr; print(lapdtr.__file__)"],
                         cwd=copy, env=_env(copy), capture_output=True, text=True, check=True)
    if not Path(out.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutation: the copy imports lapdtr from {out.stdout.strip()}, not from "
                         f"{copy}: mutants would not be seen")


def _pytest(copy: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[str, int, str, float]:
    """(verdict, exit code, first failing test or error line, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "",
           "-W", "ignore", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", -1, f"no result within {timeout_s:.0f} s", time.time() - t0
    out = p.stdout + p.stderr
    first = next((ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    if not first and p.returncode:
        first = (out.strip().splitlines() or [""])[-1]
    return {0: "passed", 5: "no tests"}.get(p.returncode, "failed"), p.returncode, first, \
        time.time() - t0


def _apply(copy: Path, m: Mutant) -> str:
    f = copy / m.path
    text = f.read_text()
    n = text.count(m.old)
    if n != 1:
        raise LookupError(f"mutant {m.name!r}: its code occurs {n} times in {m.path} (want 1): "
                          f"update the mutant to the current code")
    f.write_text(text.replace(m.old, m.new))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip checking that the chosen tests pass unmutated")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    ap.add_argument("--out", default="runs/bench", help="folder for mutation.json")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        names = {m.name for m in MUTANTS}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"unknown mutant(s) {unknown}; mutants are: {', '.join(sorted(names))}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.path:34s} {m.invariant}")
        return 0

    rows, errors = [], []
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="lapdtr-mutation-") as tmp:
        copy = _copy_project(Path(tmp) / "project")
        _check_imports_copy(copy)
        if not args.no_baseline:
            for sel in dict.fromkeys(m.tests for m in mutants):
                verdict, code, first, secs = _pytest(copy, sel, args.timeout)
                print(f"baseline {' '.join(sel)}: {verdict} ({secs:.0f} s)", flush=True)
                if verdict != "passed":
                    errors.append(f"unmutated tests {' '.join(sel)} {verdict}: {first}")
            if errors:
                for e in errors:
                    print("mutation:", e, file=sys.stderr)
                return 2
        for m in mutants:
            try:
                original = _apply(copy, m)
            except LookupError as e:
                errors.append(str(e))
                rows.append({**dataclasses.asdict(m), "verdict": "stale", "detail": str(e)})
                print(f"{m.name:32s} STALE   {e}", flush=True)
                continue
            try:
                verdict, code, first, secs = _pytest(copy, m.tests, args.timeout)
            finally:
                (copy / m.path).write_text(original)
            status = {"failed": "killed", "timeout": "killed", "passed": "survived",
                      "no tests": "no tests"}[verdict]
            if status == "no tests":
                errors.append(f"mutant {m.name!r}: its test selection collects no test")
            rows.append({**dataclasses.asdict(m), "verdict": status, "pytest_exit": code,
                         "detail": first, "seconds": round(secs, 1)})
            print(f"{m.name:32s} {status.upper():8s} {secs:6.1f} s  {first[:110]}", flush=True)

    killed = sum(r["verdict"] == "killed" for r in rows)
    survived = [r["name"] for r in rows if r["verdict"] == "survived"]
    print(f"\n{killed} of {len(rows)} mutants killed in {time.time() - t_all:.0f} s"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    for e in errors:
        print("mutation:", e, file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(json.dumps(
        {"mutants": rows, "killed": killed, "survived": survived, "errors": errors,
         "seconds": round(time.time() - t_all, 1), "python": sys.version.split()[0]}, indent=2))
    if survived:
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

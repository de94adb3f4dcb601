"""``lapdtr elastic-curve``: FLOPs, latency and accuracy of a model at every elastic width
(:mod:`lapdtr.elastic.curve`), as a table, ``DIR/elastic_curve.json`` and
``DIR/elastic_curve.png``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["add_elastic_commands", "cmd_elastic_curve", "main"]


def _checkpoint_meta(path: Path) -> dict:
    """The safetensors metadata of ``path`` (``{}`` for a torch file or none)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a safetensors file, or a damaged one "
                         f"({type(e).__name__}: {e})") from e


def _model_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs: not JSON ({e}); expected an object, e.g. "
                         "'{\"num_classes\": 10, \"depth\": 4}'") from None
    if not isinstance(kw, dict):
        raise ValueError(f"--model-kwargs: expected a JSON object, got {type(kw).__name__}")
    return kw


def build_model(model_name: str, *, checkpoint=None, model_kwargs: dict | None = None,
                img_size: int | None = None):
    """``(model, model_kwargs, img_size)``: ``model_name`` with ``checkpoint``'s weights (checked
    key by key) or, without one, seeded random weights. A checkpoint written by
    ``train_digits_checkpoint`` / ``train_elastic_digits`` carries its ``model_kwargs`` and
    ``img_size``, used where these are not given."""
    from ..models.base import create_model, get_adapter_for_name

    adapter = get_adapter_for_name(model_name)  # unsupported name: error naming the families
    from .api import FAMILIES

    if adapter.name not in FAMILIES:
        from .base import ElasticError

        raise ElasticError(f"elastic-curve: {model_name!r} is a {adapter.name} model, a family "
                           f"without elastic layers; allowed: a model of {sorted(FAMILIES)}")
    meta = {}
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"checkpoint {str(path)!r} does not exist"
                             + ("" if not path.exists() else " as a file"))
        meta = _checkpoint_meta(path)
    if model_kwargs is None:
        model_kwargs = json.loads(meta["model_kwargs"]) if "model_kwargs" in meta else {}
    kw = dict(model_kwargs)
    if img_size is None:
        img_size = kw.get("img_size") or (int(meta["img_size"]) if "img_size" in meta else None)
    if img_size is not None and adapter.img_size_kwarg:
        kw.setdefault("img_size", int(img_size))
    if checkpoint is not None:
        from ..runtime.stages import load_model

        model = load_model(model_name, checkpoint, kw)
    else:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_model(model_name, **kw)
    return model, kw, img_size


def cmd_elastic_curve(args) -> int:
    import torch

    from .._fmt import fmt_flops, fmt_time, table
    from .curve import CURVE_JSON, CURVE_PNG, elastic_curve, plot_curve

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: {args.threads}; allowed: an integer >= 1")
    kw = _model_kwargs(args.model_kwargs)
    model, kw, img_size = build_model(args.model, checkpoint=args.checkpoint, model_kwargs=kw,
                                      img_size=args.img_size)
    if args.order != "none":
        from .api import make_elastic, order_by_magnitude_
        from .importance import order_by_importance_

        make_elastic(model)
        if args.order == "magnitude":
            order_by_magnitude_(model)
        else:
            from ..data.sources import _load_digits, digits_images, digits_split, \
                model_data_config

            cfg = model_data_config(model, img_size)
            train, _ = digits_split()
            calib = train[:256]
            x = digits_images(calib, cfg["input_size"][-1], in_chans=cfg["input_size"][0],
                              mean=cfg["mean"], std=cfg["std"])
            order_by_importance_(model, [(x, _load_digits()[1][torch.as_tensor(calib)])])
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        curve = elastic_curve(model, img_size=img_size, data=args.data, repeats=args.repeats,
                              warmup=args.warmup, cache_dir=args.cache_dir,
                              use_cache=not args.no_cache,
                              meta={"model_name": args.model, "checkpoint": args.checkpoint,
                                    "model_kwargs": kw, "order": args.order})
    finally:
        torch.set_num_threads(threads)
    rows = []
    for r in curve["rows"]:
        heads = ", ".join(f"{k}/{h}" for k, h in r["heads"])
        hidden = ", ".join(f"{m}/{d}" for m, d in r["hidden"])
        rows.append([f"{r['width']:.4g}", heads, hidden, fmt_flops(r["flops"]),
                     f"{r['flops_ratio']:.3f}", fmt_time(r["latency_s"]),
                     f"{r['latency_ratio']:.3f}",
                     "-" if r["top1"] is None else f"{100 * r['top1']:.2f}%"])
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random weights (seed 0)"
    print(f"{curve['model']} ({curve['family']}), {img_size} px, {weights}; latency = median "
          f"of {args.repeats} runs at batch 1, {curve['threads']} thread(s)"
          + (f"; top-1 on the {args.data} test split" if args.data else ""))
    print(table(["width", "heads", "hidden", "FLOPs", "FLOPs/full", "latency", "lat/full",
                 "top-1"], rows, align="rllrrrrr"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CURVE_JSON).write_text(json.dumps(curve, indent=2))
    plot_curve(curve, out / CURVE_PNG)
    print(f"wrote {out / CURVE_JSON} and {out / CURVE_PNG}")
    return 0


def add_elastic_commands(subparsers) -> None:
    """Register ``elastic-curve`` on an argparse subparsers object."""
    from .curve import DATA

    p = subparsers.add_parser(
        "elastic-curve", help="FLOPs, latency and accuracy at every elastic width of a model",
        description="For every width the model's elastic layers allow: whole-model FLOPs "
                    "(profile_model widths='all'), latency at batch 1 (median of --repeats) "
                    "and, with --data, top-1 on its test split; a table, DIR/elastic_curve.json "
                    "(its 'accuracy' is plan_widths' accuracy argument) and "
                    "DIR/elastic_curve.png.")
    p.add_argument("--model", required=True, help="a supported timm model of an elastic family")
    p.add_argument("--checkpoint", default=None,
                   help="safetensors (or torch weights-only) file; default: random weights")
    p.add_argument("--model-kwargs", dest="model_kwargs", default=None,
                   help="JSON object for create_model (default: the checkpoint's metadata, "
                        "else none), e.g. '{\"num_classes\": 10, \"depth\": 4}'")
    p.add_argument("--img-size", dest="img_size", type=int, default=None,
                   help="input size (default: the checkpoint's, else the model's)")
    p.add_argument("--data", default=None, choices=list(DATA),
                   help="measure top-1 on this data's test split (needs a 10-class model)")
    p.add_argument("--order", default="none", choices=["none", "importance", "magnitude"],
                   help="reorder heads / hidden units first (importance: on 256 digits train "
                        "images); default none (an elastic-trained checkpoint is ordered)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while timing (default: torch's setting)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per width (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per width first")
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="profile cache (default ~/.cache/lapdtr)")
    p.add_argument("--no-cache", dest="no_cache", action="store_true",
                   help="always profile afresh")
    p.add_argument("--out", required=True, help="write DIR/elastic_curve.json and .png")
    p.set_defaults(func=cmd_elastic_curve)


def main(argv=None) -> int:
    """Run this command standalone: the ``lapdtr`` command with the same arguments."""
    from ..cli import main as lapdtr_main

    return lapdtr_main(argv)


if __name__ == "__main__":
    sys.exit(main())

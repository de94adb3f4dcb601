"""Classify a folder of images on local ranks and print the accuracy:

    python infer/classify.py --model resnet10t --checkpoint digits.safetensors \
        --model-kwargs '{"num_classes": 10}' --root images/ --nproc 2 --img-size 32 --out runs/cls

``--root`` is ``root/<class>/<image>`` (torchvision's ``ImageFolder``); images are preprocessed
with timm's eval transform for the model. Rank 0 writes ``predictions.jsonl`` (top-k classes per
image), ``report.json`` (with ``meta["accuracy"]``: top-1/top-5) and ``config.json`` into ``--out``.
A checkpoint from ``lapdtr.data.train_digits_checkpoint`` needs its ``model_kwargs``. The run is
``lapdtr run`` with a ``data: {kind: image_folder, root: ...}`` block (``lapdtr.data.DataConfig``).
"""
import argparse
import json
import sys

from lapdtr.runtime.config import RunConfig
from lapdtr.runtime.launch import run


def build_config(args) -> dict:
    d = {"model": args.model, "model_kwargs": json.loads(args.model_kwargs),
         "world_size": args.nproc, "batch_size": args.batch_size, "out": args.out,
         "data": {"kind": "image_folder", "root": args.root, "topk": args.topk}}
    if args.checkpoint is not None:
        d["checkpoint"] = args.checkpoint
    if args.img_size is not None:
        d["img_size"] = args.img_size
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="classify an image folder on lapdtr ranks")
    p.add_argument("--model", required=True, help="a supported timm model name")
    p.add_argument("--checkpoint", help="safetensors (or torch weights-only) checkpoint")
    p.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--root", required=True, help="image folder: root/<class>/<image>")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (world_size)")
    p.add_argument("--img-size", type=int, help="side the model runs at (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per request")
    p.add_argument("--topk", type=int, default=5, help="classes kept per image in predictions.jsonl")
    p.add_argument("--out", default="runs/classify")
    args = p.parse_args(argv)
    try:
        report = run(RunConfig.from_dict(build_config(args)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.meta.get("accuracy"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

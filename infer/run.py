"""Distributed inference, one torchrun rank per process:

    torchrun --nproc_per_node 3 infer/run.py --config configs/pipeline_deit_tiny.yaml
    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        infer/run.py --config configs/pipeline_deit_tiny.yaml

Rank 0 writes report.json, plan.json, config.json and timeline.png into the config's ``out``.
"""
import sys

from lapdtr.runtime.launch import main_torchrun

if __name__ == "__main__":
    sys.exit(main_torchrun())

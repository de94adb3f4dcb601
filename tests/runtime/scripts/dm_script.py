"""A user's script on every rank, public API only: each model through lapdtr.distribute, batches
of sizes 1, 3 and 8 through dm(x), then a DataLoader through dm.map(...); the driver saves every
output and, in the same process beforehand, model(x) on an identical copy.

    python dm_script.py OUT MODEL[,MODEL...] [--kill-rank R] [--journal] [--init-group]
"""
import copy
import os
import signal
import sys

import torch

import lapdtr
from lapdtr.testing import informative_weights_

SMALL = {"deit_tiny_patch16_224": {"depth": 3, "img_size": 64, "num_classes": 10},
         "efficientvit_m0": {"img_size": 64, "num_classes": 10},
         "edgevit_xxs": {"img_size": 64, "num_classes": 10},
         "resnet18": {"num_classes": 10}}
IMG = {"resnet18": 64}


def main(out, names, kill_rank=None):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"pid{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
    for name in names:
        kw = SMALL[name]
        img = IMG.get(name, kw.get("img_size", 64))
        torch.manual_seed(0)
        model = lapdtr.create_model(name, **kw)
        probe = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
        informative_weights_(model, seed=1, probe=probe)
        reference = copy.deepcopy(model).eval()
        batches = [torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(10 + i))
                   for i, b in enumerate((1, 3, 8))]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(10, 3, img, img), torch.arange(10)),
            batch_size=2)
        if INIT_GROUP and not torch.distributed.is_initialized():  # the user's own group
            torch.distributed.init_process_group("gloo")
        with lapdtr.distribute(model, img_size=img, micro_batches=2,
                               heartbeat_timeout_s=2.0) as dm:
            if dm.is_driver:
                got, want = [], []
                for i, x in enumerate(batches):
                    if kill_rank is not None and i == 1:
                        pid = int(open(os.path.join(out, f"pid{kill_rank}")).read())
                        os.kill(pid, signal.SIGKILL)
                    got.append(dm(x))
                    with torch.no_grad():
                        want.append(reference(x))
                journal = os.path.join(out, f"{name}-journal") if JOURNAL else None
                for j, (y, (x, _)) in enumerate(zip(dm.map(loader, journal=journal), loader)):
                    if JOURNAL and j == 2 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                        # the first attempt dies mid-stream: torchrun restarts every worker
                        pid = int(open(os.path.join(out, "pid1")).read())
                        os.kill(pid, signal.SIGKILL)
                        signal.pause()
                    got.append(y)
                    with torch.no_grad():
                        want.append(reference(x))
                report = dm.close()
                report.save(os.path.join(out, f"{name}-report.json"))
                torch.save({"got": got, "want": want}, os.path.join(out, f"{name}.pt"))


JOURNAL = False
INIT_GROUP = False

if __name__ == "__main__":
    kill = None
    if "--init-group" in sys.argv:
        sys.argv.remove("--init-group")
        INIT_GROUP = True
    if "--journal" in sys.argv:
        sys.argv.remove("--journal")
        JOURNAL = True
    if "--kill-rank" in sys.argv:
        i = sys.argv.index("--kill-rank")
        kill = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    main(sys.argv[1], sys.argv[2].split(","), kill)

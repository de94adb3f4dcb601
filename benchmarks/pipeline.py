"""Pipeline runtime benchmark on local CPU ranks (gloo).

For p = 2, 3, 4 ranks and m = 1, 4, 16 micro-batches per batch it measures:
  * throughput of lapdtr's pipeline against the GPipe bubble bound: with per-micro-batch stage
    times t_i measured in the same run, a flushed batch of m micro-batches cannot go faster than
    (m + p - 1) * max(t_i), i.e. efficiency m / (m + p - 1) of the bottleneck rate 1 / max(t_i);
    the ratio reported is achieved efficiency / that bound (lapdtr streams the batches without a
    flush in between, as ScheduleGPipe's first stage also does across steps, so it may pass 1);
  * throughput of ``torch.distributed.pipelining`` (``ScheduleGPipe``), same model, same cuts,
    same batch and micro-batches, on the same machine right after; both engines make each
    request's synthetic input inside the clock on their first rank (lapdtr's coordinator does
    so per request; GPipe's first rank does so before each ``step``);
  * single-request latency (one micro-batch in flight) against the sum of the stage compute
    times and the boundary transfer times measured with plain gloo send/recv, and the overhead
    per boundary in microseconds.

    python benchmarks/pipeline.py                   # full grid, writes runs/bench/pipeline.json
    python benchmarks/pipeline.py --ranks 2 3 --micro-batches 1 4 --requests 4 --depth 6

Numbers depend on the machine and its load: on a machine with fewer cores than ranks, stages
share cores, so compare the ratios, not the absolute rates.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lapdtr
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.pipeline import request_input


def even_cuts(num_units: int, p: int) -> list[int]:
    return [round(num_units * i / p) for i in range(1, p)]


def _gpipe_worker(rank, p, m, model_name, kw, cuts, batch, requests, port, out_file, threads):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("gpipe", store), rank=rank,
                            world_size=p, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = lapdtr.create_model(model_name, **kw)
    stage_mod = lapdtr.partition(model, cuts)[rank]
    stage = PipelineStage(stage_mod, rank, p, torch.device("cpu"))
    sched = ScheduleGPipe(stage, n_microbatches=m)
    cfg = RunConfig(batch_size=batch)
    with torch.no_grad():
        for r in range(requests + 1):
            if r == 1:
                dist.barrier()
                t0 = time.perf_counter()
            if rank == 0:
                # the request is made inside the clock, as lapdtr's coordinator makes it
                sched.step(request_input(cfg, r, 224))
            else:
                sched.step()
    dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        Path(out_file).write_text(json.dumps({"wall_s": wall}))
    dist.destroy_process_group()


def run_gpipe(p, m, model_name, kw, cuts, batch, requests, threads) -> float:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = Path(f"/tmp/lapdtr-gpipe-{os.getpid()}.json")
    mp.start_processes(_gpipe_worker, args=(p, m, model_name, kw, cuts, batch, requests,
                                            store.port, str(out), threads),
                       nprocs=p, start_method="spawn")
    wall = json.loads(out.read_text())["wall_s"]
    out.unlink()
    return requests * batch / wall


def _pingpong_worker(rank, sizes, reps, port, out_file):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("pp", store), rank=rank, world_size=2)
    res = {}
    for n in sizes:
        x = torch.zeros(max(1, n // 4))
        for i in range(reps + 2):
            if i == 2:
                t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
        res[str(n)] = (time.perf_counter() - t0) / reps / 2  # one way
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.destroy_process_group()


def transfer_times(sizes, reps=20) -> dict[int, float]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = Path(f"/tmp/lapdtr-pp-{os.getpid()}.json")
    mp.start_processes(_pingpong_worker, args=(sorted(set(sizes)), reps, store.port, str(out)),
                       nprocs=2, start_method="spawn")
    res = {int(k): v for k, v in json.loads(out.read_text()).items()}
    out.unlink()
    return res


def _overhead_worker(rank, reps, port, prefix, out_file):
    from lapdtr.runtime.pipeline import _client
    from lapdtr.runtime.transport import Transport

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("ov", store), rank=rank, world_size=2)
    tr = Transport(store, rank, torch.device("cpu"), prefix,
                   connect=lambda: _client("127.0.0.1", port))
    x = torch.zeros(8)

    def recv():
        while (msg := tr.poll(timeout_s=1.0)) is None:
            pass
        return msg

    res = {}
    for mode in ("gloo", "lapdtr"):
        for i in range(reps + 5):
            if i == 5:
                t0 = time.perf_counter()
            if mode == "gloo":
                if rank == 0:
                    dist.send(x, 1)
                    dist.recv(x, 1)
                else:
                    dist.recv(x, 0)
                    dist.send(x, 0)
            elif rank == 0:
                tr.send(1, i, 0, x)
                recv()
            else:
                recv()
                tr.send(0, i, 0, x)
        res[mode] = (time.perf_counter() - t0) / reps / 2
    tr.close()
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.destroy_process_group()


def boundary_overhead_us(reps=300) -> dict:
    """One-way time of a tiny boundary message: plain gloo send/recv vs lapdtr's transport
    (store header + gloo payload + receiver thread); the difference is lapdtr's overhead."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = Path(f"/tmp/lapdtr-ov-{os.getpid()}.json")
    mp.start_processes(_overhead_worker, args=(reps, store.port, "ov/", str(out)), nprocs=2,
                       start_method="spawn")
    res = json.loads(out.read_text())
    out.unlink()
    return {"gloo_one_way_us": res["gloo"] * 1e6, "lapdtr_one_way_us": res["lapdtr"] * 1e6,
            "overhead_us": (res["lapdtr"] - res["gloo"]) * 1e6}


def stage_times(report) -> list[float]:
    """Per-item compute time of each rank (seconds per micro-batch)."""
    return [k.compute_s / max(1, k.items) for k in report.ranks]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--depth", type=int, default=12, help="ViT depth (fewer blocks run faster)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--requests", type=int, default=6,
                    help="batches per measurement (both engines warm up first, untimed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-gpipe", action="store_true")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the per-boundary overhead micro-benchmark")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overhead_only:
        print(json.dumps(boundary_overhead_us(), indent=2))
        return 0
    kw = {"depth": args.depth} if "deit" in args.model or "vit" in args.model else {}
    n_units = len(lapdtr.units(lapdtr.create_model(args.model, **kw)))
    results = {"model": args.model, "model_kwargs": kw, "batch": args.batch,
               "requests": args.requests, "threads_per_rank": args.threads,
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "throughput": [],
               "latency": []}
    print(f"{args.model} {kw}: {n_units} units, batch {args.batch}, {args.requests} batches per "
          f"point, {os.cpu_count()} CPU cores")
    print(f"{'p':>2} {'m':>3} {'lapdtr img/s':>12} {'bound img/s':>11} {'eff':>6} {'bound eff':>9} "
          f"{'ratio':>6} {'gpipe img/s':>11} {'vs gpipe':>8}")
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        for m in args.micro_batches:
            if m > args.batch:
                continue
            cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p, cuts=cuts,
                            requests=args.requests, batch_size=args.batch, micro_batches=m,
                            out=str(out / f"p{p}_m{m}"), plots=False,
                            threads_per_rank=args.threads)
            r = run(cfg)
            t = stage_times(r)
            mb = args.batch / m
            rate = r.completed * args.batch / r.wall_s  # ranks warm up before the clock starts
            ideal = mb / max(t)  # images/s with no bubble at the bottleneck stage
            bound_eff = m / (m + p - 1)
            eff = rate / ideal
            row = {"p": p, "m": m, "cuts": cuts, "lapdtr_img_s": rate, "stage_s": t,
                   "ideal_img_s": ideal, "bound_efficiency": bound_eff, "efficiency": eff,
                   "ratio_to_bound": eff / bound_eff, "latency_p50_s": r.latency_p50_s}
            if not args.no_gpipe:
                g = run_gpipe(p, m, args.model, kw, cuts, args.batch, args.requests, args.threads)
                row.update(gpipe_img_s=g, vs_gpipe=rate / g)
            results["throughput"].append(row)
            print(f"{p:>2} {m:>3} {rate:>12.1f} {ideal * bound_eff:>11.1f} {eff:>6.2f} "
                  f"{bound_eff:>9.2f} {eff / bound_eff:>6.2f} "
                  f"{row.get('gpipe_img_s', float('nan')):>11.1f} "
                  f"{row.get('vs_gpipe', float('nan')):>8.2f}", flush=True)

    # single-request latency: one micro-batch of one image in flight at a time
    print(f"\n{'p':>2} {'latency ms':>10} {'compute ms':>10} {'transfer ms':>11} {'ratio':>6} "
          f"{'overhead/boundary us':>20}")
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p, cuts=cuts,
                        requests=max(8, args.requests), batch_size=1, micro_batches=1,
                        max_inflight=1, out=str(out / f"lat_p{p}"), plots=False,
                        threads_per_rank=args.threads)
        r = run(cfg)
        compute = sum(stage_times(r))
        units = lapdtr.units(lapdtr.create_model(args.model, **kw))
        img = 224
        sizes = [4 * 3 * img * img] + [int(torch.tensor(units[c - 1].out_shape).prod()) * 4
                                        for c in cuts] + [int(torch.tensor(units[-1].out_shape).prod()) * 4]
        tt = transfer_times(sizes)
        # boundaries: input to stage 0 (from rank 0 to itself: no transfer), the p-1 cuts, and
        # the logits back to rank 0
        transfer = sum(tt[s] for s in sizes[1:])
        lat = r.latency_p50_s
        boundaries = p  # p - 1 cuts + the way back to the coordinator
        over = (lat - compute - transfer) / boundaries
        results["latency"].append({"p": p, "latency_s": lat, "compute_s": compute,
                                   "transfer_s": transfer, "ratio": lat / (compute + transfer),
                                   "overhead_per_boundary_us": over * 1e6,
                                   "boundary_bytes": sizes})
        print(f"{p:>2} {lat * 1e3:>10.2f} {compute * 1e3:>10.2f} {transfer * 1e3:>11.3f} "
              f"{lat / (compute + transfer):>6.2f} {over * 1e6:>20.0f}", flush=True)
    ov = boundary_overhead_us()
    results["boundary_overhead"] = ov
    print(f"\nper-boundary overhead (tiny tensor, one way): gloo send/recv "
          f"{ov['gloo_one_way_us']:.0f} us, lapdtr transport {ov['lapdtr_one_way_us']:.0f} us, "
          f"overhead {ov['overhead_us']:.0f} us")
    path = out / "pipeline.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

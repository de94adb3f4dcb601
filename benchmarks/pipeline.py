"""Pipeline runtime benchmark on local CPU ranks (gloo).

For p = 2, 3, 4 ranks and m = 1, 4, 16 micro-batches per batch it measures, ``--trials``
times with the two engines alternating (this machine's speed drifts by several percent over a
minute, so one run of each compares drift as much as engines; the medians are reported):
  * throughput of lapdtr's pipeline against the GPipe bubble bound: with per-micro-batch stage
    times t_i measured in the same run, a flushed batch of m micro-batches cannot go faster than
    (m + p - 1) * max(t_i), i.e. efficiency m / (m + p - 1) of the bottleneck rate 1 / max(t_i);
    the ratio reported is achieved efficiency / that bound (lapdtr streams the batches without a
    flush in between, as ScheduleGPipe's first stage also does across steps, so it may pass 1);
  * throughput of ``torch.distributed.pipelining`` (``ScheduleGPipe``), same model, same cuts,
    same batch and micro-batches, right after; both engines make each request's synthetic input
    inside the clock on their first rank (lapdtr's coordinator does so per request; GPipe's
    first rank does so before each ``step``). lapdtr runs with its defaults (fewer items in
    flight where ranks share cores, ``lapdtr.runtime.placement``);
  * single-request latency (one image in flight) against a *bare pipeline*: the same stages on
    the same ranks joined by blocking ``dist.send``/``dist.recv`` into preallocated buffers of
    known shapes, nothing else (no headers, threads, caches, control plane), i.e. the sum of
    stage compute and transfer as it is on this machine; and, as a second reference, against
    lapdtr's own stage compute plus a warm gloo ping-pong of each boundary;
  * the overhead per boundary in microseconds (a tiny message, one way: lapdtr's transport vs a
    plain gloo send/recv).

    python benchmarks/pipeline.py                   # full grid, writes runs/bench/pipeline.json
    python benchmarks/pipeline.py --ranks 2 3 --micro-batches 1 4 --requests 4 --trials 1

Every engine's ranks run with the same allocator settings: lapdtr's default ``tune_malloc``
(freed memory kept for reuse, ``lapdtr.runtime.placement``), which the GPipe and bare baselines
apply too; ``--malloc default`` runs all of them with glibc's own settings instead.

Numbers depend on the machine and its load: on a machine with fewer cores than ranks, stages
share cores, so compare the ratios, not the absolute rates.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lapdtr
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.pipeline import request_input
from lapdtr.runtime.placement import tune_malloc


def even_cuts(num_units: int, p: int) -> list[int]:
    return [round(num_units * i / p) for i in range(1, p)]


def _spawn(worker, nprocs: int, *args) -> dict:
    """Run ``worker(rank, port, out_file, *args)`` on ``nprocs`` local processes; returns the
    JSON its rank 0 wrote to ``out_file``."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = Path(f"/tmp/lapdtr-bench-{worker.__name__}-{os.getpid()}.json")
    mp.start_processes(worker, args=(store.port, str(out), *args), nprocs=nprocs,
                       start_method="spawn")
    res = json.loads(out.read_text())
    out.unlink()
    return res


def _join(rank: int, world_size: int, port: int, prefix: str, threads: int = 1,
          malloc: bool = False) -> None:
    """A baseline worker's set-up: allocator settings (``malloc``: those lapdtr's ranks run
    with), torch threads, then its gloo group."""
    if malloc:
        tune_malloc()
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=300))


def _gpipe_worker(rank, port, out_file, p, m, model_name, kw, cuts, batch, requests, threads,
                  malloc):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    _join(rank, p, port, "gpipe", threads, malloc)
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
                c0 = os.times()
            if rank == 0:
                # the request is made inside the clock, as lapdtr's coordinator makes it
                sched.step(request_input(cfg, r, 224))
            else:
                sched.step()
    dist.barrier()
    wall = time.perf_counter() - t0
    c1 = os.times()
    cpu = [None] * p
    dist.all_gather_object(cpu, c1.user + c1.system - c0.user - c0.system)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    dist.destroy_process_group()


def run_gpipe(p, m, model_name, kw, cuts, batch, requests, threads, malloc=True) -> dict:
    """ScheduleGPipe's images/s (``img_s``) and each rank's CPU seconds (``cpu_s``)."""
    res = _spawn(_gpipe_worker, p, p, m, model_name, kw, cuts, batch, requests, threads, malloc)
    return {"img_s": requests * batch / res["wall_s"], "cpu_s": res["cpu_s"]}


def _gloo_pingpong(x, rank, reps, warm):
    """Seconds of one one-way trip of ``x`` between ranks 0 and 1 (plain send/recv)."""
    for i in range(reps + warm):
        if i == warm:
            t0 = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        else:
            dist.recv(x, 0)
            dist.send(x, 0)
    return (time.perf_counter() - t0) / reps / 2


def _pingpong_worker(rank, port, out_file, sizes, reps):
    _join(rank, 2, port, "pp")
    res = {}
    for n in sizes:
        res[str(n)] = _gloo_pingpong(torch.zeros(max(1, n // 4)), rank, reps, 2)
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.destroy_process_group()


def transfer_times(sizes, reps=20) -> dict[int, float]:
    res = _spawn(_pingpong_worker, 2, sorted(set(sizes)), reps)
    return {int(k): v for k, v in res.items()}


def _overhead_worker(rank, port, out_file, reps):
    from lapdtr.runtime.transport import Transport

    _join(rank, 2, port, "ov")
    tr = Transport(rank, torch.device("cpu"))
    x = torch.zeros(8)

    def recv():
        while (msg := tr.poll(timeout_s=1.0)) is None:
            pass
        return msg

    res = {"gloo": _gloo_pingpong(x, rank, reps, 5)}
    for i in range(reps + 5):
        if i == 5:
            t0 = time.perf_counter()
        if rank == 0:
            tr.send(1, i, 0, x)
            recv()
        else:
            recv()
            tr.send(0, i, 0, x)
        tr.release([i])  # the reply says the item is done, as the coordinator would
    res["lapdtr"] = (time.perf_counter() - t0) / reps / 2
    tr.close()
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    dist.destroy_process_group()


def boundary_overhead_us(reps=300) -> dict:
    """One-way time of a tiny boundary message: plain gloo send/recv vs lapdtr's transport
    (header and payload, pre-posted receives, receiver thread); the difference is lapdtr's
    overhead."""
    res = _spawn(_overhead_worker, 2, reps)
    return {"gloo_one_way_us": res["gloo"] * 1e6, "lapdtr_one_way_us": res["lapdtr"] * 1e6,
            "overhead_us": (res["lapdtr"] - res["gloo"]) * 1e6}


def _bare_worker(rank, port, out_file, p, model_name, kw, cuts, requests, threads, img, malloc):
    """The bare pipeline: stage ``rank`` between blocking gloo send/recv of known shapes."""
    _join(rank, p, port, "bare", threads, malloc)
    torch.manual_seed(0)
    stages = lapdtr.partition(lapdtr.create_model(model_name, **kw).eval(), cuts)
    cfg = RunConfig(batch_size=1)
    with torch.no_grad():
        x = request_input(cfg, 0, img)
        ins = []
        for st in stages:  # boundary shapes, known in advance as in any static pipeline
            ins.append(torch.empty_like(x))
            x = st(x)
        out = torch.empty_like(x)
        stage, lat = stages[rank], []
        for r in range(requests + 2):  # two untimed warm-up requests
            if rank == 0:
                x = request_input(cfg, r, img)
                t0 = time.perf_counter()
                y = stage(x)
                if p > 1:
                    dist.send(y, 1)
                    dist.recv(out, p - 1)
                if r >= 2:
                    lat.append(time.perf_counter() - t0)
            else:
                dist.recv(ins[rank], rank - 1)
                dist.send(stage(ins[rank]), (rank + 1) % p)
    if rank == 0:
        Path(out_file).write_text(json.dumps({"latency_s": lat}))
    dist.barrier()
    dist.destroy_process_group()


def run_bare(p, model_name, kw, cuts, requests, threads, img, malloc=True) -> list[float]:
    return _spawn(_bare_worker, p, p, model_name, kw, cuts, requests, threads, img,
                  malloc)["latency_s"]


def stage_times(report) -> list[float]:
    """Per-item compute time of each rank (seconds per micro-batch)."""
    return [k.compute_s / max(1, k.items) for k in report.ranks]


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--depth", type=int, default=12, help="ViT depth (fewer blocks run faster)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--requests", type=int, default=6,
                    help="batches per measurement (both engines warm up first, untimed)")
    ap.add_argument("--trials", type=int, default=3,
                    help="alternating runs of each engine per point; medians are reported")
    ap.add_argument("--latency-requests", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-gpipe", action="store_true")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="allocator settings of every engine's ranks: lapdtr's default "
                         "(tune_malloc), or glibc's own")
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
    malloc = args.malloc == "tuned"
    units = lapdtr.units(lapdtr.create_model(args.model, **kw))
    n_units = len(units)
    results = {"model": args.model, "model_kwargs": kw, "batch": args.batch,
               "requests": args.requests, "trials": args.trials,
               "threads_per_rank": args.threads, "cpu_count": os.cpu_count(),
               "malloc": args.malloc,
               "torch": torch.__version__, "throughput": [], "latency": []}
    print(f"{args.model} {kw}: {n_units} units, batch {args.batch}, {args.requests} batches per "
          f"point, {args.trials} trial(s) each, {os.cpu_count()} CPU cores, malloc {args.malloc} "
          "(every engine); medians over trials")
    print(f"{'p':>2} {'m':>3} {'win':>3} {'lapdtr img/s':>12} {'bound img/s':>11} "
          f"{'eff':>6} {'bound eff':>9} {'ratio':>6} {'gpipe img/s':>11} {'vs gpipe':>8} "
          f"{'(min-max)':>11} {'cpu/img':>7} {'busy lap/gp':>11}")
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        for m in args.micro_batches:
            if m > args.batch:
                continue
            trials = []
            for t in range(args.trials):
                cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p, cuts=cuts,
                                requests=args.requests, batch_size=args.batch, micro_batches=m,
                                out=str(out / f"p{p}_m{m}"), plots=False,
                                threads_per_rank=args.threads, tune_malloc=malloc)
                r = run(cfg)
                # ranks warm up before the clock starts
                tr = {"lapdtr": {"img_s": r.completed * args.batch / r.wall_s,
                                 "stage_s": stage_times(r), "cpu_s": [k.cpu_s for k in r.ranks],
                                 "cpus": [k.cpus for k in r.ranks],
                                 "max_inflight": r.meta["max_inflight"],
                                 "latency_p50_s": r.latency_p50_s}}
                if not args.no_gpipe:
                    g = run_gpipe(p, m, args.model, kw, cuts, args.batch, args.requests,
                                  args.threads, malloc)
                    tr["gpipe_img_s"], tr["gpipe_cpu_s"] = g["img_s"], g["cpu_s"]
                    tr["vs_gpipe"] = tr["lapdtr"]["img_s"] / tr["gpipe_img_s"]
                trials.append(tr)
            lap = [t["lapdtr"] for t in trials]
            rate = _median([x["img_s"] for x in lap])
            st = [_median([x["stage_s"][i] for x in lap]) for i in range(p)]
            mb = args.batch / m
            ideal = mb / max(st)  # images/s with no bubble at the bottleneck stage
            bound_eff = m / (m + p - 1)
            eff = rate / ideal
            row = {"p": p, "m": m, "cuts": cuts, "max_inflight": lap[0]["max_inflight"],
                   "lapdtr_img_s": rate, "stage_s": st, "ideal_img_s": ideal,
                   "bound_efficiency": bound_eff, "efficiency": eff,
                   "ratio_to_bound": eff / bound_eff, "trials": trials}
            vs = [t["vs_gpipe"] for t in trials if "vs_gpipe" in t]
            if vs:
                row.update(gpipe_img_s=_median([t["gpipe_img_s"] for t in trials]),
                           vs_gpipe=_median(vs), vs_gpipe_min=min(vs), vs_gpipe_max=max(vs))
                # where the difference comes from: CPU seconds per image (all ranks), and how
                # busy that kept the host's cores (CPU seconds / (wall seconds x cores))
                n_img, cores = args.requests * args.batch, os.cpu_count() or 1
                cpu_l = _median([sum(x["cpu_s"]) for x in lap])
                cpu_g = _median([sum(t["gpipe_cpu_s"]) for t in trials])
                row.update(cpu_per_img_ms=cpu_l / n_img * 1e3, gpipe_cpu_per_img_ms=cpu_g / n_img * 1e3,
                           cpu_vs_gpipe=cpu_l / cpu_g,
                           busy=_median([sum(x["cpu_s"]) * x["img_s"] / n_img / cores for x in lap]),
                           gpipe_busy=_median([sum(t["gpipe_cpu_s"]) * t["gpipe_img_s"] / n_img / cores
                                               for t in trials]))
            results["throughput"].append(row)
            print(f"{p:>2} {m:>3} {row['max_inflight']:>3} {rate:>12.1f} "
                  f"{ideal * bound_eff:>11.1f} "
                  f"{eff:>6.2f} {bound_eff:>9.2f} {eff / bound_eff:>6.2f} "
                  f"{row.get('gpipe_img_s', float('nan')):>11.1f} "
                  f"{row.get('vs_gpipe', float('nan')):>8.2f} "
                  f"{row.get('vs_gpipe_min', float('nan')):>5.2f}-"
                  f"{row.get('vs_gpipe_max', float('nan')):<5.2f} "
                  f"{row.get('cpu_vs_gpipe', float('nan')):>7.3f} "
                  f"{row.get('busy', float('nan')):>5.2f}/{row.get('gpipe_busy', float('nan')):<5.2f}",
                  flush=True)

    # single-request latency: one micro-batch of one image in flight at a time
    print(f"\n{'p':>2} {'lapdtr ms':>9} {'bare ms':>8} {'vs bare':>7} {'compute ms':>10} "
          f"{'transfer ms':>11} {'vs c+t':>6} {'over bare/boundary us':>21}")
    img = 224
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        lat_l, lat_b, comp = [], [], []
        for t in range(args.trials):
            cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p, cuts=cuts,
                            requests=args.latency_requests, batch_size=1, micro_batches=1,
                            max_inflight=1, out=str(out / f"lat_p{p}"), plots=False,
                            threads_per_rank=args.threads, tune_malloc=malloc)
            r = run(cfg)
            lat_l.append(r.latency_p50_s)
            comp.append(sum(stage_times(r)))
            lat_b.append(_median(run_bare(p, args.model, kw, cuts, args.latency_requests,
                                          args.threads, img, malloc)))
        lat, bare, compute = _median(lat_l), _median(lat_b), _median(comp)
        sizes = [4 * 3 * img * img] + [int(torch.tensor(units[c - 1].out_shape).prod()) * 4
                                        for c in cuts] + [int(torch.tensor(units[-1].out_shape).prod()) * 4]
        tt = transfer_times(sizes)
        # boundaries: input to stage 0 (from rank 0 to itself: no transfer), the p-1 cuts, and
        # the logits back to rank 0
        transfer = sum(tt[s] for s in sizes[1:])
        boundaries = p  # p - 1 cuts + the way back to the coordinator
        over = (lat - bare) / boundaries
        results["latency"].append({
            "p": p, "latency_s": lat, "bare_latency_s": bare, "vs_bare": lat / bare,
            "compute_s": compute, "transfer_s": transfer, "ratio": lat / (compute + transfer),
            "overhead_vs_bare_per_boundary_us": over * 1e6, "boundary_bytes": sizes,
            "trials": {"lapdtr_p50_s": lat_l, "bare_p50_s": lat_b, "compute_s": comp}})
        print(f"{p:>2} {lat * 1e3:>9.2f} {bare * 1e3:>8.2f} {lat / bare:>7.3f} "
              f"{compute * 1e3:>10.2f} {transfer * 1e3:>11.3f} {lat / (compute + transfer):>6.3f} "
              f"{over * 1e6:>21.0f}", flush=True)
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

"""Pipeline runtime benchmark on local CPU ranks (gloo).

For p = 2, 3, 4 ranks and m = 1, 4, 16 micro-batches per batch it measures, ``--trials``
times with the engines' order alternating per trial (lapdtr first on even trials, the baseline
first on odd ones; this machine's speed drifts by several percent over a minute, so one run of
each compares drift as much as engines). Every ratio printed is the median over trials of the
per-trial ratio, printed and saved with its spread (min-max over the trials):
  * stage compute t_i of each rank, seconds per micro-batch, taken in *CPU time of the thread
    that runs the stage* (``time.thread_time_ns`` around each stage forward; with
    ``--threads`` > 1 the process's CPU time instead, which the intra-op threads add to), so it
    does not count waiting for a core; lapdtr's own wall-clock figure is kept beside it. The
    runtime has no such meter: the benchmark adds it to lapdtr's ranks through ``run``'s
    ``init_fn`` (it wraps ``RankModel.run`` while ``Worker.process`` runs, i.e. the stream's
    stage forwards, not the untimed warm-up), lapdtr itself is unchanged;
  * throughput of lapdtr's pipeline against two bounds built from those t_i:
      - the *steady-state* bound of a pipeline that does not flush, which is how lapdtr runs:
        the N = requests x m micro-batches of the run stream back to back, and the bottleneck
        stage has to run all N of them after the first has passed the stages before it and
        before the last passes the stages after it, so the run takes at least
        sum(t_i) + (N - 1) * max(t_i) (<= (N + p - 1) * max(t_i), equal for balanced stages;
        the rate tends to 1 / max(t_i) for long streams). Efficiency over it is <= 1 up to
        noise. Where ranks outnumber the cores, the cores also bound the run:
        N * sum(t_i) / cores; "steady+cores" is efficiency over the larger of the two;
      - the GPipe bubble bound of a pipeline that *flushes* after every batch:
        (m + p - 1) * max(t_i) per batch. lapdtr does not flush, so it can pass 1; it says
        how lapdtr compares with a flushed schedule, not how close it is to its own bound;
  * throughput of ``torch.distributed.pipelining`` (``ScheduleGPipe``), same model, same cuts,
    same batch and micro-batches, in the same trial; both engines make each request's synthetic
    input inside the clock on their first rank (lapdtr's coordinator does so per request;
    GPipe's first rank does so before each ``step``). lapdtr runs with its defaults (fewer
    items in flight where ranks share cores, ``lapdtr.runtime.placement``); CPU seconds per
    image of all ranks against GPipe's, and how busy each engine kept the cores;
  * single-request latency (one image in flight) against a *bare pipeline*: the same stages on
    the same ranks joined by blocking ``dist.send``/``dist.recv`` into preallocated buffers of
    known shapes, nothing else (no headers, threads, caches, control plane), i.e. the sum of
    stage compute and transfer as it is on this machine; and, as a second reference, against
    lapdtr's own stage compute (CPU time, and wall time) plus a warm gloo ping-pong of each
    boundary; the order of lapdtr and the bare pipeline alternates per trial too; and
    ``dm(x)`` of one image from a script that called ``lapdtr.distribute`` on the same ranks and
    cuts, against ``lapdtr run``'s per-request latency (``dm_vs_run``);
  * the overhead per boundary in microseconds (a tiny message, one way: lapdtr's transport vs a
    plain gloo send/recv).

    python benchmarks/pipeline.py                   # full grid, writes runs/bench/pipeline.json
    python benchmarks/pipeline.py --ranks 2 3 --micro-batches 1 4 --requests 4 --trials 1

Every engine's ranks run with the same allocator settings: lapdtr's default ``tune_malloc``
(freed memory kept for reuse, ``lapdtr.runtime.placement``), which the GPipe and bare baselines
apply too; ``--malloc default`` runs all of them with glibc's own settings instead.

The baselines' ranks (GPipe, bare pipeline, gloo ping-pongs) are forked from a forkserver that
has imported torch and lapdtr once (``--baseline-start forkserver``, the default), since a fresh
interpreter spends ~8 CPU seconds importing them; lapdtr's ranks are spawned fresh by
``lapdtr.runtime.run`` as always. Every clock starts after the ranks' set-up and warm-up, so
only the benchmark's run time changes; ``--baseline-start spawn`` starts them fresh too.

Numbers depend on the machine and its load: on a machine with fewer cores than ranks, stages
share cores, so compare the ratios, not the absolute rates.
"""
from __future__ import annotations

import argparse
import datetime
import functools
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
from lapdtr._fmt import table
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime import request_input
from lapdtr.runtime.placement import tune_malloc


def even_cuts(num_units: int, p: int) -> list[int]:
    return [round(num_units * i / p) for i in range(1, p)]


# how the baselines' processes start (``--baseline-start``); lapdtr's own ranks are always
# started by ``lapdtr.runtime.run``, which spawns fresh interpreters
_START = {"method": "spawn"}
# what a forkserver imports once, so that the baselines' ranks need not import it each
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.pipelining", "lapdtr",
            "lapdtr.runtime", "lapdtr.runtime.pipeline"]


def use_forkserver() -> None:
    """Start the baselines' ranks from a forkserver that has imported torch and lapdtr, instead
    of fresh interpreters that import them (~8 CPU seconds each on a 2-core machine). Only the
    start-up changes: every clock starts after the ranks' set-up and warm-up."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(_PRELOAD)
    _START["method"] = "forkserver"


def _spawn(worker, nprocs: int, *args) -> dict:
    """Run ``worker(rank, port, out_file, *args)`` on ``nprocs`` local processes; returns the
    JSON its rank 0 wrote to ``out_file``."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = Path(f"/tmp/lapdtr-bench-{worker.__name__}-{os.getpid()}.json")
    mp.start_processes(worker, args=(store.port, str(out), *args), nprocs=nprocs,
                       start_method=_START["method"])
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
                sched.step(request_input(cfg.seed, r, cfg.batch_size, 224))
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
    send_s = []
    for i in range(reps + 5):
        if i == 5:
            t0 = time.perf_counter()
            send_s.clear()
        if rank == 0:
            ts = time.perf_counter()
            tr.send(1, i, 0, x)
            send_s.append(time.perf_counter() - ts)
            recv()
        else:
            recv()
            tr.send(0, i, 0, x)
        tr.release([i])  # the reply says the item is done, as the coordinator would
    res["lapdtr"] = (time.perf_counter() - t0) / reps / 2
    res["send_call"] = _median(send_s)
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
            "overhead_us": (res["lapdtr"] - res["gloo"]) * 1e6,
            "lapdtr_send_call_us": res["send_call"] * 1e6}


def _bare_worker(rank, port, out_file, p, model_name, kw, cuts, requests, threads, img, malloc):
    """The bare pipeline: stage ``rank`` between blocking gloo send/recv of known shapes."""
    _join(rank, p, port, "bare", threads, malloc)
    torch.manual_seed(0)
    stages = lapdtr.partition(lapdtr.create_model(model_name, **kw).eval(), cuts)
    cfg = RunConfig(batch_size=1)
    with torch.no_grad():
        x = request_input(cfg.seed, 0, cfg.batch_size, img)
        ins = []
        for st in stages:  # boundary shapes, known in advance as in any static pipeline
            ins.append(torch.empty_like(x))
            x = st(x)
        out = torch.empty_like(x)
        stage, lat = stages[rank], []
        for r in range(requests + 2):  # two untimed warm-up requests
            if rank == 0:
                x = request_input(cfg.seed, r, cfg.batch_size, img)
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


def _instrument_stages(out_dir: str, threads: int, rank: int) -> None:
    """``init_fn`` of lapdtr's ranks (runs first in each rank process): meters each stage
    forward of the stream in CPU time of the thread running it, and writes the totals to
    ``out_dir/rank<rank>.json`` when the rank finishes its report.

    The runtime has no CPU-time meter of its own; this wraps ``RankModel.run`` only while
    ``Worker.process`` runs (the stream's items; the untimed warm-up calls ``RankModel.run``
    outside it), which is where lapdtr's own ``compute_s`` is timed in wall-clock time."""
    import threading

    from lapdtr.runtime import worker as rp
    from lapdtr.runtime.stages import RankModel

    # one torch thread: the forward runs in the calling thread; more: in the intra-op pool
    # too, which the thread's clock misses, so the process's clock (all its threads) is used
    clock = time.thread_time_ns if threads == 1 else time.process_time_ns
    acc = {"cpu_ns": 0, "wall_ns": 0, "calls": 0,
           "clock": "thread_time" if threads == 1 else "process_time"}
    flag = threading.local()
    run0, process0, finish0 = RankModel.run, rp.Worker.process, rp.Worker.finish_report

    def run_metered(self, *a, **k):
        if not getattr(flag, "on", False):
            return run0(self, *a, **k)
        c0, w0 = clock(), time.perf_counter_ns()
        y = run0(self, *a, **k)
        acc["cpu_ns"] += clock() - c0
        acc["wall_ns"] += time.perf_counter_ns() - w0
        acc["calls"] += 1
        return y

    def process_metered(self, msg):
        flag.on = True
        try:
            return process0(self, msg)
        finally:
            flag.on = False

    def finish_metered(self, status):
        rep = finish0(self, status)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {**acc, "items": rep.items, "compute_s": rep.compute_s}))
        return rep

    RankModel.run = run_metered
    rp.Worker.process = process_metered
    rp.Worker.finish_report = finish_metered


def _dm_worker(rank, port, out_file, p, model_name, kw, cuts, requests, threads, img):
    """``dm(x)`` of batch 1 from a user's script: every rank calls ``lapdtr.distribute`` on the
    job's environment (the benchmark's store stands in for the launcher's); the driver times
    ``requests`` calls after a warm-up."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(p), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(p), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LAPDTR_STORE_HOSTED="1")
    torch.manual_seed(0)
    model = lapdtr.create_model(model_name, **kw).eval()
    with lapdtr.distribute(model, cuts=cuts, threads_per_rank=threads, plots=False) as dm:
        if dm.is_driver:
            x = request_input(0, 0, 1, img)
            for _ in range(5):
                dm(x)
            ts = []
            for _ in range(requests):
                t0 = time.perf_counter()
                dm(x)
                ts.append(time.perf_counter() - t0)
            Path(out_file).write_text(json.dumps({"latency_s": ts}))


def run_dm_latency(p, model_name, kw, cuts, requests, threads, img) -> float:
    """The median ``dm(x)`` latency of batch 1 on ``p`` ranks (seconds)."""
    return _median(_spawn(_dm_worker, p, p, model_name, kw, cuts, requests, threads,
                          img)["latency_s"])


def run_lapdtr(cfg: RunConfig, threads: int):
    """``run(cfg)`` with each rank's stage forwards metered in thread CPU time; returns the
    report and, per rank, (CPU seconds, wall seconds) per stage forward."""
    cfg.predictions = False  # the baselines write none either
    meter_dir = Path(cfg.out) / "stage_cpu"
    meter_dir.mkdir(parents=True, exist_ok=True)
    for f in meter_dir.glob("rank*.json"):
        f.unlink()
    r = run(cfg, init_fn=functools.partial(_instrument_stages, str(meter_dir), threads))
    cpu, wall, clock = [], [], None
    for k in range(cfg.world_size):
        f = meter_dir / f"rank{k}.json"
        if not f.exists():
            raise RuntimeError(f"rank {k} wrote no stage CPU times ({f}): did lapdtr.runtime's "
                               "Worker.process / finish_report or RankModel.run change?")
        d = json.loads(f.read_text())
        if d["calls"] != d["items"]:
            raise RuntimeError(f"rank {k}: {d['calls']} metered stage forwards for "
                               f"{d['items']} items")
        cpu.append(d["cpu_ns"] * 1e-9 / max(1, d["calls"]))
        wall.append(d["wall_ns"] * 1e-9 / max(1, d["calls"]))
        clock = d["clock"]
    return r, cpu, wall, clock


def stage_times(report) -> list[float]:
    """lapdtr's own per-item compute time of each rank (wall clock, seconds per micro-batch)."""
    return [k.compute_s / max(1, k.items) for k in report.ranks]


def trial_order(t: int, baseline: str) -> list[str]:
    """Which engine runs first in trial ``t``: lapdtr on even trials, the baseline on odd."""
    return ["lapdtr", baseline] if t % 2 == 0 else [baseline, "lapdtr"]


def bounds(t: list[float], n_items: int, m: int, requests: int, wall: float,
           cores: int) -> dict:
    """Efficiencies of a run of ``wall`` seconds that streamed ``n_items`` micro-batches
    (``requests`` batches of ``m``) through stages of ``t`` seconds per micro-batch.

    ``steady``: time >= sum(t) + (N - 1) max(t), a pipeline that does not flush;
    ``steady_cores``: the larger of that and N sum(t) / min(p, cores), the CPU work spread on
    the cores there are; ``flushed``: time >= requests (m + p - 1) max(t), GPipe's bubble bound
    of a pipeline that flushes after every batch; ``bottleneck``: N max(t), the bottleneck rate
    of a long stream."""
    p, tmax, tsum = len(t), max(t), sum(t)
    steady = tsum + (n_items - 1) * tmax
    on_cores = n_items * tsum / max(1, min(p, cores))
    flushed = requests * (m + p - 1) * tmax
    return {"steady_bound_s": steady, "cores_bound_s": on_cores, "flushed_bound_s": flushed,
            "efficiency_steady": steady / wall,
            "efficiency_steady_cores": max(steady, on_cores) / wall,
            "efficiency_flushed": flushed / wall,
            "efficiency_bottleneck": n_items * tmax / wall}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> dict:
    """Median and min-max of per-trial values."""
    xs = [x for x in xs if x == x]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"),
                "half_range": float("nan"), "trials": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "half_range": (max(xs) - min(xs)) / 2, "trials": xs}


def fmt_spread(s: dict, digits: int = 2) -> str:
    return (f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
            if s["trials"] else "-")


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
                    help="runs of each engine per point, order alternating; medians are "
                         "reported with their min-max")
    ap.add_argument("--latency-trials", type=int, default=None,
                    help="trials of the single-request latency section (default: --trials)")
    ap.add_argument("--latency-requests", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-gpipe", action="store_true")
    ap.add_argument("--no-latency", action="store_true",
                    help="skip the single-request latency section")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="allocator settings of every engine's ranks: lapdtr's default "
                         "(tune_malloc), or glibc's own")
    ap.add_argument("--baseline-start", choices=["forkserver", "spawn"], default="forkserver",
                    help="how the GPipe, bare-pipeline and gloo ping-pong ranks start: forked "
                         "from a server that has imported torch and lapdtr (faster; the clocks "
                         "start after set-up either way), or spawned fresh like lapdtr's ranks")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the per-boundary overhead micro-benchmark")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.baseline_start == "forkserver":
        use_forkserver()
    if args.overhead_only:
        print(json.dumps(boundary_overhead_us(), indent=2))
        return 0
    kw = {"depth": args.depth} if "deit" in args.model or "vit" in args.model else {}
    malloc = args.malloc == "tuned"
    units = lapdtr.units(lapdtr.create_model(args.model, **kw))
    n_units = len(units)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lat_trials = args.trials if args.latency_trials is None else args.latency_trials
    results = {"model": args.model, "model_kwargs": kw, "batch": args.batch,
               "requests": args.requests, "trials": args.trials, "latency_trials": lat_trials,
               "threads_per_rank": args.threads, "cpu_count": os.cpu_count(), "cores": cores,
               "malloc": args.malloc, "baseline_start": args.baseline_start,
               "torch": torch.__version__,
               "stage_compute": "seconds per micro-batch of each rank's stage forwards: "
                                "stage_cpu_s in CPU time of the thread running them "
                                "(process CPU time with threads_per_rank > 1), stage_wall_s "
                                "lapdtr's own wall-clock compute_s per item",
               "ratios": "median over trials of the per-trial ratio; 'spread' holds each "
                         "one's median, min, max, half_range and per-trial values",
               "trial_order": "lapdtr first on even trials, the baseline first on odd ones",
               "throughput": [], "latency": []}
    print(f"{args.model} {kw}: {n_units} units, batch {args.batch}, {args.requests} batches per "
          f"point, {args.trials} trial(s) each (engine order alternating), {cores} CPU cores, "
          f"malloc {args.malloc} (every engine), baselines started by {args.baseline_start}; "
          "ratios: median [min, max] over trials")
    print(f"{'p':>2} {'m':>3} {'N':>4} {'win':>3} {'lapdtr img/s':>12} {'gpipe img/s':>11} "
          f"{'vs gpipe':>20} {'cpu/img vs gpipe':>23} {'busy lapdtr':>18} "
          f"{'busy gpipe':>18}")
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        for m in args.micro_batches:
            if m > args.batch:
                continue
            n_items, n_img = args.requests * m, args.requests * args.batch
            trials = []
            for t in range(args.trials):
                order = ["lapdtr"] if args.no_gpipe else trial_order(t, "gpipe")
                tr = {"order": order}
                for engine in order:
                    if engine == "lapdtr":
                        cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p,
                                        cuts=cuts, requests=args.requests,
                                        batch_size=args.batch, micro_batches=m,
                                        out=str(out / f"p{p}_m{m}"), plots=False,
                                        threads_per_rank=args.threads, tune_malloc=malloc)
                        r, st_cpu, st_wall_m, clock = run_lapdtr(cfg, args.threads)
                        # ranks warm up before the clock starts
                        lap = {"img_s": r.completed * args.batch / r.wall_s, "wall_s": r.wall_s,
                               "completed": r.completed, "stage_cpu_s": st_cpu,
                               "stage_wall_s": stage_times(r),
                               "stage_wall_metered_s": st_wall_m, "stage_cpu_clock": clock,
                               "cpu_s": [k.cpu_s for k in r.ranks],
                               "cpus": [k.cpus for k in r.ranks],
                               "max_inflight": r.meta["max_inflight"],
                               "latency_p50_s": r.latency_p50_s}
                        lap["bounds_cpu"] = bounds(st_cpu, r.completed * m, m, r.completed,
                                                   r.wall_s, cores)
                        lap["bounds_wall"] = bounds(lap["stage_wall_s"], r.completed * m, m,
                                                    r.completed, r.wall_s, cores)
                        lap["busy"] = sum(lap["cpu_s"]) / r.wall_s / cores
                        tr["lapdtr"] = lap
                    else:
                        g = run_gpipe(p, m, args.model, kw, cuts, args.batch, args.requests,
                                      args.threads, malloc)
                        tr["gpipe_img_s"], tr["gpipe_cpu_s"] = g["img_s"], g["cpu_s"]
                        tr["gpipe_busy"] = sum(g["cpu_s"]) * g["img_s"] / n_img / cores
                if "gpipe_img_s" in tr:
                    tr["vs_gpipe"] = tr["lapdtr"]["img_s"] / tr["gpipe_img_s"]
                    # CPU seconds per image (all ranks) against GPipe's, same trial
                    tr["cpu_vs_gpipe"] = sum(tr["lapdtr"]["cpu_s"]) / sum(tr["gpipe_cpu_s"])
                trials.append(tr)
            lap = [t["lapdtr"] for t in trials]
            sp = {}
            for key in ("efficiency_steady", "efficiency_steady_cores", "efficiency_flushed",
                        "efficiency_bottleneck"):
                sp[key] = spread([x["bounds_cpu"][key] for x in lap])
                sp[key + "_wall"] = spread([x["bounds_wall"][key] for x in lap])
            sp["busy"] = spread([x["busy"] for x in lap])
            st_cpu = [_median([x["stage_cpu_s"][i] for x in lap]) for i in range(p)]
            st_wall = [_median([x["stage_wall_s"][i] for x in lap]) for i in range(p)]
            rate = _median([x["img_s"] for x in lap])
            mb = args.batch / m
            bd = bounds(st_cpu, n_items, m, args.requests, 1.0, cores)
            row = {"p": p, "m": m, "cuts": cuts, "micro_batches_streamed": n_items,
                   "max_inflight": lap[0]["max_inflight"], "lapdtr_img_s": rate,
                   "stage_cpu_s": st_cpu, "stage_wall_s": st_wall,
                   "stage_cpu_clock": lap[0]["stage_cpu_clock"],
                   # images/s the bounds allow, from the median stage CPU times
                   "steady_bound_img_s": n_img / bd["steady_bound_s"],
                   "steady_cores_bound_img_s": n_img / max(bd["steady_bound_s"],
                                                           bd["cores_bound_s"]),
                   "flushed_bound_img_s": n_img / bd["flushed_bound_s"],
                   "bottleneck_img_s": mb / max(st_cpu),
                   "flushed_bound_fraction": m / (m + p - 1),
                   "trial_order": [t["order"] for t in trials], "trials": trials}
            if any("vs_gpipe" in t for t in trials):
                sp["vs_gpipe"] = spread([t["vs_gpipe"] for t in trials])
                sp["cpu_vs_gpipe"] = spread([t["cpu_vs_gpipe"] for t in trials])
                sp["gpipe_busy"] = spread([t["gpipe_busy"] for t in trials])
                cpu_l = _median([sum(x["cpu_s"]) for x in lap])
                cpu_g = _median([sum(t["gpipe_cpu_s"]) for t in trials])
                row.update(gpipe_img_s=_median([t["gpipe_img_s"] for t in trials]),
                           vs_gpipe_min=sp["vs_gpipe"]["min"], vs_gpipe_max=sp["vs_gpipe"]["max"],
                           cpu_per_img_ms=cpu_l / n_img * 1e3,
                           gpipe_cpu_per_img_ms=cpu_g / n_img * 1e3)
            for key, s in sp.items():
                row[key] = s["median"]
            row["spread"] = sp
            results["throughput"].append(row)
            nan = {"trials": []}
            print(f"{p:>2} {m:>3} {n_items:>4} {row['max_inflight']:>3} {rate:>12.1f} "
                  f"{row.get('gpipe_img_s', float('nan')):>11.1f} "
                  f"{fmt_spread(sp.get('vs_gpipe', nan)):>20} "
                  f"{fmt_spread(sp.get('cpu_vs_gpipe', nan), 3):>23} "
                  f"{fmt_spread(sp['busy']):>18} {fmt_spread(sp.get('gpipe_busy', nan)):>18}",
                  flush=True)
    if results["throughput"]:
        clock = results["throughput"][0]["stage_cpu_clock"]
        print(f"\nlapdtr against its bounds; stage compute t_i per micro-batch in {clock} CPU "
              "time (wall-clock t_i and the efficiencies from it are in the JSON, *_wall); "
              "N micro-batches streamed; efficiency = bound time / measured time, "
              "median [min, max] over trials")
        rows = []
        for row in results["throughput"]:
            sp = row["spread"]
            rows.append([row["p"], row["m"], row["micro_batches_streamed"],
                         f"{max(row['stage_cpu_s']) * 1e3:.2f}",
                         f"{max(row['stage_wall_s']) * 1e3:.2f}",
                         f"{row['steady_bound_img_s']:.1f}", fmt_spread(sp["efficiency_steady"]),
                         fmt_spread(sp["efficiency_steady_cores"]),
                         f"{row['flushed_bound_img_s']:.1f}",
                         fmt_spread(sp["efficiency_flushed"])])
        print(table(["p", "m", "N", "max t cpu ms", "max t wall ms", "steady bound img/s",
                     "eff/steady (no flush)", "eff/steady+cores", "flushed bound img/s",
                     "eff/flushed bubble"], rows, align="r" * 10))
        print("steady: sum t_i + (N-1) max t_i, the bound of a pipeline that does not flush "
              "(lapdtr), <= 1 up to noise; +cores: or N sum t_i / cores where ranks outnumber "
              f"the {cores} cores; flushed: (m+p-1) max t_i per batch, GPipe's bubble bound of a "
              "pipeline that flushes after every batch (lapdtr does not, so it may pass 1)")

    if not args.no_latency:
        latency_section(args, results, units, n_units, lat_trials, malloc)
    ov = boundary_overhead_us()
    results["boundary_overhead"] = ov
    print(f"\nper-boundary overhead (tiny tensor, one way): gloo send/recv "
          f"{ov['gloo_one_way_us']:.0f} us, lapdtr transport {ov['lapdtr_one_way_us']:.0f} us, "
          f"overhead {ov['overhead_us']:.0f} us")
    path = out / "pipeline.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {path}")
    return 0


def latency_section(args, results, units, n_units, n_trials, malloc) -> None:
    """Single-request latency: one micro-batch of one image in flight at a time."""
    kw, out, img = results["model_kwargs"], Path(args.out), 224
    print(f"\nsingle-request latency, median [min, max] over {n_trials} trial(s), lapdtr and the "
          "bare pipeline alternating first; compute: lapdtr's stage forwards in CPU time "
          "(wall in brackets)")
    print(f"{'p':>2} {'lapdtr ms':>9} {'bare ms':>8} {'vs bare':>21} "
          f"{'compute ms cpu (wall)':>21} {'transfer ms':>11} {'vs cpu compute+transfer':>23} "
          f"{'vs wall compute+transfer':>24} {'over bare/boundary us':>24} "
          f"{'dm(x) ms':>8} {'dm(x) vs run':>20}")
    for p in args.ranks:
        cuts = even_cuts(n_units, p)
        tr = []
        for t in range(n_trials):
            x = {"order": trial_order(t, "bare")}
            for engine in x["order"]:
                if engine == "lapdtr":
                    cfg = RunConfig(model=args.model, model_kwargs=kw, world_size=p, cuts=cuts,
                                    requests=args.latency_requests, batch_size=1,
                                    micro_batches=1, max_inflight=1, out=str(out / f"lat_p{p}"),
                                    plots=False, threads_per_rank=args.threads,
                                    tune_malloc=malloc)
                    r, st_cpu, _, _ = run_lapdtr(cfg, args.threads)
                    x.update(lapdtr_p50_s=r.latency_p50_s, compute_cpu_s=sum(st_cpu),
                             compute_wall_s=sum(stage_times(r)))
                else:
                    x["bare_p50_s"] = _median(run_bare(p, args.model, kw, cuts,
                                                       args.latency_requests, args.threads,
                                                       img, malloc))
            x["dm_p50_s"] = run_dm_latency(p, args.model, kw, cuts, args.latency_requests,
                                           args.threads, img)
            tr.append(x)
        sizes = [4 * 3 * img * img] + [int(torch.tensor(units[c - 1].out_shape).prod()) * 4
                                        for c in cuts] + [int(torch.tensor(units[-1].out_shape).prod()) * 4]
        tt = transfer_times(sizes)
        # boundaries: input to stage 0 (from rank 0 to itself: no transfer), the p-1 cuts, and
        # the logits back to rank 0
        transfer = sum(tt[s] for s in sizes[1:])
        boundaries = p  # p - 1 cuts + the way back to the coordinator
        sp = {"vs_bare": spread([x["lapdtr_p50_s"] / x["bare_p50_s"] for x in tr]),
              "ratio_cpu": spread([x["lapdtr_p50_s"] / (x["compute_cpu_s"] + transfer)
                                   for x in tr]),
              "ratio_wall": spread([x["lapdtr_p50_s"] / (x["compute_wall_s"] + transfer)
                                    for x in tr]),
              "overhead_vs_bare_per_boundary_us": spread(
                  [(x["lapdtr_p50_s"] - x["bare_p50_s"]) / boundaries * 1e6 for x in tr]),
              "dm_vs_run": spread([x["dm_p50_s"] / x["lapdtr_p50_s"] for x in tr])}
        lat, bare = _median([x["lapdtr_p50_s"] for x in tr]), _median([x["bare_p50_s"] for x in tr])
        c_cpu, c_wall = _median([x["compute_cpu_s"] for x in tr]), _median([x["compute_wall_s"] for x in tr])
        row = {"p": p, "latency_s": lat, "bare_latency_s": bare, "compute_cpu_s": c_cpu, "compute_wall_s": c_wall, "transfer_s": transfer,
               "boundary_bytes": sizes, "trial_order": [x["order"] for x in tr], "trials": tr,
               "spread": sp}
        for key, s in sp.items():
            row[key] = s["median"]
        results["latency"].append(row)
        print(f"{p:>2} {lat * 1e3:>9.2f} {bare * 1e3:>8.2f} {fmt_spread(sp['vs_bare'], 3):>21} "
              f"{c_cpu * 1e3:>12.2f} ({c_wall * 1e3:>6.2f}) {transfer * 1e3:>11.3f} "
              f"{fmt_spread(sp['ratio_cpu'], 3):>23} {fmt_spread(sp['ratio_wall'], 3):>24} "
              f"{fmt_spread(sp['overhead_vs_bare_per_boundary_us'], 0):>24} "
              f"{_median([x['dm_p50_s'] for x in tr]) * 1e3:>8.2f} "
              f"{fmt_spread(sp['dm_vs_run'], 3):>20}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""A torchrun-like launcher whose group survives the death of any rank.

``launch(cmd, nproc=N)`` runs a command per rank, ``launch_fn(fn, args, nproc=N)`` a picklable
module-level function per rank (multiprocessing spawn); both are thin wrappers of ``Launcher``,
which holds the process table, hosts the store and applies the wait policy.

Each rank gets torchrun's environment: ``RANK``, ``WORLD_SIZE`` (nnodes * nproc),
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and ``NODE_RANK`` (the node rank),
``GROUP_WORLD_SIZE`` (nnodes), ``MASTER_ADDR``, ``MASTER_PORT``,
``TORCHELASTIC_USE_AGENT_STORE=True`` (so ``init_process_group(init_method="env://")`` connects
to the hosted store instead of binding its port on rank 0), plus ``LAPDTR_LAUNCHER=1``,
``LAPDTR_STORE_HOSTED=1`` and ``LAPDTR_DRIVER`` (the driver's global rank). Node 0's launcher
hosts a ``TCPStore`` on ``MASTER_PORT``: it outlives every rank, so ranks connect to it with
``is_master=False``.

A rank that exits non-zero or by a signal is logged on stderr and the others keep running. The
driver (global rank 0 unless ``driver``/``LAPDTR_DRIVER`` names another) ends the run: once it has
exited, the other ranks get ``grace_s`` to exit, then SIGTERM, then SIGKILL ``kill_after_s`` later.
Exit codes are in ``Launcher`` (one policy for both wrappers). Ranks run in their own sessions,
so a terminal's Ctrl-C reaches only the launcher, which forwards it.
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["Launcher", "launch", "launch_fn", "parse_master", "resolve_command"]

DRIVER_KEY = "lapdtr/launcher/driver_exit"  # the driver's exit status, for the other nodes
DONE_KEY = "lapdtr/launcher/done/{node}"    # a node's launcher no longer needs the store
POLL_S = 0.02


def _log(msg: str) -> None:
    print(f"lapdtr launch: {msg}", file=sys.stderr, flush=True)


def _status(code: int) -> int:
    """A process's exit status as a shell reports it: the code, or 128 + N for signal N."""
    return code if code >= 0 else 128 - code


def _describe(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-code} ({name})"


def parse_master(master: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> ``(host, port)``."""
    err = ValueError(f"master must be HOST:PORT with PORT in 0..65535 "
                     f"(e.g. 10.0.0.1:29500, [::1]:29500), got {master!r}")
    if not isinstance(master, str) or ":" not in master:
        raise err
    host, _, port = master.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise err
    return host, int(port)


def resolve_command(cmd: list[str]) -> list[str]:
    """The argv each rank runs: ``script.py ARGS`` and ``-m module ARGS`` run with this
    interpreter, anything else is executed as given (it must be a file or on ``PATH``)."""
    if isinstance(cmd, (str, bytes)) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise ValueError(f"cmd must be a non-empty list of strings "
                         f"(e.g. ['train.py', '--lr', '0.1']), got {cmd!r}")
    cmd = list(cmd)
    if cmd[0] == "-m":
        if len(cmd) < 2 or not cmd[1] or cmd[1].startswith("-"):
            raise ValueError(f"'-m' must be followed by a module name, got {cmd!r}")
        return [sys.executable, *cmd]
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    elif shutil.which(cmd[0]) is None:
        raise ValueError(f"command {cmd[0]!r} not found: not an executable file, not on PATH")
    if (os.path.basename(cmd[0]).startswith("python") and len(cmd) > 1
            and cmd[1].endswith(".py") and not os.path.isfile(cmd[1])):
        raise ValueError(f"script {cmd[1]} does not exist (cwd {os.getcwd()})")
    return cmd


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be an integer {allowed}, got {v!r}")
    return v


class _Rank:
    """One local rank: a ``subprocess.Popen`` or a ``multiprocessing`` process."""

    def __init__(self, rank: int, local_rank: int, proc, log_file=None):
        self.rank, self.local_rank, self.proc, self.log_file = rank, local_rank, proc, log_file
        self.code: int | None = None  # negative: killed by that signal
        self.stopped_by: int | None = None  # the signal the launcher sent it
        self.exited_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        if self.code is None:
            self.code = (self.proc.poll() if isinstance(self.proc, subprocess.Popen)
                         else self.proc.exitcode)
        return self.code

    def signal(self, sig: int) -> None:
        """Signal the rank's process group (its own session), else the rank alone."""
        if self.poll() is not None:
            return
        self.stopped_by = sig
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:  # not a group leader yet (a spawned rank calls setsid first thing)
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def join(self) -> None:
        if isinstance(self.proc, subprocess.Popen):
            self.proc.wait()
        else:
            self.proc.join()
        if self.log_file is not None:
            self.log_file.close()


class _Beacon(threading.Thread):
    """Multi-node only: the launchers' own traffic on the store. The driver's node publishes the
    driver's status and the others learn it; nodes 1.. beat while they run and say when they are
    done, so node 0 keeps its store up until every other node is done or silent for
    ``SILENT_S``."""

    SILENT_S = 30.0

    def __init__(self, host: str, port: int, node_rank: int, nnodes: int, store=None):
        super().__init__(daemon=True, name="lapdtr-launcher-beacon")
        self.host, self.port, self.node_rank, self.nnodes = host, port, node_rank, nnodes
        self.store = store
        self.publish: int | None = None  # set by the launcher: the local driver's status
        self.driver_status: int | None = None
        self.nodes_done = False
        self.lost = False
        self._quit = threading.Event()
        self._quit_at: float | None = None

    def run(self) -> None:
        import torch.distributed as dist

        try:
            while self.store is None:
                try:
                    self.store = dist.TCPStore(self.host, self.port, is_master=False,
                                               timeout=datetime.timedelta(seconds=2))
                except Exception:  # node 0's launcher is not up yet, or is gone
                    if self._quit.wait(0.2) and (self.publish is None
                                                 or time.monotonic() - self._quit_at > 3.0):
                        return
            self._loop()
        except Exception:  # the store went away: fall back on the local policy
            self.lost = True

    def _loop(self) -> None:
        published = False
        beat = f"lapdtr/launcher/beat/{self.node_rank}"
        others = range(1, self.nnodes) if self.node_rank == 0 else ()
        seen = {n: (0, time.monotonic()) for n in others}  # node -> (beats, when they changed)
        while True:
            if self.publish is not None and not published:
                self.store.set(DRIVER_KEY, str(self.publish))
                published = True
            if self.driver_status is None and self.store.check([DRIVER_KEY]):
                self.driver_status = int(self.store.get(DRIVER_KEY))
            if self.node_rank != 0:
                if self._quit.is_set():
                    self.store.set(DONE_KEY.format(node=self.node_rank), "1")
                    return
                self.store.add(beat, 1)
            elif not self.nodes_done:
                now, done = time.monotonic(), True
                for n in others:
                    if self.store.check([DONE_KEY.format(node=n)]):
                        continue
                    beats = self.store.add(f"lapdtr/launcher/beat/{n}", 0)
                    if beats != seen[n][0]:
                        seen[n] = (beats, now)
                    done = done and now - seen[n][1] > self.SILENT_S
                self.nodes_done = done
            if self.node_rank == 0 and self._quit.is_set():
                return
            self._quit.wait(0.1)

    def finish(self) -> None:
        self._quit_at = time.monotonic()
        self._quit.set()
        self.join(5.0)


class Launcher:
    """The process table, the hosted store and the wait policy shared by ``launch`` and
    ``launch_fn``. Use it directly to watch the store while ranks run::

        with Launcher(nproc=3, grace_s=5) as la:
            la.start_fn(entry, (cfg,))
            while (code := la.poll()) is None:
                ...  # la.store is the hosted TCPStore (node 0)
                time.sleep(0.05)

    Exit status (``poll``/``wait``), N the signal number where a process was killed by one:

    * on the driver's node: the driver's status (its exit code, or 128 + N), returned once the
      other local ranks have exited too (or were stopped after ``grace_s``). Other ranks dying
      are logged and never change it: surviving them is the point.
    * on another node: the driver's status if this launcher learned it through the store
      before its own ranks were all gone (it then gives them the same grace); otherwise 0 if
      every local rank exited 0, else the status of the first local rank that failed (a lost
      rank is never hidden, and the first failure is usually the cause). Node 0, whose store
      the job needs, waits after its own ranks for the driver's status, or until every other
      node is done or silent for 30 s, so it normally reports the driver's status.
    * when the launcher gets SIGINT/SIGTERM (``wait`` installs the handlers in the main thread,
      ``request_stop`` is the same by hand): the signal goes to every live rank, SIGKILL follows
      after ``kill_after_s`` (or at once on a second signal), and the status is 128 + N
      (130 for SIGINT, 143 for SIGTERM). Other nodes are not told.

    Once the driver's status is known, node 0 keeps its store up until every other node's
    launcher is done (or silent for 30 s), at most ``grace_s + kill_after_s + 2`` seconds.
    """

    def __init__(self, *, nproc: int, nnodes: int = 1, node_rank: int = 0,
                 master: str | None = None, driver: int | None = None, env: dict | None = None,
                 grace_s: float = 10.0, kill_after_s: float = 5.0,
                 log_dir: str | os.PathLike | None = None):
        self.nproc = _check_int("nproc", nproc, 1)
        self.nnodes = _check_int("nnodes", nnodes, 1)
        self.node_rank = _check_int("node_rank", node_rank, 0, nnodes - 1)
        self.world_size = nnodes * nproc
        if master is None:
            if nnodes > 1:
                raise ValueError(f"nnodes={nnodes} needs master HOST:PORT, the address every node "
                                 "reaches node 0's launcher at (e.g. 10.0.0.1:29500)")
            master = "127.0.0.1:0"
        self.host, self.port = parse_master(master)
        if self.port == 0 and nnodes > 1:
            raise ValueError(f"master port 0 (pick a free one) works only with nnodes=1: the "
                             f"other nodes must know the port; got master {master!r}")
        if driver is None and os.environ.get("LAPDTR_DRIVER", "") != "":
            try:
                driver = int(os.environ["LAPDTR_DRIVER"])
            except ValueError:
                raise ValueError(f"LAPDTR_DRIVER must be a global rank in 0..{self.world_size - 1},"
                                 f" got {os.environ['LAPDTR_DRIVER']!r}") from None
        self.driver = _check_int("driver", 0 if driver is None else driver, 0, self.world_size - 1)
        for name, v in (("grace_s", grace_s), ("kill_after_s", kill_after_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {v!r}")
        self.grace_s, self.kill_after_s = float(grace_s), float(kill_after_s)
        env = dict(env or {})
        bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"env must map str to str; bad entries for {bad!r}")
        self.env = env
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.store = None
        self.ranks: list[_Rank] = []
        self._beacon: _Beacon | None = None
        self._status: int | None = None   # the final status once decided
        self._ends_at: float | None = None  # when the remaining local ranks get SIGTERM
        self._kill_at: float | None = None  # ... and SIGKILL
        self._store_until: float | None = None
        self._signals: list[int] = []
        self._forwarded = False
        self._done = False

    # -- starting ------------------------------------------------------------------------------
    @property
    def master(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def driver_is_local(self) -> bool:
        return self.driver // self.nproc == self.node_rank

    def start_command(self, cmd: list[str]) -> None:
        """Start one process per local rank running ``cmd`` (see ``resolve_command``)."""
        argv = resolve_command(cmd)

        def spawn(env, log_file):
            return subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                                    start_new_session=True)
        self._start(spawn, " ".join(argv))

    def start_fn(self, fn, args: tuple = ()) -> None:
        """Start one spawned process per local rank calling ``fn(*args)`` with the rank's
        environment set (read ``RANK`` from ``os.environ``)."""
        import torch.multiprocessing as mp

        try:
            pickle.dumps(fn)
        except Exception as e:
            raise ValueError(f"fn must be a picklable module-level function, got {fn!r} ({e})") \
                from None
        ctx = mp.get_context("spawn")

        def spawn(env, log_file):
            p = ctx.Process(target=_fn_entry, args=(fn, tuple(args), env,
                                                    log_file.name if log_file else None),
                            name=f"lapdtr-rank{env['RANK']}")
            p.start()
            return p
        self._start(spawn, getattr(fn, "__qualname__", repr(fn)))

    def _start(self, spawn, what: str) -> None:
        assert not self.ranks, "a Launcher starts its ranks once"
        if self.node_rank == 0:
            self._host_store()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        base = {**self.env, "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.nproc), "GROUP_RANK": str(self.node_rank),
                "NODE_RANK": str(self.node_rank), "GROUP_WORLD_SIZE": str(self.nnodes),
                "MASTER_ADDR": self.host, "MASTER_PORT": str(self.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True", "LAPDTR_LAUNCHER": "1",
                "LAPDTR_STORE_HOSTED": "1", "LAPDTR_DRIVER": str(self.driver)}
        try:
            for local in range(self.nproc):
                rank = self.node_rank * self.nproc + local
                log_file = (open(self.log_dir / f"rank{rank}.log", "w")  # noqa: SIM115
                            if self.log_dir is not None else None)
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(local)}
                self.ranks.append(_Rank(rank, local, spawn(env, log_file), log_file))
        except BaseException:
            self.close()
            raise
        if self.nnodes > 1:
            self._beacon = _Beacon(self.host, self.port, self.node_rank, self.nnodes, self.store)
            self._beacon.start()
        hosted = "hosting the store" if self.store is not None else "store"
        _log(f"{hosted} on {self.master}; ranks {self.ranks[0].rank}..{self.ranks[-1].rank} of "
             f"{self.world_size} (node {self.node_rank} of {self.nnodes}), driver rank "
             f"{self.driver}: {what}")
        self._record()

    def _host_store(self) -> None:
        import torch.distributed as dist

        try:
            self.store = dist.TCPStore(self.host, self.port, is_master=True,
                                       wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=60))
        except Exception as e:
            raise ValueError(f"cannot host the store on {self.master} ({e}); is the port in "
                             "use? pick a free one, or port 0 on a single node") from None
        self.port = self.store.port

    # -- waiting -------------------------------------------------------------------------------
    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        """What SIGINT/SIGTERM to the launcher does: forward ``sig`` to the ranks, SIGKILL
        ``kill_after_s`` later (at once if called again); the status becomes 128 + ``sig``."""
        self._signals.append(int(sig))

    def poll(self) -> int | None:
        """One step of the wait policy: reap and log exits, stop stragglers; the exit status once
        the run is over, else None."""
        assert self.ranks, "start the ranks first"
        if self._done:
            return self._status
        now = time.monotonic()
        for r in self.ranks:
            if r.code is None and r.poll() is not None:
                self._report_exit(r)
        live = [r for r in self.ranks if r.code is None]
        if self._signals:
            self._on_signal(live, now)
        elif self._status is None:
            self._decide(live, now)
        if self._status is None:
            return None
        if live:
            if self._ends_at is not None and now >= self._ends_at and self._kill_at is None:
                for r in live:
                    _log(f"rank {r.rank} (pid {r.pid}) still running {self.grace_s:g} s after the "
                         "driver exited: SIGTERM")
                    r.signal(signal.SIGTERM)
                self._kill_at = now + self.kill_after_s
            elif self._kill_at is not None and now >= self._kill_at:
                for r in live:
                    if r.stopped_by != signal.SIGKILL:
                        _log(f"rank {r.rank} (pid {r.pid}) still running: SIGKILL")
                        r.signal(signal.SIGKILL)
            return None
        if (self._beacon is not None and self.node_rank == 0 and not self._signals
                and not self._beacon.nodes_done and not self._beacon.lost
                and now < self._store_until):
            return None  # the other nodes may still need the store
        self._finish()
        return self._status

    def _decide(self, live: list[_Rank], now: float) -> None:
        b = self._beacon
        if self.driver_is_local:
            d = self.ranks[self.driver - self.node_rank * self.nproc]
            if d.code is None:
                return
            self._status = _status(d.code)
            if b is not None:
                b.publish = self._status
            if live:
                _log(f"driver rank {self.driver} {_describe(d.code)}; {len(live)} other rank(s) "
                     f"get {self.grace_s:g} s to exit")
        elif b is not None and b.driver_status is not None:
            self._status = b.driver_status
            if live:
                _log(f"driver rank {self.driver} (node {self.driver // self.nproc}) exited with "
                     f"status {self._status}; {len(live)} local rank(s) get {self.grace_s:g} s "
                     "to exit")
        elif not live:
            if b is not None and self.node_rank == 0 and not (b.nodes_done or b.lost):
                return  # the driver runs elsewhere: keep the store up for it
            failed = sorted((r for r in self.ranks if r.code != 0), key=lambda r: r.exited_at)
            self._status = _status(failed[0].code) if failed else 0
            self._store_until = now
            return
        else:
            return
        self._ends_at = now + self.grace_s
        self._store_until = now + self.grace_s + self.kill_after_s + 2.0

    def _on_signal(self, live: list[_Rank], now: float) -> None:
        sig = self._signals[0]
        if not self._forwarded:
            self._forwarded = True
            self._status = 128 + sig
            if live:
                _log(f"got {signal.Signals(sig).name}: forwarding it to {len(live)} rank(s)")
            for r in live:
                r.signal(sig)
            self._kill_at = now + self.kill_after_s
        if len(self._signals) > 1:  # a second signal: no more waiting
            self._kill_at = now

    def _report_exit(self, r: _Rank) -> None:
        r.exited_at = time.monotonic()
        if r.code == 0:
            return
        left = sum(1 for q in self.ranks if q.code is None)
        by = (f" (stopped by the launcher's {signal.Signals(r.stopped_by).name})"
              if r.stopped_by is not None else "")
        _log(f"rank {r.rank} (pid {r.pid}) {_describe(r.code)}{by}; "
             f"{left} of {self.nproc} local rank(s) still running")

    def wait(self, *, timeout_s: float | None = None) -> int:
        """``poll`` until the run is over; the exit status. SIGINT/SIGTERM to this process
        call ``request_stop`` while it waits (main thread only). ``TimeoutError`` after
        ``timeout_s`` (the ranks are left running: ``close`` stops them)."""
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, lambda s, _f: self.request_stop(s))
        t0 = time.monotonic()
        try:
            while (code := self.poll()) is None:
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"the ranks did not finish within {timeout_s} s")
                time.sleep(POLL_S)
            return code
        finally:
            for sig, h in old.items():
                signal.signal(sig, signal.SIG_DFL if h is None else h)

    # -- ending --------------------------------------------------------------------------------
    def _finish(self) -> None:
        self._done = True
        for r in self.ranks:
            r.join()
        if self._beacon is not None:
            self._beacon.finish()
            self._beacon = None
        self._record()
        self.store = None

    def close(self) -> None:
        """Stop whatever still runs (SIGTERM, SIGKILL after ``kill_after_s``) and release the
        store; safe to call twice."""
        if self._done:
            return
        live = [r for r in self.ranks if r.poll() is None]
        for r in live:
            r.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_after_s
        while any(r.poll() is None for r in live) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for r in live:
            r.signal(signal.SIGKILL)
        for r in self.ranks:
            if r.code is None:
                r.exited_at = time.monotonic()
        self._finish()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self) -> None:
        """``log_dir/launcher.json``: the store address, the ranks' pids and, at the end, their
        exits (negative: the signal) and the launcher's status."""
        if self.log_dir is None or not self.ranks:
            return
        data = {"master": self.master, "hosted_store": self.node_rank == 0,
                "nnodes": self.nnodes, "node_rank": self.node_rank, "nproc": self.nproc,
                "world_size": self.world_size, "driver": self.driver,
                "ranks": [{"rank": r.rank, "local_rank": r.local_rank, "pid": r.pid,
                           "exit": r.code} for r in self.ranks],
                "status": self._status if self._done else None}
        tmp = self.log_dir / "launcher.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.log_dir / "launcher.json")


def _fn_entry(fn, args: tuple, env: dict, log_path: str | None) -> None:
    os.setsid()  # its own session, as a launched command has: signals reach it only by the launcher
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    os.environ.update(env)
    fn(*args)


def launch(cmd: list[str], *, nproc: int, nnodes: int = 1, node_rank: int = 0,
           master: str | None = None, driver: int | None = None, env: dict | None = None,
           grace_s: float = 10.0, kill_after_s: float = 5.0, log_dir=None) -> int:
    """Run ``cmd`` on ``nproc`` local ranks of an ``nnodes * nproc`` world and return the exit
    status (policy in ``Launcher``). ``cmd``: ``["script.py", *args]`` or ``["-m", "module",
    *args]`` run with this interpreter, or any executable's argv. ``master``: ``HOST:PORT`` of
    node 0's launcher (default ``127.0.0.1:0``, a free port, on one node). ``driver``: the
    global rank whose exit ends the run (default ``$LAPDTR_DRIVER``, else 0). ``log_dir``: each
    rank's stdout and stderr go to ``log_dir/rank{N}.log`` (default: inherited), and
    ``launcher.json`` records the store address, pids and exits. ``ValueError`` for bad input."""
    la = Launcher(nproc=nproc, nnodes=nnodes, node_rank=node_rank, master=master, driver=driver,
                  env=env, grace_s=grace_s, kill_after_s=kill_after_s, log_dir=log_dir)
    with la:
        la.start_command(cmd)
        return la.wait()


def launch_fn(fn, args: tuple = (), *, nproc: int, nnodes: int = 1, node_rank: int = 0,
              master: str | None = None, driver: int | None = None, env: dict | None = None,
              grace_s: float = 10.0, kill_after_s: float = 5.0, log_dir=None) -> int:
    """``launch`` for a picklable module-level ``fn``: each rank, a spawned process in its own
    session, calls ``fn(*args)`` with its environment set (``RANK`` etc. in ``os.environ``);
    its exit code is 0, 1 if ``fn`` raised, or ``n`` for ``SystemExit(n)``."""
    la = Launcher(nproc=nproc, nnodes=nnodes, node_rank=node_rank, master=master, driver=driver,
                  env=env, grace_s=grace_s, kill_after_s=kill_after_s, log_dir=log_dir)
    with la:
        la.start_fn(fn, args)
        return la.wait()

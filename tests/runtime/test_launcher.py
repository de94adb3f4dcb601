"""The surviving launcher: ranks outlive each other, the store outlives every rank, the exit status
is the driver's, stragglers are stopped after the grace, signals are forwarded."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lapdtr.runtime.launcher import Launcher, launch, launch_fn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def _script(tmp_path: Path, body: str, name: str = "s.py") -> Path:
    path = tmp_path / name
    path.write_text("import json, os, signal, sys, time\n"
                    "RANK = int(os.environ['RANK'])\n"
                    f"OUT = {str(tmp_path)!r}\n" + textwrap.dedent(body))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_environment_logs_and_record(tmp_path):
    script = _script(tmp_path, """
        keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "LAPDTR_LAUNCHER", "LAPDTR_STORE_HOSTED",
                "LAPDTR_DRIVER", "TORCHELASTIC_USE_AGENT_STORE", "EXTRA"]
        json.dump({k: os.environ.get(k) for k in keys}, open(f"{OUT}/env{RANK}.json", "w"))
        print(f"hello from {RANK}", sys.argv[1:])
    """)
    code = launch([str(script), "a", "--b"], nproc=3, env={"EXTRA": "x"}, log_dir=tmp_path / "logs")
    assert code == 0
    rec = json.loads((tmp_path / "logs" / "launcher.json").read_text())
    port = rec["master"].rsplit(":", 1)[1]
    assert int(port) > 0 and rec["status"] == 0 and [r["exit"] for r in rec["ranks"]] == [0] * 3
    for r in range(3):
        env = json.loads((tmp_path / f"env{r}.json").read_text())
        assert env == {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r),
                       "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0", "NODE_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LAPDTR_LAUNCHER": "1",
                       "LAPDTR_STORE_HOSTED": "1", "LAPDTR_DRIVER": "0",
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "EXTRA": "x"}
        assert (tmp_path / "logs" / f"rank{r}.log").read_text() == \
            f"hello from {r} ['a', '--b']\n"


@pytest.mark.parametrize("driver_code", [0, 3])
def test_a_killed_rank_does_not_stop_the_others(tmp_path, capfd, driver_code):
    script = _script(tmp_path, f"""
        if RANK == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)  # rank 1 is dead by now: the others go on
        open(f"{{OUT}}/done{{RANK}}", "w").write(str(os.getpid()))
        sys.exit({driver_code} if RANK == 0 else 0)
    """)
    assert launch([str(script)], nproc=3) == driver_code
    assert (tmp_path / "done0").exists() and (tmp_path / "done2").exists()
    assert not (tmp_path / "done1").exists()
    err = capfd.readouterr().err
    assert "rank 1 (pid " in err and "killed by signal 9 (SIGKILL)" in err
    if driver_code:
        assert f"rank 0 (pid {(tmp_path / 'done0').read_text()}) exited with code 3" in err


def test_hosted_store_outlives_rank_zero(tmp_path):
    """Rank 0 (which would host the store under plain torchrun) dies; ranks 1 and 2 then
    exchange a key through the launcher's store, and driver rank 2's status is the result."""
    script = _script(tmp_path, """
        import datetime
        from torch.distributed import TCPStore
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=datetime.timedelta(seconds=10))
        if RANK == 0:
            store.set("pid0", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        pid0 = int(store.get("pid0"))
        while True:  # wait until rank 0 is gone
            try:
                os.kill(pid0, 0)
                time.sleep(0.05)
            except ProcessLookupError:
                break
        if RANK == 1:
            store.set("after", "rank 1 says hi")
        else:
            open(f"{OUT}/got", "w").write(store.get("after").decode())
            sys.exit(7)
    """)
    assert launch([str(script)], nproc=3, driver=2) == 7
    assert (tmp_path / "got").read_text() == "rank 1 says hi"


def test_stragglers_get_grace_then_sigterm_then_sigkill(tmp_path, capfd):
    script = _script(tmp_path, """
        if RANK == 2:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(f"{OUT}/up{RANK}", "w").close()
        if RANK == 0:
            while not all(os.path.exists(f"{OUT}/up{r}") for r in (1, 2)):
                time.sleep(0.02)
            sys.exit(0)
        time.sleep(60)
    """)
    t0 = time.monotonic()
    code = launch([str(script)], nproc=3, grace_s=0.5, kill_after_s=0.5, log_dir=tmp_path / "l")
    assert code == 0 and time.monotonic() - t0 < 20
    rec = json.loads((tmp_path / "l" / "launcher.json").read_text())
    assert [r["exit"] for r in rec["ranks"]] == [0, -signal.SIGTERM, -signal.SIGKILL]
    err = capfd.readouterr().err
    assert "still running 0.5 s after the driver exited: SIGTERM" in err
    assert "rank 2 (pid" in err and "still running: SIGKILL" in err


def _fn_rank(out: str, fail_rank: int, exit_code: int) -> None:
    rank = int(os.environ["RANK"])
    if rank == fail_rank:
        raise RuntimeError("injected")
    time.sleep(0.5)
    Path(out, f"fn{rank}").write_text(os.environ["WORLD_SIZE"])
    if rank == 0:
        sys.exit(exit_code)


def test_launch_fn_survives_a_raising_rank(tmp_path, capfd):
    code = launch_fn(_fn_rank, (str(tmp_path), 1, 4), nproc=2, log_dir=tmp_path / "l")
    assert code == 4
    assert (tmp_path / "fn0").read_text() == "2"
    assert not (tmp_path / "fn1").exists()
    assert "RuntimeError: injected" in (tmp_path / "l" / "rank1.log").read_text()
    assert "rank 1 (pid" in capfd.readouterr().err
    with pytest.raises(ValueError, match="picklable"):
        launch_fn(lambda: None, nproc=1)


def test_request_stop_forwards_and_reports_130(tmp_path):
    script = _script(tmp_path, """
        open(f"{OUT}/up{RANK}", "w").close()
        time.sleep(60)
    """)
    with Launcher(nproc=2, kill_after_s=5) as la:
        la.start_command([str(script)])
        while not all((tmp_path / f"up{r}").exists() for r in range(2)):
            assert la.poll() is None
            time.sleep(0.02)
        la.request_stop(signal.SIGINT)
        assert la.wait(timeout_s=10) == 130
        assert [r.code for r in la.ranks] == [-signal.SIGINT] * 2


def test_two_nodes_share_the_driver_status(tmp_path):
    """Node 1 holds driver rank 1, which exits 3; node 0's rank 0 would run on, but its launcher
    learns the status through the store, stops it after the grace and returns 3 as well."""
    script = _script(tmp_path, """
        if RANK == 1:
            sys.exit(3)
        time.sleep(10)  # ends on its own (status 0) where the driver's status never arrives
    """)
    master = f"127.0.0.1:{_free_port()}"
    codes = {}

    def node(r):
        codes[r] = launch([str(script)], nproc=1, nnodes=2, node_rank=r, master=master,
                          driver=1, grace_s=0.2, kill_after_s=1.0)
    threads = [threading.Thread(target=node, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == {0: 3, 1: 3}


def test_node_zero_keeps_the_store_up_for_a_remote_driver(tmp_path):
    """Node 0's only rank dies at once; driver rank 1 on node 1 still finds the store's port
    open a second later, and both launchers report its status, not rank 0's SIGKILL."""
    script = _script(tmp_path, """
        import socket
        if RANK == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])),
                                 timeout=5).close()
    """)
    master = f"127.0.0.1:{_free_port()}"
    codes = {}

    def node(r):
        codes[r] = launch([str(script)], nproc=1, nnodes=2, node_rank=r, master=master,
                          driver=1, grace_s=0.2, kill_after_s=1.0)
    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == {0: 0, 1: 0}


@pytest.mark.parametrize("kw, match", [
    ({"nproc": 0}, "nproc must be an integer >= 1, got 0"),
    ({"nproc": 2, "nnodes": 2, "node_rank": 2, "master": "h:1"},
     r"node_rank must be an integer in 0..1, got 2"),
    ({"nproc": 1, "master": "localhost"}, "master must be HOST:PORT"),
    ({"nproc": 1, "master": "h:99999"}, "master must be HOST:PORT"),
    ({"nproc": 1, "nnodes": 2}, "nnodes=2 needs master HOST:PORT"),
    ({"nproc": 1, "nnodes": 2, "master": "h:0"}, "port 0 .* only with nnodes=1"),
    ({"nproc": 2, "driver": 2}, r"driver must be an integer in 0..1, got 2"),
    ({"nproc": 1, "grace_s": -1}, "grace_s must be a number of seconds >= 0"),
])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        launch(["true"], **kw)


def test_bad_commands(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="script .*missing.py does not exist"):
        launch([str(tmp_path / "missing.py")], nproc=1)
    with pytest.raises(ValueError, match="script .*missing.py does not exist"):
        launch([sys.executable, str(tmp_path / "missing.py")], nproc=1)
    with pytest.raises(ValueError, match="'-m' must be followed by a module name"):
        launch(["-m"], nproc=1)
    with pytest.raises(ValueError, match="not found"):
        launch(["no-such-command-xyz"], nproc=1)
    monkeypatch.setenv("LAPDTR_DRIVER", "first")
    with pytest.raises(ValueError, match="LAPDTR_DRIVER must be a global rank in 0..0"):
        launch(["true"], nproc=1)


def test_cli_launch(tmp_path, capsys):
    """``lapdtr launch`` (in process): ARGS after the script are the script's, even ones that
    look like launcher options; the status is the driver's; errors exit 2 with a message."""
    from lapdtr.cli import main

    _script(tmp_path, """
        open(f"{OUT}/argv{RANK}", "w").write(json.dumps(sys.argv[1:]))
        sys.exit(5 if RANK == 1 else 0)
    """)
    assert main(["launch", "--nproc", "2", "--driver", "1", str(tmp_path / "s.py"),
                 "--nproc", "7", "x"]) == 5
    assert json.loads((tmp_path / "argv0").read_text()) == ["--nproc", "7", "x"]
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(
        "import os, sys\nopen(os.path.join(sys.argv[1], 'mod' + os.environ['RANK']), 'w')\n")
    os.environ["PYTHONPATH"] = str(tmp_path)  # restored below
    try:
        assert main(["launch", "--nproc", "2", "-m", "mypkg.job", str(tmp_path)]) == 0
    finally:
        del os.environ["PYTHONPATH"]
    assert (tmp_path / "mod0").exists() and (tmp_path / "mod1").exists()
    capsys.readouterr()
    assert main(["launch", "--nproc", "2", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err
    assert "lapdtr launch: error: script" in err and "nope.py does not exist" in err
    assert main(["launch", "--nproc", "0", str(tmp_path / "s.py")]) == 2
    assert "nproc must be an integer >= 1, got 0" in capsys.readouterr().err


def test_cli_subprocess_forwards_sigterm(tmp_path):
    """The installed command in its own process: SIGTERM reaches every rank, status 143."""
    _script(tmp_path, """
        open(f"{OUT}/pid{RANK}", "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "lapdtr.cli", "launch", "--nproc", "2",
                          str(tmp_path / "s.py")], env=env, stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / f"pid{r}" for r in range(2)]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pids):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert "hosting the store on 127.0.0.1:" in err
    assert "got SIGTERM: forwarding it to 2 rank(s)" in err
    assert not any(_alive(int(f.read_text())) for f in pids)

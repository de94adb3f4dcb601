"""Multi-node torchrun, the README's command: two torchrun launchers as two nodes of two ranks
each (c10d rendezvous), first on one host's loopback, then, where this process may create
network namespaces (root, iproute2), in two namespaces joined by a veth pair: two separate
network stacks with their own addresses, as two machines on a link would be. Outputs equal the
single-process model."""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from lapdtr.runtime import RunReport
from lapdtr.runtime.config import load_run_config

from runtime_helpers import assert_outputs_match, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "deit_tiny_patch16_224", "model_kwargs": {"depth": 4},
                                   "world_size": 4, "cuts": [1, 3, 5], "requests": 4,
                                   "batch_size": 2, "micro_batches": 2,
                                   "out": str(tmp_path / "out"), "plots": False,
                                   "save_outputs": True}))
    return cfg


def _node(cfg: Path, endpoint: str, extra=(), prefix=(), env=None) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "torch.distributed.run",
                             "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                             "--rdzv_endpoint", endpoint, "--rdzv_id", "mn", *extra,
                             str(ROOT / "infer" / "run.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def _check(nodes, cfg: Path) -> None:
    res = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [e[-3000:] for _, e in res]
    assert sum("4/4 requests" in o for o, _ in res) == 1  # rank 0 reports, on one node
    c = load_run_config(str(cfg))
    r = RunReport.load(Path(c.out) / "report.json")
    assert r.completed == 4 and r.world_size == 4 and r.duplicates == 0
    assert [k.items for k in r.ranks] == [8] * 4
    assert_outputs_match(c, c.out)


def test_two_nodes_on_loopback(tmp_path):
    cfg = _config(tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    _check([_node(cfg, endpoint) for _ in range(2)], cfg)


def _ip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    ns, links = [f"lapdtr-{tag}-a", f"lapdtr-{tag}-b"], [f"lpa{tag}", f"lpb{tag}"]
    if _ip("netns", "add", ns[0]).returncode != 0:
        pytest.skip("cannot create a network namespace here: " + _ip("netns", "add", ns[0]).stderr)
    try:
        _ip("netns", "add", ns[1])
        steps = [("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for n, link, addr in zip(ns, links, ["10.77.0.1/24", "10.77.0.2/24"]):
            steps += [("link", "set", link, "netns", n), ("-n", n, "addr", "add", addr, "dev", link),
                      ("-n", n, "link", "set", link, "up"), ("-n", n, "link", "set", "lo", "up")]
        steps += [("netns", "exec", n, "true") for n in ns]  # some containers cannot enter them
        for s in steps:
            p = _ip(*s)
            if p.returncode != 0:
                pytest.skip(f"cannot set up the namespaces (ip {' '.join(s)}): {p.stderr}")
        yield list(zip(ns, links, ["10.77.0.1", "10.77.0.2"]))
    finally:
        for n in ns:
            _ip("netns", "del", n)


def test_two_nodes_in_separate_network_namespaces(tmp_path, two_hosts):
    cfg = _config(tmp_path)
    endpoint = f"{two_hosts[0][2]}:29555"
    # both namespaces share this host's name, which resolves to neither: each node names its
    # own address, node a hosts the rendezvous, gloo uses the veth interface
    nodes = [_node(cfg, endpoint, ["--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr", addr],
                   prefix=["ip", "netns", "exec", ns], env={"GLOO_SOCKET_IFNAME": link})
             for i, (ns, link, addr) in enumerate(two_hosts)]
    _check(nodes, cfg)

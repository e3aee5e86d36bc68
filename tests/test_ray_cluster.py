"""The Ray engine on an existing Ray cluster: a two-node cluster on this machine gives the one-node model.

The cluster is Ray's own test double (``ray.cluster_utils.Cluster``: a head and a second node, each
with its own raylet and one CPU) in a helper process bound to 127.0.0.1; ``fedrec simulate`` joins it
with ``--ray-address``. Each node has one CPU and each Flower actor asks for one, so the two actors
sit on different nodes: the shards are trained on both.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedrec.config import ConfigError, RunConfig
from fedrec.ray_cluster import CLUSTER_ENV, backend_config, cluster_address, is_ray_address, node_gpus, on_loopback

WORLD = ["--world-users", "40", "--world-items", "60", "--rounds", "2", "--cohort", "12", "--dim", "4",
         "--user-fit-steps", "5", "--local-steps", "3", "--nodes", "2", "--seed", "3", "--privacy", "user",
         "--no-progress"]

#: the helper: start the cluster, print its address, hold it until stdin closes, then shut it down
CLUSTER = """\
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
c.add_node(num_cpus=1)
c.wait_for_nodes()
print(c.address, len(c.list_all_nodes()), flush=True)
sys.stdin.read()
c.shutdown()
"""


def test_ray_address_forms_are_checked_with_a_sentence():
    for ok in ("", "auto", "10.0.0.5:6379", "head.example.org:6379", "127.0.0.1:40000"):
        assert is_ray_address(ok) and RunConfig.from_mapping({"ray-address": ok}).ray_address == ok
    for bad in ("head", "head:", ":6379", "head:port", "head:70000", "a b:6379"):
        with pytest.raises(ConfigError, match="'ray-address' must be empty"):
            RunConfig.from_mapping({"ray-address": bad})


def test_the_backend_config_starts_a_loopback_ray_or_joins_a_cluster(monkeypatch):
    local = backend_config(3, "")["init_args"]
    assert local["num_cpus"] == 3 and local["_node_ip_address"] == "127.0.0.1" and "address" not in local
    joined = backend_config(3, "10.0.0.5:6379")
    assert joined["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert backend_config(3, "")["client_resources"]["num_gpus"] == 0.0 and "num_gpus" not in local
    shared = backend_config(4, "", gpus=1)  # a local Ray's GPU shared by its node actors
    assert shared["client_resources"]["num_gpus"] == 0.25 and shared["init_args"]["num_gpus"] == 1
    assert backend_config(2, "", gpus=4)["client_resources"]["num_gpus"] == 1.0
    assert backend_config(4, "", gpus=3)["client_resources"]["num_gpus"] == 0.5  # whole on one GPU: 4 actors fit
    assert backend_config(3, "10.0.0.5:6379", gpus=1)["client_resources"]["num_gpus"] == 0.0
    assert node_gpus("cpu") == 0 and node_gpus("auto") == 0  # auto keeps a node's devices on the CPU
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address("") == "" and cluster_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address("") == "10.0.0.5:6379" and cluster_address("10.0.0.9:1") == "10.0.0.9:1"
    assert on_loopback("") and on_loopback("127.0.0.1:6379") and not on_loopback("10.0.0.5:6379")
    assert not on_loopback("auto")


def _start_simulate(out: Path, *extra: str) -> subprocess.Popen:
    """``fedrec simulate`` in its own process group, logging to ``out``.log."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", "fedrec.cli", "simulate", *WORLD, "--out", str(out), *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _summary(out: Path, p: subprocess.Popen) -> dict:
    try:
        rc = p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the group this test started for the run
        p.wait(30)
        raise
    assert rc == 0, out.with_suffix(".log").read_text()[-6000:]
    return json.loads((out / "summary.json").read_text())


def _simulate(out: Path, *extra: str) -> dict:
    return _summary(out, _start_simulate(out, *extra))


def _start_cluster() -> tuple[subprocess.Popen, str]:
    """The helper process and the cluster's address, once both nodes are up (at most 90 s)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {CLUSTER_ENV: "0"}  # node IP 127.0.0.1
    p = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 90)
    line = p.stdout.readline().split() if ready else []
    if len(line) != 2 or line[1] != "2":
        _stop_cluster(p)
        pytest.fail(f"the two-node Ray cluster did not come up (helper said {line!r})")
    return p, line[0]


def _stop_cluster(p: subprocess.Popen) -> None:
    """Close the helper's stdin (it shuts the cluster down); if it hangs, end its process group by its id."""
    if p.stdin:
        p.stdin.close()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the group start_new_session gave the helper and its Ray processes
        p.wait(timeout=30)


@pytest.mark.slow
def test_a_two_node_ray_cluster_gives_the_one_node_model(tmp_path):
    t0 = time.monotonic()
    # the one-node run needs no cluster: it runs while the cluster starts and trains (an independent process)
    local = _start_simulate(tmp_path / "one", "--engine", "local")
    try:
        cluster, address = _start_cluster()
        try:
            assert address.startswith("127.0.0.1:")
            on_cluster = _simulate(tmp_path / "cluster", "--engine", "ray", "--ray-address", address)
        finally:
            _stop_cluster(cluster)
        one = _summary(tmp_path / "one", local)
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
            local.wait(30)
    a, b = (np.load(tmp_path / d / "global_model.npz") for d in ("one", "cluster"))
    assert set(a.files) == set(b.files) == {"item.weight"}
    # the same devices, seeds and noise; only the order in which replies are summed may differ
    assert np.allclose(a["item.weight"], b["item.weight"], atol=1e-5)
    assert on_cluster["metrics"]["hr@10"] == pytest.approx(one["metrics"]["hr@10"], rel=1e-6)
    assert on_cluster["privacy"]["user"]["epsilon"] == pytest.approx(one["privacy"]["user"]["epsilon"], rel=1e-9)
    assert on_cluster["config"]["ray-address"] == address
    assert time.monotonic() - t0 < 180


def test_an_address_no_ray_head_answers_fails_at_once_in_one_sentence(tmp_path):
    """Ray retries an unreachable cluster address for ever (a run hung past 300 s); the run checks the port first."""
    import socket

    from fedrec.ray_cluster import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")  # a head would answer here
        closed = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"^No Ray cluster answers at 127\.0\.0\.1:{closed} \("):
        check_reachable(f"127.0.0.1:{closed}")
    check_reachable("")  # a local Ray, started by the run
    check_reachable("auto")
    p = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--world-users", "20", "--rounds", "1",
                        "--no-progress", "--ray-address", f"127.0.0.1:{closed}", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "No Ray cluster answers" in p.stdout + p.stderr and not (tmp_path / "o").exists()

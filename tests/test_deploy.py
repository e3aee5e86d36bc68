"""The Deployment Engine on loopback, with real processes: flower-superlink, flower-supernode, flwr.

Slow (tens of seconds each): real processes for every part. By default each SuperNode keeps one ClientApp
process (fedrec.deploy.clientapp_host); ``--stock-nodes`` starts a fresh ``flwr-clientapp`` per message, as
Flower's own SuperNode does. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.checkpoint import load_checkpoint
from fedrec.clients.store import EventStore
from fedrec.config import RunConfig
from fedrec.deploy import control
from fedrec.deploy.local import LocalFederation, write_app
from fedrec.deploy.pki import node_key_pair
from fedrec.deploy.stores import fill_stores
from fedrec.privacy.ledger import Ledger

pytestmark = pytest.mark.slow


def _ours(path: Path) -> list[str]:
    """Live processes whose environment or command line mentions ``path`` (what a run left behind)."""
    needle = str(path).encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            stat = (p / "stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                continue
            if needle in (p / "environ").read_bytes() or needle in (p / "cmdline").read_bytes():
                found.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:150])
        except (OSError, IndexError):
            continue
    return found


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _all_trained(rows: list[dict], devices: int) -> bool:
    return all(x["failed"] == 0 and x["devices"] == devices for x in rows)


def _failures(rows: list[dict]) -> list:
    """What a failed assertion shows: each round's devices and the reasons of its failures."""
    return [(x["round"], x["devices"], x.get("failures")) for x in rows]


def test_deploy_local_with_tls_and_secure_aggregation_runs_its_rounds_and_leaves_no_process(tmp_path):
    """The acceptance command with --secure-aggregation: TLS, node authentication and SecAgg+ together."""
    out = tmp_path / "dep"
    r = subprocess.run([sys.executable, "-m", "fedrec.cli", "deploy", "local", "--devices", "3", "--rounds", "2",
                        "--tls", "--secure-aggregation", "--out", str(out), "--no-progress"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = _rows(out)
    assert [x["round"] for x in rows] == [1, 2]
    assert _all_trained(rows, 3), _failures(rows)  # every device trained, over TLS
    assert all(x["events_scored"] > 0 for x in rows)
    s = json.loads((out / "summary.json").read_text())
    assert s["privacy"]["user"]["releases"] == 2 and s["privacy"]["user"]["epsilon"] > 0
    assert s["privacy"]["user"]["trust"].startswith("secure aggregation (Flower SecAgg+)")
    assert (out / "hr_epsilon.png").is_file() and (out / "checkpoint.npz").is_file()
    assert int(load_checkpoint(out / "checkpoint.npz")["graph"]["releases"]) == 2  # the graph's sums, masked too
    log = (out / "deploy" / "logs" / "superlink-0.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in log  # TLS, loopback only
    for i in range(3):  # the devices' own state and the newest global version live in their stores
        with EventStore(out / "devices" / f"device-{i}.sqlite") as st:
            assert st.load_state() is not None and st.get_arrays("global")[0] == 2
            assert st.count(pending=True) < st.count()
    assert _ours(out) == []


def test_deploy_local_with_event_noise_shares_under_secure_aggregation(tmp_path):
    """SecAgg+ with distributed noise shares: each device adds its share, the server sees only the noisy sum,
    applies it (selection by noisy counts) and accounts every device's event-level release."""
    out = tmp_path / "agg"
    r = subprocess.run([sys.executable, "-m", "fedrec.cli", "deploy", "local", "--devices", "3", "--rounds", "2",
                        "--secure-aggregation", "--privacy", "event", "--event-noise", "aggregate", "--local-steps", "1",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = _rows(out)
    assert [x["round"] for x in rows] == [1, 2]
    assert _all_trained(rows, 3) and all(x["rows_selected"] is not None for x in rows), _failures(rows)
    ev = json.loads((out / "summary.json").read_text())["privacy"]["event"]
    assert ev["noise"] == "aggregate-secagg" and ev["epsilon"] > 0 and ev["devices"] == 3
    assert ev["trust"].startswith("SecAgg+ with distributed noise")
    assert "privacy (event level): epsilon=" in r.stdout
    led = Ledger(out / "privacy_ledger.jsonl").records
    assert sorted((x.round, x.subject) for x in led if x.kind == "aggregate-gaussian") == \
        [(rd, f"device-{i}") for rd in (1, 2) for i in range(3)]  # every device of every sum, once
    # the item graph's counts are summed masked too, with their shares: one graph record, a release each round
    assert [x.kind for x in led].count("graph-gaussian") == 1 and ev["graph_window"] == 0
    assert int(load_checkpoint(out / "checkpoint.npz")["graph"]["releases"]) == 2
    assert _ours(out) == []


def test_an_unregistered_supernode_is_refused(tmp_path):
    fed = LocalFederation(tmp_path / "fed", tls=True)
    try:
        fed.make_keys(1)
        fed.start_superlink()
        fed.start_devices([tmp_path / "unused.sqlite"])  # registered: joins (no run, so no store is opened)
        fed.wait_online(1, timeout=120)
        key, _pub = node_key_pair(tmp_path / "fed" / "keys", "intruder")  # never registered
        intruder = fed.start_supernode("intruder", "device-id=9", key)
        intruder.popen.wait(120)
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.text()
        listing = fed.flwr("supernode", "list", "fedrec-local", "--format", "json")
        nodes = json.loads(listing[listing.find("{"):])["nodes"]
        assert [n["status"] for n in nodes] == ["online"]  # only the registered device
        # what fedrec asks the Control API in-process is what the flwr CLI lists (an independent reading)
        assert [(n["node-id"], n["status"]) for n in control.nodes(fed.cli_home, "fedrec-local")] == \
            [(n["node-id"], n["status"]) for n in nodes]
    finally:
        left = fed.stop()
    assert left == [] and _ours(tmp_path / "fed") == []


def test_a_sigkilled_server_restarts_and_resumes_from_its_last_round(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(world_users=3, nodes=3, rounds=4, uptake_probe=False, out=str(out), progress=False)
    stores = fill_stores(cfg, 3, out / "devices")
    fed = LocalFederation(out / "deploy", tls=True)
    app = write_app(out / "deploy" / "app", {**cfg.to_flat(), "out": str(out)})
    try:
        fed.make_keys(3)
        fed.start_superlink()
        fed.start_devices(stores)
        fed.wait_online(3)
        fed.submit(app)
        t0 = time.time()
        while True:  # kill the server (SuperLink and its ServerApp) once round 1 or 2 is checkpointed
            try:
                done = load_checkpoint(out / "checkpoint.npz")["round"]
            except Exception:
                done = 0
            if done >= 1:
                break
            assert time.time() - t0 < 300, "no round finished"
            time.sleep(0.1)
        fed.kill_superlink()
        killed_at = load_checkpoint(out / "checkpoint.npz")["round"]
        assert 1 <= killed_at < 4
        eps_before = Ledger(out / "privacy_ledger.jsonl").user_epsilon(cfg.delta)

        fed.start_superlink()  # same database and port: the SuperNodes reconnect by themselves
        fed.wait_online(3, timeout=180)
        run2 = fed.submit(app)
        t0 = time.time()
        while not fed.status(run2)["status"].startswith("finished"):
            assert time.time() - t0 < 400
            time.sleep(1)
        assert fed.status(run2)["status"] == "finished:completed", fed.serverapp_log(run2)[-3000:]
        listed = fed.flwr("ls", "fedrec-local", "--format", "json")  # the flwr CLI's reading, beside fedrec's own
        cli = json.loads(listed[listed.find("{"):])["runs"]
        assert sorted((r["run-id"], r["status"]) for r in control.runs(fed.cli_home, "fedrec-local")) == \
            sorted((r["run-id"], r["status"]) for r in cli) and len(cli) == 2  # the killed run, stopped; run2
        # a device caught taking a message of the killed run dropped it at once: its ClientApp process neither
        # waited out its patience for it nor stopped when the SuperNode revoked the task (docs/deploy.md)
        assert fed.hosts and all(h.alive() for h in fed.hosts.values())
        assert [n for n, h in fed.hosts.items() if "timeout or retry limit reached" in h.text()] == []
    finally:
        left = fed.stop()
    assert left == [] and _ours(out) == []
    rows = _rows(out)
    assert [x["round"] for x in rows] == [1, 2, 3, 4]  # from the last complete round: none lost or doubled
    eps = [x["epsilon_user"] for x in rows]
    assert all(b >= a for a, b in zip(eps, eps[1:], strict=False)) and eps[-1] >= eps_before
    summary = json.loads((out / "summary.json").read_text())
    assert any(f"resuming after round {killed_at}" in n for n in summary["notes"])
    assert summary["privacy"]["user"]["epsilon"] >= eps_before
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck["round"] == 4 and ck["run"]["finished"]


def test_deploy_local_stops_everything_on_ctrl_c(tmp_path):
    out = tmp_path / "dep"
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive
    # shell (nohup ... &) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "fedrec.cli", "deploy", "local", "--devices", "2", "--rounds", "50",
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    logs = out / "deploy" / "logs"
    while not (logs / "device-1.log").exists() or "SuperNode" not in (logs / "device-1.log").read_text():
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    time.sleep(3)  # the federation is up (and may be mid-round): interrupt it
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "every process it started is stopped" in text, text[-3000:]
    assert "Traceback" not in text
    assert _ours(out) == []


def test_deploy_local_without_dp_carries_the_item_graph_both_ways(tmp_path):
    """Real processes, no DP: devices send their item pairs up, the published neighbour table comes down
    into every device's store, and the SDK recommends from it."""
    from fedrec.clients.device import Device
    from fedrec.itemgraph import KEYS

    out = tmp_path / "dep"
    r = subprocess.run([sys.executable, "-m", "fedrec.cli", "deploy", "local", "--devices", "3", "--rounds", "2",
                        "--privacy", "none", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = _rows(out)
    assert _all_trained(rows, 3), _failures(rows)
    # round 2 carries the table round 1 built (as its used slots where few are: wire_arrays), round 1 an empty one
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]
    assert rows[1]["blend"] is not None and rows[1]["events_scored"] > 0
    stores = sorted((out / "devices").glob("*.sqlite"))
    assert len(stores) == 3
    with Device(stores[0]) as d:
        got = d.store.get_arrays("global")
        assert got is not None and set(KEYS) <= set(got[1])
        assert got[1]["graph.ids"].ndim == 2 and (got[1]["graph.sim"] != 0).any()  # the table rebuilt whole, not empty
        top = d.recommend(5)
        assert len(top) == 5 and not set(top) & set(d.store.all_items().tolist())


def _deploy(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrec.cli", "deploy", "local", "--out", str(out), "--no-progress",
                           *extra], capture_output=True, text=True, timeout=900)


def test_stock_and_warm_supernodes_run_the_same_rounds_the_warm_ones_in_one_clientapp_process(tmp_path):
    """``--stock-nodes``: Flower's own SuperNode and a fresh flwr-clientapp per message. Warm SuperNodes (the
    default): no flwr-clientapp process is ever started; each node's one ClientApp process
    (fedrec.deploy.clientapp_host) takes all of its node's tasks, and stops with the federation. Both ways run the
    same rounds over the same events (a device's own randomness is its secret, so the models of two deployments
    differ whichever way they run)."""
    rows = {}
    for name, extra in (("stock", ["--stock-nodes"]), ("warm", [])):
        out = tmp_path / name
        r = _deploy(out, "--devices", "2", "--rounds", "2", "--privacy", "none", *extra)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        rows[name] = [(x["round"], x["devices"], x["failed"], x["new_events"], x["events_scored"]) for x in _rows(out)]
        logs = out / "deploy" / "logs"
        for i in range(2):
            started = "Start `flwr-clientapp` process" in (logs / f"device-{i}.log").read_text()
            assert started == (name == "stock")
            assert (logs / f"device-{i}-clientapp.log").exists() == (name == "warm")
            if name == "warm":
                host = (logs / f"device-{i}-clientapp.log").read_text()
                tasks = re.search(r"stopped after (\d+) tasks", host)
                assert tasks is not None and int(tasks.group(1)) >= 3, host[-2000:]  # the query and two rounds
        assert _ours(out) == []
    assert rows["stock"] == rows["warm"] and [x[:3] for x in rows["warm"]] == [(1, 2, 0), (2, 2, 0)]


@pytest.mark.parametrize(("argv", "env", "says"), [
    (["fedrec.deploy.clientapp_host", "--runtime-api-address", "127.0.0.1:1", "--insecure", "--poll", "0"], {},
     "--poll 0.0 is outside 0.001..60 seconds."),
    (["fedrec.deploy.supernode", "--help"], {"FEDREC_NODE_POLL": "soon"},
     "FEDREC_NODE_POLL='soon' should be a number of seconds from 0.01 to 3."),
])
def test_the_warm_node_commands_refuse_a_bad_poll_in_one_sentence(argv, env, says):
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 2 and r.stderr.strip() == says and "Traceback" not in r.stderr

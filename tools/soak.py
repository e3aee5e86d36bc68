"""Soak test of a real loopback federation: live events, SuperNodes and the SuperLink killed at random moments.

Run by hand (about 10-20 minutes on 2 cores): ``python tools/soak.py [--devices 20] [--rounds 30] [--out runs/soak]``.

It starts ``fedrec deploy local``'s federation (TLS, node authentication, warm SuperNodes) with ``clock = "live"``
(a round takes in every event recorded so far) and, while the rounds run:

* a recorder commits new events into random devices' stores (``EventStore.record``: durable when it returns);
* a chaos loop, every ``--kill-every`` seconds or so (30), SIGKILLs either 1-3 random SuperNodes (with their ClientApp
  processes) and restarts them a moment later, or the SuperLink with its ServerApp, which it restarts on the same
  database and submits the run again (the ServerApp resumes from its checkpoint, as docs/deploy.md says).

Afterwards it checks, and writes ``soak.json`` beside the run:

* **the run finished**: rounds 1..R each once in ``metrics.jsonl``, the checkpoint marked finished;
* **no committed event is lost**: every sequence number ``record`` returned is still in its store;
* **no event is consumed twice**: no store event is taken by two rounds (a column, set once), and the published
  rounds' ``new_events`` add up to at most the events taken;
* **the ledger is consistent and epsilon never went down**: the ledger loads with its hash chain checked, the
  checkpoint accepts it, and ``epsilon_user`` never decreases from one metrics row to the next.

It also reports the events that devices consumed in rounds whose result a crash discarded and never sent again:
taken by a round, trained past by the device's acknowledged cursor, never counted in a published round. A device
keeps the state its last update was trained from until the server acknowledges that update (``Device.run_round``'s
``acked``); an update not kept is trained again, so this is 0, and ``waiting_to_be_sent_again`` counts the events
of updates still unacknowledged at the end whose round the server did not keep.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

from fedrec.checkpoint import load_checkpoint
from fedrec.clients.store import EventStore, StoreError
from fedrec.config import RunConfig
from fedrec.deploy.local import DeployError, LocalFederation, write_app
from fedrec.deploy.stores import fill_stores
from fedrec.privacy.ledger import Ledger


class Recorder(threading.Thread):
    """Commits events into random stores until stopped; keeps every sequence number it was given."""

    def __init__(self, stores: list[Path], n_items: int, seed: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.stores, self.n_items, self.rate = stores, n_items, rate
        self.rng = random.Random(seed)
        self.recorded: dict[int, list[int]] = {i: [] for i in range(len(stores))}
        self.refused = 0  # a record that raised: never committed, so not an event to keep
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.rng.expovariate(self.rate)):
            i = self.rng.randrange(len(self.stores))
            try:
                with EventStore(self.stores[i]) as st:
                    self.recorded[i].append(st.record(self.rng.randrange(self.n_items), timestamp=time.time()))
            except StoreError:
                self.refused += 1


class Chaos:
    """Kills and restarts parts of ``fed``; counts what it did."""

    def __init__(self, fed: LocalFederation, stores: list[Path], app: Path, seed: int) -> None:
        self.fed, self.stores, self.app = fed, stores, app
        self.rng = random.Random(seed + 1)
        self.kills = {"supernode": 0, "superlink": 0}
        self.restarts = 0  # SuperNode starts after a kill, retries included
        self.runs: list[int] = []
        self.down: dict[int, float] = {}  # killed devices -> when to (re)try starting their SuperNode

    def submit(self) -> int:
        self.runs.append(self.fed.submit(self.app))
        return self.runs[-1]

    def kill_nodes(self) -> None:
        for i in self.rng.sample(range(len(self.stores)), self.rng.randint(1, 3)):
            self.fed.kill_supernode(f"device-{i}")
            self.kills["supernode"] += 1
            self.down[i] = time.time() + self.rng.uniform(0.5, 3.0)

    def revive(self) -> None:
        """Start the killed SuperNodes again. One that was SIGKILLed is still online to the SuperLink until its
        heartbeat lapses, and a new one with its key is refused meanwhile ("Failed to activate SuperNode"):
        like a real device, it tries again every 5 s until it is let in."""
        assert self.fed.pki is not None
        for i, when in list(self.down.items()):
            name = f"device-{i}"
            node = self.fed.nodes.get(name)
            if node is not None and node.alive() and self.fed.hosts[name].alive():
                if "SuperNode ID" in node.text().rsplit("Starting Flower SuperNode", 1)[-1]:
                    del self.down[i]  # let in
                continue
            if time.time() < when:
                continue
            self.fed.kill_supernode(name)  # a host left by a refused node
            self.fed.start_supernode(name, f"device-id={i} store='{self.stores[i].resolve()}'",
                                     self.fed.pki.node_keys[i][0])
            self.restarts += 1
            self.down[i] = time.time() + 5.0

    def kill_link(self) -> int:
        self.fed.kill_superlink()
        self.kills["superlink"] += 1
        time.sleep(self.rng.uniform(0.5, 3.0))
        self.fed.start_superlink()  # same database and ports: the SuperNodes reconnect by themselves
        return self.submit()


def _status(fed: LocalFederation, run: int) -> str:
    try:
        return fed.status(run)["status"]
    except (DeployError, OSError, ValueError, KeyError):
        return "unknown"


def soak(out: Path, devices: int, rounds: int, seed: int, kill_every: float, rate: float, limit: float) -> dict:
    cfg = RunConfig(world_users=devices, nodes=devices, rounds=rounds, clock="live", uptake_probe=False,
                    out=str(out), progress=False, seed=seed, round_timeout=30.0)
    stores = fill_stores(cfg, devices, out / "devices")
    with EventStore(stores[0]) as st:
        n_items = st.n_items
    fed = LocalFederation(out / "deploy", tls=True)
    app = write_app(out / "deploy" / "app", {**cfg.to_flat(), "out": str(out.resolve())})
    rec = Recorder(stores, n_items, seed, rate)
    chaos = Chaos(fed, stores, app, seed)
    t0 = time.time()
    try:
        fed.make_keys(devices)
        fed.start_superlink()
        fed.start_devices(stores)
        fed.wait_online(devices, timeout=600)
        run = chaos.submit()
        rec.start()
        next_kill = time.time() + chaos.rng.uniform(0.5, 1.5) * kill_every
        last_status = 0.0
        while True:
            time.sleep(1.0)
            chaos.revive()
            if time.time() < next_kill and time.time() - last_status < 10:
                continue  # the run's status is a `flwr ls` process: every 10 s, and before each kill
            st, last_status = _status(fed, run), time.time()
            if st == "finished:completed":
                break
            if st.startswith("finished"):  # failed or stopped: submit again, it resumes
                run = chaos.submit()
            if time.time() - t0 > limit:
                raise SystemExit(f"The soak run did not finish within {limit:.0f} s (logs in {out / 'deploy' / 'logs'}).")
            if time.time() >= next_kill:
                run = chaos.kill_link() if chaos.rng.random() < 0.25 else (chaos.kill_nodes() or run)
                next_kill = time.time() + chaos.rng.uniform(0.5, 1.5) * kill_every
    finally:
        rec.stop.set()
        rec.join(10)
        left = fed.stop()
    report = check(out, stores, rec, rounds, cfg.delta)
    report |= {"devices": devices, "rounds": rounds, "kills": chaos.kills, "supernode_starts": chaos.restarts,
               "runs_submitted": len(chaos.runs),
               "wall_s": round(time.time() - t0, 1), "processes_left": left}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    return report


def check(out: Path, stores: list[Path], rec: Recorder, rounds: int, delta: float) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ck = load_checkpoint(out / "checkpoint.npz")
    ledger = Ledger(out / "privacy_ledger.jsonl")  # loads with its hash chain checked
    eps = [r["epsilon_user"] for r in rows]
    acked = dict(zip(ck["acked"].get("devices", []), ck["acked"].get("rounds", []), strict=True))
    lost, taken, consumed_unsent, waiting = 0, 0, 0, 0
    for i, path in enumerate(stores):
        with EventStore(path) as st:
            present = {int(s) for (s,) in st._db.execute("SELECT seq FROM events")}
            lost += len(set(rec.recorded[i]) - present)
            taken += st.count(pending=False)
            state, pending = st.load_state(), st.pending()
            cursor = state["cursors"][-1] if state else 0
            if pending is not None and acked.get(st.device_id, -1) < pending[0]:
                # the device's last update was not kept: it trains those events again when next asked
                before = pending[1]["cursors"][-1] if pending[1] else 0
                waiting += _consumed(st, cursor) - _consumed(st, before)
                cursor = before
            consumed_unsent += _consumed(st, cursor)
    counted = sum(int(r["new_events"]) for r in rows)
    return {
        "finished": bool(ck["run"]["finished"]) and [r["round"] for r in rows] == list(range(1, rounds + 1)),
        "events_recorded": sum(len(v) for v in rec.recorded.values()), "records_refused": rec.refused,
        "events_lost": lost, "events_taken": taken, "events_counted_by_published_rounds": counted,
        "consumed_twice": max(0, counted - taken),
        "consumed_by_devices_in_discarded_rounds": max(0, consumed_unsent - counted),
        "waiting_to_be_sent_again": waiting,
        "ledger_records": len(ledger.records), "epsilon_user_final": eps[-1] if eps else None,
        "epsilon_went_down": any(b < a for a, b in zip(eps, eps[1:], strict=False)),
    }


def _consumed(st: EventStore, cursor: int) -> int:
    """Events of ``st`` that a device state with training cursor ``cursor`` has consumed."""
    return int(st._db.execute("SELECT COUNT(*) FROM events WHERE round IS NOT NULL AND round <= ?",
                              (cursor,)).fetchone()[0])


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-every", type=float, default=30.0, help="mean seconds between kills (default 30)")
    ap.add_argument("--rate", type=float, default=4.0, help="live events recorded per second (default 4)")
    ap.add_argument("--limit", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; give a new --out.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it like Ctrl-C: every process it started, too
    r = soak(out, args.devices, args.rounds, args.seed, args.kill_every, args.rate, args.limit)
    print(json.dumps(r, indent=1))
    ok = r["finished"] and r["events_lost"] == 0 and r["consumed_twice"] == 0 and not r["epsilon_went_down"] \
        and r["consumed_by_devices_in_discarded_rounds"] == 0 and not r["processes_left"]
    print("soak: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

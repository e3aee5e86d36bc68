"""Seconds a deployment round takes on loopback: ``fedrec deploy local`` as a user runs it, warm against stock.

Run by hand: ``python benchmarks/bench_deploy.py [--devices 4] [--rounds 3] [--out runs/bench]``. For each of
plain TLS and TLS with SecAgg+, it runs ``fedrec deploy local --devices N --rounds R --tls`` twice in the same
run: with the default SuperNodes (fedrec.deploy.supernode and one long-lived ClientApp process each) and with
``--stock-nodes`` (Flower's stock SuperNode: a fresh ``flwr-clientapp`` per message, 3 s polls). It reads each
round's ``wall_s`` from ``metrics.jsonl`` (the ServerApp's clock, from sending a round's messages to its
outputs) and prints the mean round beside the stock one, as a ratio; ``deploy.json`` keeps the figures.
Targets (issue 19): <= 3 s a round, <= 10 s with SecAgg+.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"tls": 3.0, "tls+secagg": 10.0}


def one(devices: int, rounds: int, extra: list[str]) -> dict:
    """One ``fedrec deploy local`` run: its rounds' wall_s, and the command's own wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedrec.cli", "deploy", "local", "--devices", str(devices), "--rounds",
               str(rounds), "--tls", "--out", str(out), "--no-progress", *extra]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.time() - t0
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-2000:]}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [x["wall_s"] for x in rows]
    return {"rounds_s": per_round, "mean_round_s": statistics.mean(per_round),
            "mean_after_first_s": statistics.mean(per_round[1:] or per_round), "command_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    results = {}
    for name, extra in (("tls", []), ("tls+secagg", ["--secure-aggregation"])):
        warm = one(args.devices, args.rounds, extra)
        stock = one(args.devices, args.rounds, [*extra, "--stock-nodes"])
        results[name] = {"warm": warm, "stock": stock}
        ratio = warm["mean_round_s"] / stock["mean_round_s"]
        target = TARGETS[name]
        print(f"deploy local --devices {args.devices} --rounds {args.rounds} --{name.replace('+', ' --')}: "
              f"{warm['mean_round_s']:.2f} s a round (rounds {', '.join(f'{x:.1f}' for x in warm['rounds_s'])}) "
              f"against stock SuperNodes {stock['mean_round_s']:.2f} s in the same run: {ratio:.2f}x "
              f"({1 / ratio:.1f}x faster); whole command {warm['command_s']:.0f} s against {stock['command_s']:.0f} s; "
              f"target <= {target:g} s: {'met' if warm['mean_round_s'] <= target else 'missed'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "deploy.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

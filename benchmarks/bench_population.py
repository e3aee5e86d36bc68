"""How a round's cost grows with the population: ``fedrec simulate`` on synthetic worlds of growing size.

Run by hand: ``python benchmarks/bench_population.py [--sizes 10000 30000] [--rounds 2]``. Each world has the
freshness sweep's shape (400 items in 10 topics, 25 events per user) and samples 1% of its devices a round, under
user-level DP, as a user runs it (``fedrec simulate --engine local``, each run its own process). Every device with
events in a round is served (each of its events scored with its own newest state, :mod:`fedrec.serving`), so a
round serves most of the population (every device in a 2-round run): the serving evaluation is what grows with it. Printed per size, beside the
same run with ``serve-eval = false`` (training only, the baseline in the same run): the mean round, the devices
served per second of round, the whole run's wall time and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(users: int, rounds: int, serve: bool) -> dict:
    """One ``fedrec simulate`` run; its round times, devices served and peak RSS (of the child process)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "extra.toml").write_text(f"serve-eval = {'true' if serve else 'false'}\n")
        cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--engine", "local", "--world-users", str(users),
               "--world-items", "400", "--world-topics", "10", "--world-events-per-user", "25",
               "--cohort", str(max(users // 100, 1)), "--rounds", str(rounds), "--privacy", "user",
               "--out", str(Path(tmp) / "run"), "--no-progress", "--config", str(Path(tmp) / "extra.toml")]
        code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
        p = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        peak = int(next(x for x in p.stdout.splitlines() if x.startswith("PEAK ")).split()[1]) * 1024
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        wall = json.loads((Path(tmp) / "run" / "summary.json").read_text())["timings"]["wall_s"]
    served = sum(_served(r) for r in rows)
    return {"round_s": sum(r["wall_s"] for r in rows) / len(rows), "served": served, "wall_s": wall,
            "peak_rss": peak, "failed": sum(r["failed"] for r in rows)}


def _served(row: dict) -> int:
    """Devices served in a round: the serving downlink (a version per served device) over one version's bytes."""
    per = row["bytes_down"] / max(row["sampled"], 1)
    return round(row["bytes_down_serving"] / per) if per else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"{'devices':>9} {'round (serving)':>16} {'training only':>14} {'ratio':>6} {'served/s':>9} "
          f"{'wall':>7} {'peak RSS':>9}")
    for n in args.sizes:
        on, off = run(n, args.rounds, True), run(n, args.rounds, False)
        assert not on["failed"] and not off["failed"], f"{n} devices: some nodes failed"
        print(f"{n:>9,} {on['round_s']:>15.1f}s {off['round_s']:>13.1f}s {on['round_s'] / off['round_s']:>5.1f}x "
              f"{on['served'] / (on['round_s'] * args.rounds):>9,.0f} {on['wall_s']:>6.0f}s "
              f"{on['peak_rss'] / 2**30:>7.2f} GiB", flush=True)


if __name__ == "__main__":
    main()

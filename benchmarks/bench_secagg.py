"""What SecAgg+ costs a simulated round: event noise at the aggregate on ml-latest-small, the noise as the devices'
shares under SecAgg+ (``--secure-aggregation``) against the trusted server adding it (the baseline), in the same run.

Run by hand: ``python benchmarks/bench_secagg.py [--data PATH] [--rounds 20] [--epsilon 8] [--out DIR]``. Each
configuration runs as a user runs it (``fedrec simulate --privacy event --epsilon E --engine local``, in its own
process); a round's time is its ``wall_s`` in ``metrics.jsonl`` (start-up and the end-of-run baselines excluded).
It prints both sums of the rounds, their ratio, and each run's HR@10 per event (the same ε; SecAgg+ has no item
pairs). ``secagg.json`` in ``--out`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"


def run(data: Path, rounds: int, epsilon: float, secure: bool) -> dict:
    """One ``fedrec simulate`` run: the sum of its rounds' wall_s, and its HR@10 per event and ε."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--data", str(data), "--rounds", str(rounds),
               "--privacy", "event", "--epsilon", str(epsilon), "--engine", "local", "--out", tmp, "--no-progress",
               *(["--secure-aggregation"] if secure else [])]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {"rounds_wall_s": round(sum(r["wall_s"] for r in rows), 2), "rounds": len(rows),
            "hr@10": summary["metrics"]["hr@10"], "epsilon": summary["privacy"]["event"]["epsilon"],
            "noise": summary["privacy"]["event"]["noise"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=None, help="write secagg.json here")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"No ratings file at {args.data}; pass --data PATH/ratings.csv (ml-latest-small).")
    res = {"trusted": run(args.data, args.rounds, args.epsilon, False),
           "secagg": run(args.data, args.rounds, args.epsilon, True)}
    ratio = res["secagg"]["rounds_wall_s"] / res["trusted"]["rounds_wall_s"]
    for name, r in res.items():
        print(f"{name:>8}: rounds {r['rounds_wall_s']:7.1f} s | HR@10 per event {r['hr@10']:.4f} | "
              f"event-level eps {r['epsilon']:.2f} ({r['noise']})")
    print(f"SecAgg+ rounds take {ratio:.2f}x the trusted server's (same run, {args.rounds} rounds)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "secagg.json").write_text(json.dumps({**res, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()

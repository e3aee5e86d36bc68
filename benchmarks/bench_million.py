"""A million simulated devices, as a user runs them: the million-device cells of ``scenarios/population.toml``.

Run by hand (about an hour on 2 cores): ``python benchmarks/bench_million.py [--epsilon 1] [--out DIR]``. Runs
``fedrec sweep scenarios/population.toml --cells ...`` on the non-private cell and the user-level cell at
``--epsilon`` (1,000,000 devices, 10,000 a round, 50 rounds), one after the other, each alone on the machine, and
prints for each: its minutes from start to summary (issue 18: within 30), the peak RSS of its whole process tree
(the run and the baselines' process beside it; within 8 GB), and HR@10 per event and windowed at the end, the
private cell's beside the non-private one's (its baseline in the same run: keep at least 0.8x). The sweep's
report is in ``--out``. A cell already finished there is not run again, and then has no time or memory figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rss import peak_rss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scenarios" / "population.toml"


def cell(name: str, out: Path) -> dict:
    """Run one cell of the sweep alone; its wall time, the tree's peak RSS and its summary."""
    t0 = time.time()
    peak, _, rc = peak_rss([sys.executable, "-m", "fedrec.cli", "sweep", str(SWEEP), "--cells", name, "--jobs", "1",
                            "--out", str(out), "--no-progress"])
    if rc:
        raise SystemExit(f"fedrec sweep failed on {name} (exit {rc}); its log is in {out / 'cells' / name}.")
    summary = json.loads((out / "cells" / name / "seed-0" / "summary.json").read_text())
    return {"minutes": (time.time() - t0) / 60, "peak_rss_gb": peak / 1e9, "summary": summary}


def _hr(summary: dict) -> dict[str, float]:
    return {"per event": summary["metrics"]["hr@10"], "windowed at the end": summary["freshness"]["whr@10_final"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", default="1", help="the user-level cell's epsilon (8, 4, 2 or 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "million")
    args = ap.parse_args(argv)
    res = {name: cell(name, args.out) for name in ("1m-none-epsinf", f"1m-user-eps{args.epsilon}")}
    (none, priv) = res.values()
    for name, r in res.items():
        h, t = _hr(r["summary"]), r["summary"]["timings"]
        print(f"{name}: {r['minutes']:.1f} min start to summary (target 30; rounds {t['mean_round_s']:.1f} s each, "
              f"baselines {t.get('baselines', '?')}); peak RSS {r['peak_rss_gb']:.2f} GB (target 8); HR@10 per event "
              f"{h['per event']:.4f}, windowed at the end {h['windowed at the end']:.4f}")
    for key, a in _hr(priv["summary"]).items():
        print(f"user-level eps {args.epsilon} / no DP, HR@10 {key}: {a / _hr(none['summary'])[key]:.2f}x (target 0.8x)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "million.json").write_text(json.dumps(
        {k: {"minutes": v["minutes"], "peak_rss_gb": v["peak_rss_gb"], "metrics": v["summary"]["metrics"]}
         for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()

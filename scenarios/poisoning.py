"""Poisoning: fake devices push one item; how far does it get, with and without each defence?

    .venv/bin/python scenarios/poisoning.py [--out runs/poisoning] [--jobs 2] [--rounds 15]

A share of the devices (0, 1%, 5%, 10%) is fake (fedrec.attack): each trains on its own events
with every item replaced by the target, and boosts its delta. Defences: none (FedAvg mean),
norm bounding at the server of each whole delta (`max-update-norm`) and of each item row of a
delta (`max-row-norm`), and per-item-row trimmed mean and median.
Measured per run, in the same world and seed: the target's exposure (share of benign served
devices whose top-10 holds it, mean of the last 3 rounds) and the clean HR@10 as served.
Writes results.csv, results.md and exposure.png into --out; a finished run is not redone.
No DP here: the robust aggregators are refused under user-level DP (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import csv
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.progress import Progress

SHARES = (0.0, 0.01, 0.05, 0.10)
DEFENCES = {  # name -> config keys
    "none": {"aggregator": "mean"},
    "norm bound": {"aggregator": "mean", "max-update-norm": 2.0},
    "row bound 1.0": {"aggregator": "mean", "max-row-norm": 1.0},
    "row bound 0.5": {"aggregator": "mean", "max-row-norm": 0.5},
    "trimmed mean": {"aggregator": "trimmed-mean", "trim": 0.1},
    "median": {"aggregator": "median"},
}
BASE = {"world-users": 1000, "cohort": 150, "privacy": "none", "engine": "local", "nodes": 2, "seed": 0,
        "attack-boost": 3.0, "attack-measure": True, "uptake-probe": False, "progress": False}


def run_one(out: str, keys: dict) -> dict:
    from fedrec.clients.app import app
    from fedrec.config import RunConfig
    from fedrec.server.app import run_federation
    from fedrec.server.local_grid import LocalGrid

    summ = Path(out) / "summary.json"
    if summ.is_file():  # resumable: a finished run is read back, not redone
        return json.loads(summ.read_text())
    cfg = RunConfig.from_mapping({**keys, "out": out}, where="scenarios/poisoning.py")
    return run_federation(LocalGrid(app, cfg.nodes, cfg.to_flat()), cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/poisoning")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    out = Path(args.out)
    cells = [(share, name) for share in SHARES for name in DEFENCES]
    rows = []
    with Progress() as bar, ProcessPoolExecutor(args.jobs) as pool:
        task = bar.add_task("poisoning runs", total=len(cells))
        futs = {(share, name): pool.submit(run_one, str(out / f"{name.replace(' ', '-')}-{share:g}"),
                                           {**BASE, **DEFENCES[name], "attackers": share, "rounds": args.rounds})
                for share, name in cells}
        for (share, name), fut in futs.items():
            s = fut.result()
            rows.append({"attackers": share, "n_attackers": s["attack"]["attackers"], "defence": name,
                         "target_exposure": s["attack"]["exposure_last3"], "hr@10": s["metrics"]["hr@10"],
                         "target": s["attack"]["target"]})
            bar.advance(task)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    clean = {r["defence"]: r["hr@10"] for r in rows if r["attackers"] == 0}
    lines = ["| attackers | " + " | ".join(f"{d}: exposure / HR@10" for d in DEFENCES) + " |",
             "|---|" + "---|" * len(DEFENCES)]
    for share in SHARES:
        by = {r["defence"]: r for r in rows if r["attackers"] == share}
        lines.append(f"| {share:.0%} ({by['none']['n_attackers']}) | " + " | ".join(
            f"{by[d]['target_exposure']:.3f} / {by[d]['hr@10']:.3f}" for d in DEFENCES) + " |")
    lines.append("")
    lines.append("Clean-accuracy cost of each defence (HR@10 without attackers, against none): " + ", ".join(
        f"{d} {clean[d] / clean['none']:.2f}x" for d in DEFENCES))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, out / "exposure.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for d in DEFENCES:
        rs = [r for r in rows if r["defence"] == d]
        ax[0].plot([100 * r["attackers"] for r in rs], [r["target_exposure"] for r in rs], marker="o", label=d)
        ax[1].plot([100 * r["attackers"] for r in rs], [r["hr@10"] for r in rs], marker="o", label=d)
    ax[0].set(xlabel="fake devices (%)", ylabel="target in benign top-10 (share)", title="Target exposure")
    ax[1].set(xlabel="fake devices (%)", ylabel="HR@10 as served", title="Clean accuracy")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Show that a scenario's synthetic world really drifts the way its ground truth says.

    python scenarios/check_world.py scenarios/freshness_vs_privacy.toml [--seed 0] [--out world_check.png]

Per round it prints and plots, from the generated events alone, the share of the shifted users'
events that fall in their new topic, the share of all events on items launched mid-stream, and
the share on the trending items, with the ground-truth drift round and burst peak marked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedrec.data.source import load_stream
from fedrec.sweep.spec import load_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="world_check.png")
    args = ap.parse_args()
    spec = load_sweep(args.sweep)
    cfg = spec.config(spec.cells[0], args.seed, Path("/tmp/unused"))
    if cfg.data:
        raise SystemExit(f"{args.sweep} replays {cfg.data}: real data has no ground truth to check.")
    st = load_stream(cfg)
    log, truth = st.log, st.log.meta["world"]
    rounds = np.arange(1, cfg.rounds + 1)
    shifted = np.isin(log.user, truth["shifted_users"])
    in_new = np.asarray(truth["item_topic"])[log.item] == np.asarray(truth["new_topic"])[log.user]
    on_new_items = np.isin(log.item, truth["new_items"])
    on_burst = np.isin(log.item, truth["burst_items"])

    def share(mask: np.ndarray, of: np.ndarray) -> list[float]:
        return [float(mask[(st.round_of == r) & of].mean()) if ((st.round_of == r) & of).any() else float("nan")
                for r in rounds]

    series = {"shifted users' events in their new topic": share(in_new, shifted),
              "events on items launched mid-stream": share(on_new_items, np.ones(len(log), bool)),
              "events on trending items": share(on_burst, np.ones(len(log), bool))}
    drift = st.round_at(truth["shift_time"]) if truth["shifted_users"] else None
    peak = st.round_at(truth["burst_time"]) if truth["burst_items"] else None
    print(f"{log.source}: drift round {drift}, burst peak round {peak}")
    print("round  " + "  ".join(f"{k[:28]:>28}" for k in series))
    for i, r in enumerate(rounds):
        print(f"{r:>5}  " + "  ".join(f"{v[i]:>28.3f}" for v in series.values()))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, v in series.items():
        ax.plot(rounds, v, marker="o", ms=3, label=name)
    for r, what in ((drift, "drift (ground truth)"), (peak, "burst peak (ground truth)")):
        if r:
            ax.axvline(r, ls=":", color="grey")
            ax.text(r, 1.02, what, fontsize=8, ha="center")
    ax.set(xlabel="round", ylabel="share of events", ylim=(0, 1.08), title=spec.title[:70])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

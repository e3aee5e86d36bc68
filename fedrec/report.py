"""Run outputs: one metrics line per round, a summary with baselines and privacy, and plots."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .config import RunConfig
from .eval.metrics import PrequentialCounts


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class RunRecorder:
    """Writes ``metrics.jsonl`` as rounds finish (flushed, so a crash loses no finished round)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the output directory {self.out}: {e.strerror}.") from None
        self.rows: list[dict] = []
        self.schedule: list[list[int]] = []
        self.total = PrequentialCounts()
        self.t0 = time.time()
        self.info: dict = {}
        self.notes: list[str] = []
        self._f = open(self.out / "metrics.jsonl", "w")

    def start(self, **info) -> None:
        self.info = info

    def note(self, msg: str) -> None:
        """Something the user must know (budget spent, ledger continued): on screen and in the summary."""
        self.notes.append(msg)
        print(f"fedrec: {msg}", flush=True)

    def round(self, r: int, *, done: list[int], counts: PrequentialCounts, failed: list, extra: dict) -> dict:
        self.schedule.append(list(done))
        self.total.add(counts)
        k = self.cfg.k
        row = {"round": r, f"hr@{k}": _finite(counts.hr), f"ndcg@{k}": _finite(counts.ndcg_mean),
               "events_scored": counts.n, "devices": len(done), "failed": len(failed), **extra}
        if failed:
            row["failures"] = [f"{who}: {why}" for who, why in failed[:5]]
        return self._write(row)

    def skip(self, r: int, *, reason: str, wall_s: float) -> dict:
        self.schedule.append([])
        k = self.cfg.k
        return self._write({"round": r, f"hr@{k}": None, f"ndcg@{k}": None, "events_scored": 0, "devices": 0,
                            "failed": 0, "skipped": reason, "epsilon": self.rows[-1]["epsilon"] if self.rows else 0.0,
                            "wall_s": round(wall_s, 3)})

    def _write(self, row: dict) -> dict:
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        return row

    def finish(self, final_state: dict, privacy: dict) -> dict:
        self._f.close()
        cfg, k = self.cfg, self.cfg.k
        baselines = {}
        pop_rounds: list[PrequentialCounts] = []
        try:
            from .data.source import load_stream
            from .eval.baselines import popularity_prequential

            stream = load_stream(cfg)
            pop_rounds = popularity_prequential(stream, self.schedule, k)
            pop = PrequentialCounts()
            for c in pop_rounds:
                pop.add(c)
            baselines["popularity"] = {f"hr@{k}": _finite(pop.hr), f"ndcg@{k}": _finite(pop.ndcg_mean),
                                       "events_scored": pop.n,
                                       "what": "counts of all events in earlier rounds, centralised, non-private"}
        except Exception as e:  # the server may not see the data (deployment): say so, do not fail the run
            baselines["popularity"] = {"unavailable": f"{type(e).__name__}: {e}"}
        for row, c in zip(self.rows, pop_rounds, strict=False):
            row[f"popularity_hr@{k}"] = _finite(c.hr)
        hr_key = f"hr@{k}"
        last = [r[hr_key] for r in self.rows[-5:] if r.get(hr_key) is not None]
        summary = {
            "config": cfg.to_flat(),
            "data": {"source": cfg.data or "synthetic world", "n_items": self.info.get("n_items"),
                     "population": self.info.get("population")},
            "rounds": len(self.rows),
            "metrics": {hr_key: _finite(self.total.hr), f"ndcg@{k}": _finite(self.total.ndcg_mean),
                        "events_scored": self.total.n,
                        f"last5_{hr_key}": float(np.mean(last)) if last else None,
                        "what": "prequential (test-then-train), full ranking over all items, seen items excluded"},
            "baselines": baselines,
            "privacy": privacy,
            "notes": self.notes,
            "timings": {"wall_s": round(time.time() - self.t0, 2),
                        "mean_round_s": round(float(np.mean([r["wall_s"] for r in self.rows])), 3) if self.rows else 0,
                        "aggregation_device": self.info.get("device")},
            "bytes": {"up": int(sum(r.get("bytes_up", 0) for r in self.rows)),
                      "down": int(sum(r.get("bytes_down", 0) for r in self.rows))},
        }
        # rewrite once with the per-round popularity column (the streamed lines stay until then)
        with open(self.out / "metrics.jsonl", "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "summary.json")
        try:
            plot_run(self.rows, self.out / "hr_epsilon.png", k=k)
        except Exception as e:  # a plot must never lose the numbers
            summary["plot_error"] = str(e)
        return summary


def plot_run(rows: list[dict], path: Path, *, k: int = 10) -> None:
    """HR@K per round (model and popularity) and ε over rounds, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(r, [row[f"hr@{k}"] for row in rows], marker="o", ms=3, label="federated model")
    if rows and f"popularity_hr@{k}" in rows[0]:
        ax[0].plot(r, [row[f"popularity_hr@{k}"] for row in rows], ls="--", label="popularity")
    ax[0].set(xlabel="round", ylabel=f"prequential HR@{k}", title="Recommendation quality")
    ax[0].legend()
    if any(row.get("epsilon_user") is not None for row in rows):
        ax[1].plot(r, [row.get("epsilon_user") for row in rows], color="C2", label="user level")
    if any(row.get("epsilon_median") for row in rows):
        ax[1].plot(r, [row.get("epsilon") for row in rows], color="C3", label="event level, max over devices")
        ax[1].plot(r, [row.get("epsilon_median") for row in rows], color="C3", ls=":", label="event level, median")
    ax[1].set(xlabel="round", ylabel="ε", title="Privacy spent")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Run outputs: one metrics line per round, a summary with baselines and privacy, and plots."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .config import RunConfig
from .eval.metrics import PrequentialCounts

PRIVACY_UNIT = {"none": "none", "event": "event", "user": "user", "both": "event+user"}


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
        self.device_eps: dict[int, float] = {}
        self.t0 = time.time()
        self.info: dict = {}
        self._f = open(self.out / "metrics.jsonl", "w")

    def start(self, **info) -> None:
        self.info = info

    def round(self, r: int, *, done: list[int], counts: PrequentialCounts, eps: list[float], diag: dict,
              failed: list, bytes_up: int, bytes_down: int, staleness: int, new_events: int, wall_s: float) -> dict:
        self.schedule.append(list(done))
        self.total.add(counts)
        for d, e in zip(done, eps, strict=False):
            self.device_eps[d] = max(self.device_eps.get(d, 0.0), e)
        all_eps = list(self.device_eps.values())
        k = self.cfg.k
        row = {
            "round": r, f"hr@{k}": _finite(counts.hr), f"ndcg@{k}": _finite(counts.ndcg_mean),
            "events_scored": counts.n, "epsilon": _finite(max(all_eps)) if all_eps else 0.0,
            "epsilon_median": _finite(statistics.median(all_eps)) if all_eps else 0.0,
            "staleness": staleness, "new_events": new_events, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "devices": len(done), "failed": len(failed), "update_norm": diag.get("update_norm", 0.0),
            "wall_s": round(wall_s, 3),
        }
        if failed:
            row["failures"] = [f"{who}: {why}" for who, why in failed[:5]]
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        return row

    def finish(self, final_state: dict) -> dict:
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
        eps = list(self.device_eps.values())
        private = cfg.privacy != "none"
        privacy = {
            "unit": PRIVACY_UNIT[cfg.privacy],
            "epsilon": (_finite(max(eps)) if eps else 0.0) if private else None,
            "epsilon_median_device": _finite(statistics.median(eps)) if eps and private else None,
            "delta": cfg.delta if private else None,
            "accountant": cfg.accountant.upper() if private else None,
            "noise_multiplier": self.info.get("noise_multiplier"),
            "clip": cfg.clip if private else None,
            "sample_rate": cfg.sample_rate if private else None,
            "local_steps": cfg.local_steps,
            "max_steps_per_event": cfg.local_steps * (cfg.replay_rounds + 1),
            "population": self.info.get("population"),
            "what": ("event-level DP-SGD on each device (Opacus, ghost clipping); epsilon is the largest over "
                     "devices of the per-event bound (each event is used in at most replay-rounds+1 updates). "
                     "Event counts and evaluation counts are sent in the clear (measurement only)."
                     if cfg.privacy in ("event", "both") else "no differential privacy"),
        }
        last = self.rows[-5:]
        hr_key = f"hr@{k}"
        summary = {
            "config": cfg.to_flat(),
            "data": {"source": cfg.data or "synthetic world", "n_items": self.info.get("n_items"),
                     "population": self.info.get("population")},
            "rounds": len(self.rows),
            "metrics": {hr_key: _finite(self.total.hr), f"ndcg@{k}": _finite(self.total.ndcg_mean),
                        "events_scored": self.total.n,
                        f"last5_{hr_key}": _finite(float(np.nanmean([r[hr_key] if r[hr_key] is not None else np.nan
                                                                     for r in last]))) if last else None,
                        "what": "prequential (test-then-train), full ranking over all items, seen items excluded"},
            "baselines": baselines,
            "privacy": privacy,
            "timings": {"wall_s": round(time.time() - self.t0, 2),
                        "mean_round_s": round(float(np.mean([r["wall_s"] for r in self.rows])), 3) if self.rows else 0,
                        "aggregation_device": self.info.get("device")},
            "bytes": {"up": int(sum(r["bytes_up"] for r in self.rows)),
                      "down": int(sum(r["bytes_down"] for r in self.rows))},
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
    ax[1].plot(r, [row["epsilon"] for row in rows], color="C3", label="max over devices")
    ax[1].plot(r, [row["epsilon_median"] for row in rows], color="C3", ls=":", label="median")
    ax[1].set(xlabel="round", ylabel="ε (per event)", title="Privacy spent")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

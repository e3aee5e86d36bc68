"""Run outputs: one metrics line per round, a summary with baselines and privacy, and plots."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .eval.metrics import PrequentialCounts


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class RunRecorder:
    """Writes ``metrics.jsonl`` as rounds finish (flushed, so a crash loses no finished round)."""

    def __init__(self, cfg: RunConfig, *, stream: Any = None, no_stream: str = "no event stream was given") -> None:
        """``stream``: the run's events (for baselines and a synthetic world's ground truth), or None where
        the server cannot see them (deployment; ``no_stream`` says why, in the summary)."""
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
        self.per_round: list[PrequentialCounts] = []
        self.drift_rounds: list[PrequentialCounts] = []
        self.probe_tally: dict[int, dict[int, list[int]]] = {}  # item -> round -> [hits, probed]
        self._truth_users: set[int] | None = None
        self._stream, self._no_stream = stream, no_stream
        self._target = None
        if (cfg.attackers or cfg.attack_measure) and self._stream is not None:
            from .attack import attack_target

            st = self._stream
            self._target = attack_target(st.log.item, st.round_of, st.log.n_items)
        truth = (self._stream.log.meta.get("world") or {}) if self._stream is not None else {}
        if truth.get("shifted_users") and 0 < cfg.world_shift_time < 1:
            self._truth_users = set(truth["shifted_users"])

    def start(self, **info) -> None:
        self.info = info

    # ---- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed server needs to go on writing the same run (JSON-ready)."""
        def counts(cs: list[PrequentialCounts]) -> list[list[float]]:
            return [[c.n, float(c.hits), float(c.ndcg)] for c in cs]

        return {"rows": self.rows, "schedule": self.schedule, "total": counts([self.total])[0],
                "per_round": counts(self.per_round), "drift_rounds": counts(self.drift_rounds),
                "probe_tally": {str(i): {str(r): t for r, t in by.items()} for i, by in self.probe_tally.items()},
                "notes": self.notes,
            **({"attack": self._attack_summary()} if self._target is not None else {}), "elapsed_s": time.time() - self.t0}

    def load_state_dict(self, d: dict) -> None:
        """Continue from :meth:`state_dict`: rows after it are dropped from ``metrics.jsonl``."""
        def counts(xs: list) -> list[PrequentialCounts]:
            return [PrequentialCounts(int(n), float(h), float(g)) for n, h, g in xs]

        self.rows = list(d["rows"])
        self.schedule = [list(s) for s in d["schedule"]]
        self.total = counts([d["total"]])[0]
        self.per_round = counts(d["per_round"])
        self.drift_rounds = counts(d["drift_rounds"])
        self.probe_tally = {int(i): {int(r): list(t) for r, t in by.items()} for i, by in d["probe_tally"].items()}
        self.notes = list(d["notes"]) + self.notes
        self.t0 = time.time() - float(d["elapsed_s"])
        self._f.seek(0)
        self._f.truncate()
        for row in self.rows:
            self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def note(self, msg: str) -> None:
        """Something the user must know (budget spent, ledger continued): on screen and in the summary."""
        self.notes.append(msg)
        print(f"fedrec: {msg}", flush=True)

    def round(self, r: int, *, done: list[int], counts: PrequentialCounts, failed: list, extra: dict,
              per_device: list | None = None, probes: list | None = None, scored: list[int] | None = None) -> dict:
        """One finished round. ``counts`` are the round's scored events; ``scored`` the devices whose
        events they are (default: the devices that trained), for baselines scored on the same events."""
        self.schedule.append(list(done if scored is None else scored))
        self.total.add(counts)
        k = self.cfg.k
        row: dict[str, Any] = {"round": r, f"hr@{k}": _finite(counts.hr), f"ndcg@{k}": _finite(counts.ndcg_mean),
               "events_scored": counts.n, "devices": len(done), "failed": len(failed)}
        row.update(self._freshness_row(r, counts, per_device or [], probes or []))
        row.update(extra)
        if failed:
            row["failures"] = [f"{who}: {why}" for who, why in failed[:20]]
        return self._write(row)

    def skip(self, r: int, *, reason: str, wall_s: float) -> dict:
        self.schedule.append([])
        k = self.cfg.k
        return self._write({"round": r, f"hr@{k}": None, f"ndcg@{k}": None, "events_scored": 0, "devices": 0,
                            "failed": 0, **self._freshness_row(r, PrequentialCounts(), [], []), "skipped": reason,
                            "epsilon": self.rows[-1]["epsilon"] if self.rows else 0.0, "wall_s": round(wall_s, 3)})

    def _freshness_row(self, r: int, counts: PrequentialCounts, per_device: list, probes: list) -> dict:
        """Windowed HR (all devices, and the devices whose taste the world shifted) and probe tallies."""
        from .eval.freshness import windowed_rate

        k, w = self.cfg.k, self.cfg.freshness_window
        self.per_round.append(counts)
        out = {f"whr@{k}": windowed_rate([c.hits for c in self.per_round[-w:]], [c.n for c in self.per_round[-w:]],
                                         len(self.per_round[-w:]))[-1]}
        if self._truth_users is not None:
            dc = PrequentialCounts()
            for d, c in per_device:
                if d in self._truth_users:
                    dc.add(c)
            self.drift_rounds.append(dc)
            tail = self.drift_rounds[-w:]
            out[f"drift_hr@{k}"] = _finite(dc.hr)
            out[f"drift_whr@{k}"] = windowed_rate([c.hits for c in tail], [c.n for c in tail], len(tail))[-1]
        for items, hits in probes:
            for i, h in zip(items, hits, strict=True):
                t = self.probe_tally.setdefault(int(i), {}).setdefault(r, [0, 0])
                t[0] += int(h)
                t[1] += 1
        if self._target is not None:
            seen = self.probe_tally.get(self._target, {}).get(r)
            out["target_exposure"] = seen[0] / seen[1] if seen and seen[1] else None
        return out

    def freshness(self) -> dict:
        """The run's freshness block (DESIGN.md, "Freshness, defined")."""
        from .eval.freshness import tracked_items, uptake_summary

        k = self.cfg.k
        rows = self.rows
        stale = [float(row["staleness"]) for row in rows if row.get("staleness") is not None]
        out: dict = {"window": self.cfg.freshness_window, "staleness_mean": float(np.mean(stale)) if stale else None,
                     f"whr@{k}_final": rows[-1].get(f"whr@{k}") if rows else None, "drift_round": None}
        st = self._stream
        if st is None:
            return out
        truth = st.log.meta.get("world") or {}
        if self._truth_users is not None:
            out["drift_round"] = st.round_at(truth["shift_time"])
            out["drift_users"] = len(self._truth_users)
        if self.cfg.uptake_probe:
            start, groups = tracked_items(st)
            n = len(rows)
            for name, items in groups.items():
                if not items:
                    continue
                shares = {}
                for i in items:
                    tally = self.probe_tally.get(i, {})
                    shares[i] = [tally[r][0] / tally[r][1] if r in tally and tally[r][1] else None
                                 for r in range(1, n + 1)]
                out[f"uptake_{name}"] = uptake_summary({i: int(start[i]) for i in items}, shares)
        return out

    def _attack_summary(self) -> dict:
        from .attack import attacker_set

        exp = [r.get("target_exposure") for r in self.rows]
        last = [x for x in exp[-3:] if x is not None]
        return {"target": self._target, "attackers_share": self.cfg.attackers,
                "attackers": len(attacker_set(self._stream.n_devices, self.cfg.attackers, self.cfg.seed)),
                "boost": self.cfg.attack_boost, "aggregator": self.cfg.aggregator,
                "max_update_norm": self.cfg.max_update_norm,
                "exposure_last3": float(np.mean(last)) if last else None,
                "what": "share of benign served devices whose top-K holds the target item, per round "
                        "(metrics.jsonl target_exposure); fake devices are never served"}

    def _write(self, row: dict) -> dict:
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        return row

    def finish(self, final_state: dict, privacy: dict) -> dict:
        """Write ``summary.json`` (with the baselines measured on the same events), the final model and plots."""
        self._f.close()
        cfg, k = self.cfg, self.cfg.k
        baselines = self._baselines()
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
            "freshness": self.freshness(),
            "notes": self.notes,
            **({"attack": self._attack_summary()} if self._target is not None else {}),
            "timings": {"wall_s": round(time.time() - self.t0, 2),
                        "mean_round_s": round(float(np.mean([r["wall_s"] for r in self.rows])), 3) if self.rows else 0,
                        "aggregation_device": self.info.get("device")},
            "bytes": {"up": int(sum(r.get("bytes_up", 0) for r in self.rows)),
                      "down": int(sum(r.get("bytes_down", 0) for r in self.rows))},
        }
        self._write_files(final_state, summary)
        return summary

    def _baselines(self) -> dict:
        """Popularity and recent popularity, scored on the same events as the model; per round in the rows too."""
        from .eval.baselines import popularity_prequential

        k, w = self.cfg.k, self.cfg.freshness_window
        if self._stream is None:  # the server may not see the data (deployment): say so, do not fail the run
            return {"popularity": {"unavailable": f"RuntimeError: {self._no_stream}"}}
        out: dict[str, dict] = {}
        for name, window, what in (
                ("popularity", 0, "counts of all events in earlier rounds, centralised, non-private"),
                ("recent_popularity", w, f"counts of the events of the last {w} rounds only")):
            try:
                rounds = popularity_prequential(self._stream, self.schedule, k, window=window)
            except Exception as e:  # a baseline that cannot be measured is said, never fatal
                return {**out, "popularity": out.get("popularity", {"unavailable": f"{type(e).__name__}: {e}"})}
            total = PrequentialCounts()
            for c in rounds:
                total.add(c)
            out[name] = {f"hr@{k}": _finite(total.hr), f"ndcg@{k}": _finite(total.ndcg_mean), "events_scored": total.n,
                         **({"window": w} if window else {}), "what": what}
            for row, c in zip(self.rows, rounds, strict=False):
                row[f"{name}_hr@{k}"] = _finite(c.hr)
        return out

    def _write_files(self, final_state: dict, summary: dict) -> None:
        # the final global model, for reuse and for tests that hold two engines to the same result
        np.savez(self.out / "global_model.npz", **{k: v.detach().cpu().numpy() for k, v in final_state.items()})
        # rewrite once with the per-round popularity column (the streamed lines stay until then)
        with open(self.out / "metrics.jsonl", "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "summary.json")
        try:
            plot_run(self.rows, self.out / "hr_epsilon.png", k=self.cfg.k)
        except Exception as e:  # a plot must never lose the numbers
            summary["plot_error"] = str(e)


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
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend()
    else:  # no DP in this run: say so rather than draw an empty panel
        ax[1].text(0.5, 0.5, "no differential privacy", ha="center", va="center", transform=ax[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Run outputs: one metrics line per round, a summary with baselines and privacy, and plots."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from .atomic import write_atomic, write_bytes_atomic
from .config import RunConfig
from .eval.metrics import BLENDS, PrequentialCounts, ServeCounts
from .models import reads_features


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


PER_EVENT_BASELINES = ("item_knn", "centralised_mf")  #: baselines that score each round's events per event


def _headline(counts: ServeCounts | PrequentialCounts, blend: int | None
              ) -> tuple[PrequentialCounts, PrequentialCounts, int | None]:
    """The headline (per event, under ``blend``) and round-start counts, and the blend they are under;
    round-start counts alone (serving evaluation or per-event scoring off) stand for both, under no blend."""
    if isinstance(counts, ServeCounts) and (counts.blends[blend or 0].n or not counts.start.n):
        b = blend or 0
        return counts.blends[b], counts.start, b
    start = counts.start if isinstance(counts, ServeCounts) else counts  # per-event scoring off
    return start, start, None


#: the order in which tied blends are preferred (:meth:`RunRecorder.leader`)
PREFER = ("graph+0.01", "graph", "graph+0.1", "graph+1", "features", "model", "start")


class RunRecorder:
    """Writes ``metrics.jsonl`` as rounds finish (flushed, so a crash loses no finished round).

    Nothing in ``out`` is touched before :meth:`begin` (or the first round's line), so a run that fails
    while it starts leaves an earlier run's files as they were; :meth:`finish` replaces every output
    atomically (:mod:`fedrec.atomic`).
    """

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
        self.total_start = PrequentialCounts()
        self.blend_totals = [PrequentialCounts() for _ in BLENDS]  #: per-event counts of every blend so far
        self.t0 = time.time()
        self.info: dict = {}
        self.notes: list[str] = []
        self._f: TextIO = io.StringIO()  # the real file is opened by begin(): nothing is written before
        self._begun = False
        self.per_round: list[PrequentialCounts] = []
        self.drift_rounds: list[PrequentialCounts] = []
        self.probe_tally: dict[int, dict[int, list[int]]] = {}  # item -> round -> [hits, probed]
        self._truth_users: set[int] | None = None
        self._stream, self._no_stream = stream, no_stream
        self._alongside: Any = None  #: the baselines measured in a process of their own (fedrec.eval.alongside)
        self._baselines_when = ""  #: when they were measured, for the summary's timings
        self.features: Any = None  #: the run's public item features (fedrec.data.features.ItemFeatures), if any
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
                "total_start": counts([self.total_start])[0], "blend_totals": counts(self.blend_totals),
                "per_round": counts(self.per_round), "drift_rounds": counts(self.drift_rounds),
                "probe_tally": {str(i): {str(r): t for r, t in by.items()} for i, by in self.probe_tally.items()},
                "notes": self.notes,
            **({"attack": self._attack_summary()} if self._target is not None else {}), "elapsed_s": time.time() - self.t0}

    def load_state_dict(self, d: dict) -> None:
        """Continue from :meth:`state_dict`; :meth:`begin` writes its rows to ``metrics.jsonl`` (later ones dropped)."""
        def counts(xs: list) -> list[PrequentialCounts]:
            return [PrequentialCounts(int(n), float(h), float(g)) for n, h, g in xs]

        self.rows = list(d["rows"])
        self.schedule = [list(s) for s in d["schedule"]]
        self.total = counts([d["total"]])[0]
        self.total_start = counts([d["total_start"]])[0]
        blends = counts(d["blend_totals"])  # written by a version with other blends: start them anew
        self.blend_totals = blends if len(blends) == len(BLENDS) else [PrequentialCounts() for _ in BLENDS]
        self.per_round = counts(d["per_round"])
        self.drift_rounds = counts(d["drift_rounds"])
        self.probe_tally = {int(i): {int(r): list(t) for r, t in by.items()} for i, by in d["probe_tally"].items()}
        self.notes = list(d["notes"]) + self.notes
        self.t0 = time.time() - float(d["elapsed_s"])

    def begin(self) -> None:
        """The run has really started: ``metrics.jsonl`` is replaced by the rows so far (none, or a resumed
        run's), and each round's line is appended from here on."""
        write_bytes_atomic(self.out / "metrics.jsonl", _lines(self.rows))
        self._f.close()
        self._f = open(self.out / "metrics.jsonl", "a")
        self._begun = True
        self._start_alongside()

    def _start_alongside(self) -> None:
        """Measure the baselines alongside the rounds where the ``baselines`` key says so
        (:func:`fedrec.eval.alongside.wanted`), fed the rounds so far (a resumed run's) at once."""
        from .eval.alongside import Alongside, wanted

        if self._stream is None or not wanted(self.cfg.baselines, len(self._stream.log)):
            return
        try:
            self._alongside = Alongside(self._stream, self._baseline_measures(), self.cfg.k)
        except Exception as e:  # the baselines are then measured after the rounds: never fatal
            self.note(f"the baselines could not be measured alongside the rounds ({type(e).__name__}: {e}); they "
                      "are measured after them")
            return
        for row in self.schedule:
            self._alongside.feed(row)

    def abort(self) -> None:
        """The run ends without its summary (an error, Ctrl-C): the baselines' process, if any, is stopped."""
        if self._alongside is not None:
            self._alongside.close()

    def _scored(self, devices: list[int]) -> None:
        """A round's scored devices: in the schedule, and to the baselines measured alongside."""
        self.schedule.append(devices)
        if self._alongside is not None:
            self._alongside.feed(devices)

    def note(self, msg: str) -> None:
        """Something the user must know (budget spent, ledger continued): on screen and in the summary."""
        self.notes.append(msg)
        print(f"fedrec: {msg}", flush=True)

    def leader(self) -> int:
        """The blend devices serve next (:data:`fedrec.eval.metrics.BLENDS`): the one with the most per-event
        hits in the rounds so far (follow the leader). Ties, round 1 included, go to the first in :data:`PREFER`
        that may compete: in round 1 no graph was published yet, so every graph blend scored as the model alone
        and tied; the graph with its ties broken by the model (``graph+0.01``) is then the one to try first. It
        ranks as the graph where the graph ranks, and as the model where the first release has nothing to rank
        by (under noise no item passes the candidates' threshold yet: the graph alone would tie every item)."""
        # without an item graph the graph blends rank as the model alone: only the model's two states compete
        allowed = [BLENDS.index(b) for b in PREFER if self.cfg.graph or b in ("model", "start")]
        hits = [self.blend_totals[i].hits for i in allowed]
        return allowed[int(np.argmax(hits))]

    def round(self, r: int, *, done: list[int], counts: ServeCounts | PrequentialCounts, failed: list, extra: dict,
              per_device: list | None = None, probes: list | None = None, scored: list[int] | None = None) -> dict:
        """One finished round. ``counts`` are the round's scored events: served (per event under every
        blend, and at the round's start) or, with serving evaluation off, the training devices' round-start
        counts; ``scored`` the devices whose events they are (default: the devices that trained), for
        baselines scored on the same events."""
        self._scored(list(done if scored is None else scored))
        k = self.cfg.k
        head, start, b = _headline(counts, self.leader())
        per = [(d, _headline(c, b)[0]) for d, c in per_device or []]
        if isinstance(counts, ServeCounts):
            for mine, got in zip(self.blend_totals, counts.blends, strict=True):
                mine.add(got)
        self.total.add(head)
        self.total_start.add(start)
        row: dict[str, Any] = {"round": r, f"hr@{k}": _finite(head.hr), f"ndcg@{k}": _finite(head.ndcg_mean),
                               f"start_hr@{k}": _finite(start.hr), f"start_ndcg@{k}": _finite(start.ndcg_mean),
                               "blend": BLENDS[b] if b is not None else None,
                               "events_scored": head.n, "devices": len(done), "failed": len(failed)}
        row.update(self._freshness_row(r, head, per, probes or []))
        row.update(extra)
        if failed:
            row["failures"] = [f"{who}: {why}" for who, why in failed[:20]]
        return self._write(row)

    def skip(self, r: int, *, reason: str, wall_s: float) -> dict:
        self._scored([])
        k = self.cfg.k
        return self._write({"round": r, f"hr@{k}": None, f"ndcg@{k}": None, f"start_hr@{k}": None,
                            f"start_ndcg@{k}": None, "blend": None, "events_scored": 0, "devices": 0,
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
            if "uptake_new" in out:  # what "new" counted (fedrec.eval.freshness.tracked_items)
                out["uptake_new"]["items_are"] = "launched" if "late" in groups else "first seen after round 1"
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
        if not self._begun:
            self.begin()
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
        metrics = self._metrics(last)
        # the summary's own (the CLI prints it below the table); not in self.notes, which the checkpoint keeps
        why = below_popularity(cfg, metrics.get(hr_key), baselines, self.rows)
        summary = {
            "config": cfg.to_flat(),
            "data": {"source": cfg.data or "synthetic world", "n_items": self.info.get("n_items"),
                     "population": self.info.get("population"),
                     "item_features": {**self.features.info(), "model_reads_them": reads_features(cfg.model)}
                     if self.features is not None else None},
            "rounds": len(self.rows),
            "metrics": metrics,
            "baselines": baselines,
            "privacy": privacy,
            "freshness": self.freshness(),
            "notes": self.notes + ([why] if why else []),
            **({"attack": self._attack_summary()} if self._target is not None else {}),
            "timings": {"wall_s": round(time.time() - self.t0, 2),
                        "mean_round_s": round(float(np.mean([r["wall_s"] for r in self.rows])), 3) if self.rows else 0,
                        "aggregation_device": self.info.get("device"),
                        **({"baselines": self._baselines_when} if self._baselines_when else {})},
            "bytes": {"up": int(sum(r.get("bytes_up", 0) for r in self.rows)),
                      "down": int(sum(r.get("bytes_down", 0) for r in self.rows))},
        }
        self._write_files(final_state, summary)
        return summary

    def _metrics(self, last: list[float]) -> dict:
        """The summary's metrics: the headline (per event), the round-start one, and every blend's."""
        k, served = self.cfg.k, any(c.n for c in self.blend_totals)
        per_event = ("per event (test-then-train): each event ranked by the device's state through the event "
                     "before it and the newest global version it holds; full ranking, items had before excluded")
        return {f"hr@{k}": _finite(self.total.hr), f"ndcg@{k}": _finite(self.total.ndcg_mean),
                "events_scored": self.total.n, f"last5_hr@{k}": float(np.mean(last)) if last else None,
                f"start_hr@{k}": _finite(self.total_start.hr), f"start_ndcg@{k}": _finite(self.total_start.ndcg_mean),
                "blends": {w: _finite(c.hr) for w, c in zip(BLENDS, self.blend_totals, strict=True)} if served
                else None,
                "what": per_event if served else "per-event scoring or serve-eval is off: the round-start metric",
                "what_start": "at the round's start: every event of the round ranked by the state the device had "
                              "when the round began",
                **self._panel(),
                "what_blends": "per-event hr of each blend: the item graph plus w x the model (graph+w), the model "
                               "alone (model), the model at the round's start (start); each round serves the one "
                               "with the most hits in the rounds before"}

    def _panel(self) -> dict:
        """``served_panel`` where the run served a panel of its devices (:func:`fedrec.serving.serve_panel`)."""
        n = self._stream.n_devices if self._stream is not None else 0
        if self.cfg.method != "federated" or not self.cfg.serve_eval or not 0 < self.cfg.serve_panel < n:
            return {}
        return {"served_panel": {"devices": self.cfg.serve_panel, "of": n,
                                 "what": "every figure per event, at the round's start, per blend and of every "
                                         "baseline is over the events of a fixed panel of devices drawn from the "
                                         "seed (serve-panel), a uniform sample of the population; the blend served "
                                         "each round, the adaptive lr schedule and bytes_down_serving follow the "
                                         "panel's counts"}}

    def _baselines(self) -> dict:
        """The baselines (:meth:`_baseline_runs`), each scored on the same events as the model; per round in the
        rows too (``<name>_hr@K``). One that cannot be measured is said (``unavailable``), never fatal."""
        from .eval.alongside import measure

        if self._stream is None:  # the server may not see the data (deployment): say so, do not fail the run
            return {"popularity": {"unavailable": f"RuntimeError: {self._no_stream}"}}
        got = self._alongside.results() if self._alongside is not None else None
        self._baselines_when = "alongside the rounds, in a process of their own" if got is not None else \
            "after the rounds" + (" (the process measuring them alongside died)" if self._alongside else "")
        if got is None:
            got = measure(self._stream, self.schedule, self.cfg.k, self._baseline_measures())
        out: dict[str, dict] = {}
        for name, _, _, extra, what in self._baseline_runs():
            rounds = got.get(name, "it scores every device's events of each round per event, as serving does; "
                                   "serve-eval or per-event is off in this run")
            if isinstance(rounds, str):
                out[name] = {"unavailable": rounds}
                continue
            total = PrequentialCounts()
            for c in rounds:
                total.add(c)
            out[name] = {f"hr@{self.cfg.k}": _finite(total.hr), f"ndcg@{self.cfg.k}": _finite(total.ndcg_mean),
                         "events_scored": total.n, **extra, "what": what}
            for row, c in zip(self.rows, rounds, strict=False):
                row[f"{name}_hr@{self.cfg.k}"] = _finite(c.hr)
        return out

    def _baseline_measures(self) -> list[tuple[str, str, dict]]:
        """The baselines this run measures (:data:`fedrec.eval.alongside.Run`): the per-event ones only where the
        run serves per event."""
        per_event = self.cfg.serve_eval and self.cfg.per_event
        return [(name, fn, kw) for name, fn, kw, _, _ in self._baseline_runs()
                if per_event or name not in PER_EVENT_BASELINES]

    def _baseline_runs(self) -> list[tuple[str, str, dict, dict, str]]:
        """Each baseline: its name, its function in :mod:`fedrec.eval.baselines` and that function's keywords,
        what its summary adds, what it is."""
        cfg, w = self.cfg, self.cfg.freshness_window
        feats = self.features.normalised() if self.features is not None else None
        return [
            ("popularity", "popularity_prequential", {}, {},
             "counts of all events in earlier rounds, centralised, non-private"),
            ("recent_popularity", "popularity_prequential", {"window": w}, {"window": w},
             f"counts of the events of the last {w} rounds only"),
            ("item_knn", "item_knn_prequential",
             {"window": cfg.graph_window, "neighbours": cfg.graph_neighbours, "context": cfg.session_len,
              "features": feats},
             {}, "centralised item-kNN: co-occurrence of every event of earlier rounds, the same per-event session "
                 f"scoring as the devices{' with the same public item features' if feats is not None else ''} "
                 "(the non-private ceiling of the item graph)"),
            ("centralised_mf", "centralised_mf_prequential",
             {"dim": cfg.dim, "seed": cfg.seed, "context": cfg.session_len, "init_scale": cfg.init_scale,
              "replay": cfg.replay_rounds},
             {}, "centralised BPR MF on every event of earlier rounds, per-event user refit (the non-private "
                 "ceiling of the model)"),
        ]

    def _write_files(self, final_state: dict, summary: dict) -> None:
        """Every output, each replaced atomically; ``summary.json`` last, so it stands for all of them."""
        try:
            write_atomic(self.out / "hr_epsilon.png", lambda f: plot_run(self.rows, f, k=self.cfg.k))
        except Exception as e:  # a plot must never lose the numbers
            summary["plot_error"] = str(e)
        # the final global model, for reuse and for tests that hold two engines to the same result
        arrays = {k: v.detach().cpu().numpy() for k, v in final_state.items()}
        write_atomic(self.out / "global_model.npz", lambda f: np.savez(f, **arrays))
        # rewrite once with the per-round baseline columns (the streamed lines stay until then)
        write_bytes_atomic(self.out / "metrics.jsonl", _lines(self.rows))
        write_bytes_atomic(self.out / "summary.json", json.dumps(summary, indent=2).encode())


def _lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def plot_run(rows: list[dict], path: Path | BinaryIO, *, k: int = 10) -> None:
    """HR@K per round (the model per event and at the round's start, and the baselines) and ε over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(r, [row[f"hr@{k}"] for row in rows], marker="o", ms=3, label="federated, per event")
    if any(row.get(f"start_hr@{k}") is not None for row in rows):
        ax[0].plot(r, [row.get(f"start_hr@{k}") for row in rows], ls=":", label="federated, at the round's start")
    for name, style, label in (("popularity", "--", "popularity"), ("item_knn", "-.", "item-kNN (centralised)"),
                               ("centralised_mf", (0, (1, 3)), "MF (centralised)")):
        if rows and f"{name}_hr@{k}" in rows[0]:
            ax[0].plot(r, [row[f"{name}_hr@{k}"] for row in rows], ls=style, label=label)
    ax[0].set(xlabel="round", ylabel=f"prequential HR@{k}", title="Recommendation quality")
    ax[0].legend(fontsize=7, framealpha=0.7)
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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def below_popularity(cfg: RunConfig, hr: float | None, baselines: dict, rows: list[dict]) -> str | None:
    """A note where the headline HR ends below popularity or recent popularity on the same events, saying what the
    run's own figures show of why and what lifts it (None where it does not end below, or a figure is missing)."""
    k = f"hr@{cfg.k}"
    pop, recent = ((baselines.get(n) or {}).get(k) for n in ("popularity", "recent_popularity"))
    if hr is None or pop is None or recent is None or hr >= max(pop, recent):
        return None
    out = (f"the per-event HR@{cfg.k} {hr:.4f} is below popularity's {pop:.4f} or recent popularity's {recent:.4f} on "
           "the same events")
    if cfg.privacy == "none":
        return out + "; summary.json's metrics.blends shows which of the served sources falls short (docs/online.md)"
    snr = [r["snr"] for r in rows if r.get("snr") is not None]
    unit = {"user": "user-level", "event": "event-level", "both": "user- and event-level"}[cfg.privacy]
    why = (f": the rounds' summed updates had {np.mean(snr):.2g}x the norm of their noise on average (snr in "
           "metrics.jsonl), so the released model is mostly noise" if snr and np.mean(snr) < 1 else
           f": under {unit} DP at this epsilon the noise outweighs what a round's devices add")
    smaller = ", or a smaller unit (--privacy event)" if cfg.privacy != "event" else ""
    return (out + why + f"; more devices a round (the noise of a sum does not grow with them), a larger epsilon{smaller} "
            "give the release more signal per unit of noise (docs/privacy.md)")

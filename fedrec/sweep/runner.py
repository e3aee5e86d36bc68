"""Run a sweep: every cell x seed as its own ``fedrec simulate`` process, resumable, in parallel.

Each run writes into ``OUT/cells/<cell>/seed-<seed>/``; a run counts as finished when its
``summary.json`` exists (written last, atomically), so a killed sweep restarts where it stopped and
never redoes a finished run. An unfinished run's folder is cleared before it runs again (its
half-written outputs were never results). When all runs are done, ``results.csv`` gets one row per
cell x seed with every metric, and the report (tables, plots, ``report.md``) is built from it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from ..config import ConfigError, dump_toml
from ..eval.freshness import adaptation_lag
from .report import read_results, write_report, write_results
from .spec import Cell, SweepSpec, load_sweep


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.name / f"seed-{seed}"


def _launch(spec: SweepSpec, cell: Cell, seed: int, out: Path, procs: dict, lock: threading.Lock) -> tuple[str, int, str]:
    d = run_dir(out, cell, seed)
    if d.exists():
        shutil.rmtree(d)  # an unfinished earlier attempt: start clean (fresh ledger, fresh outputs)
    d.mkdir(parents=True)
    cfg = spec.config(cell, seed, d)
    (d / "config.toml").write_text(dump_toml(cfg.to_flat()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(d / "log.txt", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "fedrec.cli", "simulate", "--config", str(d / "config.toml"),
                              "--no-progress"], stdout=log, stderr=subprocess.STDOUT, env=env)
        with lock:
            procs[(cell.name, seed)] = p
        rc = p.wait()
        with lock:
            procs.pop((cell.name, seed), None)
    if rc != 0 or not (d / "summary.json").is_file():
        tail = (d / "log.txt").read_text()[-600:].strip().splitlines()
        return cell.name, seed, f"exit {rc}: {tail[-1] if tail else 'no output'} (see {d / 'log.txt'})"
    return cell.name, seed, ""


def run_sweep(path: str | Path, out: str | Path | None = None, jobs: int = 2, progress: bool = True,
              cells: str | None = None) -> Path:
    """Run (or resume) the sweep in ``path``, only the cells matching ``cells`` if given (:func:`chosen`); returns
    the sweep folder holding ``report.md`` (over every cell with results)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    spec = load_sweep(path)
    picked = chosen(spec, cells)
    todo = [(c, s) for c in picked for s in spec.seeds]
    out = Path(out) if out else Path("runs") / spec.path.stem
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; a sweep writes a folder there.")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, out / "sweep.toml")
    done = [(c, s) for c, s in todo if _finished(spec, c, s, out)]
    pending = [(c, s) for c, s in todo if (c, s) not in done]
    console = Console()
    console.print(f"fedrec sweep {spec.path}: {len(picked)} cells x {len(spec.seeds)} seeds = {len(todo)} runs; "
                  f"{len(done)} already finished; {jobs} at a time -> {out}")
    failures: list[str] = []
    procs: dict = {}
    lock = threading.Lock()
    bar = Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        with bar:
            task = bar.add_task("", total=len(todo), completed=len(done))
            futs = {pool.submit(_launch, spec, c, s, out, procs, lock): (c, s) for c, s in pending}
            t0 = time.time()
            while futs:
                finished, _ = wait(futs, return_when=FIRST_COMPLETED)
                for f in finished:
                    futs.pop(f)
                    name, seed, err = f.result()
                    if err:
                        failures.append(f"{name} seed {seed}: {err}")
                    bar.update(task, advance=1, description=f"{name} seed {seed} {'FAILED' if err else 'done'} "
                                                            f"({time.time() - t0:.0f} s)")
                    if not progress:
                        print(f"{name} seed {seed}: {'FAILED ' + err if err else 'done'}", flush=True)
    except KeyboardInterrupt:
        with lock:
            for p in procs.values():
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    rows = collect(spec, out)
    failed = f"{len(failures)} run(s) failed" + ("; the report covers the others" if rows else "")
    if failures and not rows:  # nothing to report on: the earlier results and report stay as they were
        raise ConfigError(f"{failed}. First: {failures[0]}")
    write_results(rows, out / "results.csv")
    build_report(out, spec)
    if failures:
        raise ConfigError(f"{failed}. First: {failures[0]}")
    return out


def _finished(spec: SweepSpec, cell: Cell, seed: int, out: Path) -> bool:
    """Whether the run of ``cell`` x ``seed`` has its summary, made with the config the sweep file gives it now (a run
    of another config is a user error: its results would stand for this cell's)."""
    d = run_dir(out, cell, seed)
    if not (d / "summary.json").is_file():
        return False
    want = dump_toml(spec.config(cell, seed, d).to_flat())
    saved = (d / "config.toml").read_text() if (d / "config.toml").is_file() else ""
    if saved != want:
        raise ConfigError(f"{d} holds a run of another config than cell '{cell.name}' of {spec.path} gives now; use a "
                          f"new --out, or delete {d} to run it again.")
    return True


def chosen(spec: SweepSpec, pattern: str | None) -> list[Cell]:
    """The cells of ``spec`` whose names match the shell-style ``pattern`` (all where None); none is a user error."""
    if pattern is None:
        return list(spec.cells)
    got = [c for c in spec.cells if fnmatch.fnmatchcase(c.name, pattern)]
    if not got:
        raise ConfigError(f"--cells {pattern!r} matches no cell of {spec.path}; its cells are "
                          f"{', '.join(c.name for c in spec.cells)}.")
    return got


def collect(spec: SweepSpec, out: Path) -> list[dict]:
    """One row per finished cell x seed, every metric; adaptation lag against the reference cell."""
    runs = {}
    for c in spec.cells:
        for s in spec.seeds:
            f = run_dir(out, c, s) / "summary.json"
            if f.is_file():
                m = run_dir(out, c, s) / "metrics.jsonl"
                try:
                    runs[(c.name, s)] = (c, json.loads(f.read_text()),
                                         [json.loads(line) for line in m.read_text().splitlines() if line.strip()])
                except (OSError, ValueError) as e:
                    raise _damaged(run_dir(out, c, s), e) from None
    rows = []
    for (_, seed), (cell, summ, per_round) in runs.items():
        ref = runs.get((spec.reference, seed))
        try:
            rows.append(result_row(cell, seed, summ, per_round, ref[2] if ref else None, spec.path.stem))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _damaged(run_dir(out, cell, seed), e) from None
    return rows


def _damaged(d: Path, e: Exception) -> ConfigError:
    return ConfigError(f"{d}: its summary.json or metrics.jsonl is damaged ({type(e).__name__}: {e}); delete {d} to "
                       "run it again.")


def privacy_columns(unit: str, cfg: dict, priv: dict) -> dict:
    """Where a run adds its noise (``noise``), whether it averages per item row, and whom it trusts (``trust``).

    ``noise`` is ``none``, ``device`` (event level, DP-SGD on each device; also when an older summary has no
    ``privacy.event.noise``), ``aggregate-server`` or ``aggregate-secagg`` (event level, noise once on the cohort's
    sum), ``user`` or ``user-secagg`` (user level without or with secure aggregation); both units join with ``+``.
    """
    parts, trust = [], []
    for u in ("user", "event") if unit == "both" else (unit,):
        block = priv.get(u) or {}
        if u == "user":
            parts.append("user-secagg" if cfg.get("secure-aggregation") else "user")
        elif u == "event":
            parts.append(block.get("noise", "device"))
        if block.get("trust"):
            trust.append(block["trust"])
    return {"noise": "+".join(parts) or "none", "row_average": bool(cfg.get("row-average", False)),
            "trust": "; ".join(trust) or ("no differential privacy" if not parts else None)}


def result_row(cell: Cell, seed: int, summ: dict, per_round: list[dict], ref_rounds: list[dict] | None,
               scenario: str) -> dict:
    cfg, fresh, priv = summ["config"], summ.get("freshness", {}), summ.get("privacy", {})
    k = cfg["k"]
    unit = cell.unit
    p = priv.get(unit, {}) if unit in ("user", "event") else {}
    drift = fresh.get("drift_round")
    key = f"drift_whr@{k}" if drift else f"whr@{k}"
    lag = censored = lag_max = None
    # the lag compares round by round, so only against a reference cut into the same rounds (a grid
    # over the round interval needs one non-private reference per interval: left empty otherwise)
    if drift and ref_rounds is not None and len(ref_rounds) == len(per_round):
        series = [r.get(key) for r in per_round]
        reference = [r.get(key) for r in ref_rounds]
        n = min(len(series), len(reference))
        lag = adaptation_lag(series[:n], reference[:n], drift)
        lag_max = n - drift
        censored = int(lag is None)
    up = fresh.get("uptake_new") or {}
    burst = fresh.get("uptake_burst") or {}
    rounds = summ.get("rounds") or cfg["rounds"]
    devices = sum(r.get("devices", 0) for r in per_round) or 1
    return {
        "cell": cell.name, "seed": seed, "scenario": scenario, "method": cell.method, "unit": unit,
        **privacy_columns(unit, cfg, priv),
        "epsilon_target": cell.epsilon_target,
        "epsilon": float(p["epsilon"]) if p.get("epsilon") is not None else (math.inf if unit == "none" else None),
        "delta": cfg["delta"], "accountant": cfg["accountant"],
        "noise_multiplier": float(p.get("noise_multiplier", 0.0)), "cohort": cfg["cohort"],
        "population": (summ.get("data") or {}).get("population"), "rounds": cfg["rounds"],
        "events_per_round": summ["metrics"].get("events_scored", 0) / max(rounds, 1),
        "lr_schedule": cfg.get("lr-schedule", "fixed"),
        f"hr@{k}": summ["metrics"].get(f"hr@{k}"), f"ndcg@{k}": summ["metrics"].get(f"ndcg@{k}"),
        f"start_hr@{k}": summ["metrics"].get(f"start_hr@{k}"),
        "whr_final": fresh.get(f"whr@{k}_final"),
        f"popularity_hr@{k}": (summ["baselines"].get("popularity") or {}).get(f"hr@{k}"),
        f"recent_popularity_hr@{k}": (summ["baselines"].get("recent_popularity") or {}).get(f"hr@{k}"),
        f"item_knn_hr@{k}": (summ["baselines"].get("item_knn") or {}).get(f"hr@{k}"),
        "adaptation_lag": lag, "lag_censored": censored, "lag_max": lag_max,
        "uptake_median": up.get("median_rounds"), "uptake_rate": up.get("rate"),
        "uptake_items": up.get("items_are", "first seen after round 1"),
        "burst_uptake_median": burst.get("median_rounds"), "burst_uptake_rate": burst.get("rate"),
        "staleness_mean": fresh.get("staleness_mean"), "wall_s": summ["timings"]["wall_s"],
        "bytes_up_per_device_round": summ["bytes"]["up"] / devices,
    }


def build_report(out: Path, spec: SweepSpec | None = None) -> Path:
    """Tables, plots and report.md from ``out/results.csv`` (and ``out/sweep.toml`` for the words)."""
    out = Path(out)
    if spec is None and (out / "sweep.toml").is_file():
        spec = load_sweep(out / "sweep.toml")
    read_results(out / "results.csv")  # fail here, naming the line, on a malformed file
    drift = None
    for c in (spec.cells if spec else []):
        for s in (spec.seeds if spec else ()):  # spec is set here; mypy cannot tell
            f = run_dir(out, c, s) / "summary.json"
            if drift is None and f.is_file():
                drift = json.loads(f.read_text()).get("freshness", {}).get("drift_round")
    note = (spec.privacy_note if spec else "") or (
        "User-level ε protects all of one device's events over the whole run (DP-FedAvg: the device clips its "
        "whole delta, the server adds Gaussian noise, Poisson-sampled cohorts); event-level ε protects each "
        "single event, reported as the maximum over devices, with the noise added on each device (Opacus DP-SGD) "
        "or once to the cohort's sum of clipped gradients (by a trusted server, or as SecAgg+ shares of the "
        "devices). Each series below says whom it trusts.")
    return write_report(out, title=spec.title if spec else out.name, scenario_text=spec.scenario if spec else "",
                        drift_round=drift, privacy_note=note)

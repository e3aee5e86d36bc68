"""Turn the results of a privacy-budget sweep into tables, PNG plots and a ``report.md``.

The only input is ``results.csv`` (one row per cell x seed) plus the per-round ``metrics.jsonl`` files, and the
code is numpy/scipy/matplotlib only, so a report can be rebuilt from a finished sweep on any machine without Flower.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from ..atomic import write_bytes_atomic

PARAM_COLUMNS = ["cell", "seed", "scenario", "method", "unit", "noise", "row_average", "epsilon_target", "epsilon",
                 "delta", "accountant", "noise_multiplier", "cohort", "population", "rounds", "events_per_round", "lr_schedule",
                 "trust"]
STR_COLUMNS = {"cell", "scenario", "method", "unit", "noise", "accountant", "lr_schedule", "trust"}
INT_COLUMNS = {"seed", "cohort", "rounds", "lag_censored"}
BOOL_COLUMNS = {"row_average"}
# Metric columns the sweep is known to write: a bad value there is an error, not a sign of a non-metric column.
KNOWN_METRICS = ["hr@10", "start_hr@10", "ndcg@10", "whr_final", "popularity_hr@10", "item_knn_hr@10",
                 "adaptation_lag", "lag_censored", "lag_max",
                 "uptake_median", "uptake_rate", "staleness_mean", "wall_s", "bytes_up_per_device_round"]
DEFAULT_METRICS = ["adaptation_lag", "uptake_median", "uptake_rate", "whr_final", "hr@10", "start_hr@10", "ndcg@10",
                   "staleness_mean", "epsilon", "wall_s"]
LABELS = {"adaptation_lag": "adaptation lag (rounds)", "uptake_median": "uptake median (rounds)",
          "uptake_rate": "uptake rate", "whr_final": "windowed HR@10 (end)", "hr@10": "HR@10 (per event)",
          "start_hr@10": "HR@10 (round start)", "ndcg@10": "NDCG@10 (per event)",
          "staleness_mean": "staleness", "epsilon": "ε spent", "wall_s": "wall (s)"}
BASELINES = ("static", "centralised")
# Where the noise is added (the ``noise`` column), as the short trust label of the tables, in series order.
NOISE_LABELS = {"none": "no DP", "user": "user-level, trusted server",
                "user-secagg": "user-level, SecAgg+ (server sees only the sum)",
                "device": "device noise (protects against the server)",
                "aggregate-server": "noise at the aggregate (trusted server)",
                "aggregate-secagg": "SecAgg+ shares (server sees only the noisy sum)"}
# The same in a series name; the unit's default placement is named only beside another placement of the unit.
NOISE_NAMES = {"user": "no secure aggregation", "user-secagg": "SecAgg+", "device": "device noise",
               "aggregate-server": "noise at the aggregate", "aggregate-secagg": "SecAgg+ noise shares"}
DEFAULT_NOISE = {"none": "none", "user": "user", "event": "device"}
# Series colours skip C2 and C3, the baselines' dashed lines.
COLOURS = ["C0", "C1", "C4", "C5", "C6", "C8", "C9", "C7"]
MARKERS = {"aggregate-server": "D", "aggregate-secagg": "v", "user-secagg": "v"}
DPI = 110
MAX_CURVES = 12
MISSING = "—"



def _atomic_write(path: Path, data: str | bytes) -> None:
    """Replace ``path`` whole (:func:`fedrec.atomic.write_bytes_atomic`): readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)


def _parse(value: str, col: str, kind: str, where: str) -> str | bool | int | float | None:
    if value == "":
        return None
    if kind == "str":
        return value
    if kind == "bool":
        if value.lower() in ("1", "true"):
            return True
        if value.lower() in ("0", "false"):
            return False
        raise ValueError(f"{where}: column '{col}' holds {value!r}, which is not a boolean (1 or 0).")
    try:
        if kind == "int":
            try:
                return int(value)
            except ValueError:
                f = float(value)  # tolerate "3.0" from other writers, but not "3.5"
                if not f.is_integer():
                    raise
                return int(f)
        return float(value)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise ValueError(f"{where}: column '{col}' holds {value!r}, which is not {what}.") from None


def read_results(path: str | os.PathLike) -> list[dict]:
    """Read a sweep's ``results.csv``.

    Parameters
    ----------
    path : path-like
        The CSV file (header row, then one row per cell x seed).

    Returns
    -------
    list of dict
        One dict per row: ``seed``/``cohort``/``rounds``/``lag_censored`` as int, ``row_average`` as bool, the
        string parameters as str, every other known or numeric column as float (``inf`` kept), and ``None`` for
        empty fields. Unknown columns whose values are not all numbers are kept as strings.

    Raises
    ------
    ValueError
        When the file is malformed; the message names ``path:line``.
    """
    path = Path(path)
    header, raw = _read_csv_rows(path)
    kinds = _column_kinds(header, [fields for _, fields in raw])
    return [{col: _parse(v, col, k, f"{path}:{line}") for col, k, v in zip(header, kinds, fields, strict=True)}
            for line, fields in raw]


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and ``(line, fields)`` of each non-blank row, checked for shape only."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}:1: the file is empty, expected a header row.")
            for col in ("cell", "seed"):
                if col not in header:
                    raise ValueError(f"{path}:1: the header has no '{col}' column.")
            if len(set(header)) != len(header):
                raise ValueError(f"{path}:1: the header repeats a column name.")
            raw: list[tuple[int, list[str]]] = []
            for fields in reader:
                if not fields:  # a blank line carries no row
                    continue
                if len(fields) != len(header):
                    raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(fields)}.")
                raw.append((reader.line_num, fields))
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e}).") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{reader.line_num + 1}: not UTF-8 text (byte {e.start} of a read); results.csv is "
                             "UTF-8.") from None
    if not raw:
        raise ValueError(f"{path}: a header and no result rows; there is nothing to report.")
    return header, raw


def _column_kinds(header: list[str], rows: list[list[str]]) -> list[str]:
    """``"str"``, ``"int"`` or ``"float"`` for each column: known columns by name, unknown ones by content."""

    def numeric(i: int) -> bool:
        try:
            for fields in rows:
                if fields[i] != "":
                    float(fields[i])
        except ValueError:
            return False
        return True

    kinds = []
    for i, col in enumerate(header):
        if col in STR_COLUMNS:
            kinds.append("str")
        elif col in INT_COLUMNS:
            kinds.append("int")
        elif col in BOOL_COLUMNS:
            kinds.append("bool")
        elif col in PARAM_COLUMNS or col in KNOWN_METRICS or numeric(i):
            kinds.append("float")
        else:
            kinds.append("str")  # an unknown non-numeric column: keep it, but it is not a metric
    return kinds


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))  # shortest string that parses back to the same float: 'inf', '1e-05', '0.1'
    return str(value)


def write_results(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write rows as CSV, the inverse of :func:`read_results` (temp file + ``os.replace``, never half a file).

    Parameters
    ----------
    rows : sequence of dict
        Rows as returned by :func:`read_results` (or :func:`summarize`).
    path : path-like
        Destination. Columns: the parameter columns present in :data:`PARAM_COLUMNS` order, then the rest in
        first-seen order; ``None`` becomes an empty field and floats use ``repr``, so a round trip is exact.
    """
    present = {k for r in rows for k in r}
    columns = [c for c in PARAM_COLUMNS if c in present]
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_text(r.get(c)) for c in columns])
    _atomic_write(Path(path), buf.getvalue())



def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float | None, float | None, int]:
    """Mean and half-width of the Student-t confidence interval.

    Parameters
    ----------
    values : iterable of float or None
        One value per seed; ``None`` and NaN are dropped.
    confidence : float
        Two-sided confidence level in (0, 1).

    Returns
    -------
    (mean, half_width, n)
        ``half_width`` is ``t.ppf((1 + confidence) / 2, n - 1) * s / sqrt(n)``; it is ``None`` when ``n == 1`` or a
        value is infinite, and both are ``None`` when ``n == 0``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    xs = np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    n = int(xs.size)
    if n == 0:
        return None, None, 0
    mean = float(xs.mean())
    if n == 1 or not np.isfinite(xs).all():  # one seed, or ε = ∞: no spread to speak of
        return mean, None, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * xs.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def _row_lag(row: dict) -> float | None:
    # a censored seed never recovered: its largest observable lag is a lower bound, which is what we average
    if row.get("lag_censored"):
        return row["lag_max"] if row.get("lag_max") is not None else row.get("adaptation_lag")
    return row.get("adaptation_lag")


def summarize(rows: Sequence[dict], metrics: Sequence[str] = DEFAULT_METRICS) -> list[dict]:
    """One summary dict per cell, in first-seen cell order.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``results.csv`` (one per cell x seed).
    metrics : sequence of str
        Metric columns to summarise.

    Returns
    -------
    list of dict
        The parameter columns of the cell's first row, ``n_seeds``, and per metric ``<m>_mean``, ``<m>_ci`` (95%
        half-width) and ``<m>_n``. Censored adaptation lags count at ``lag_max`` and ``adaptation_lag_censored``
        says how many seeds were censored.
    """
    groups: dict[object, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("cell"), []).append(r)
    out = []
    for rs in groups.values():
        s = {c: rs[0].get(c) for c in PARAM_COLUMNS if c in rs[0]}
        s["n_seeds"] = len(rs)
        for m in metrics:
            vals = [_row_lag(r) if m == "adaptation_lag" else r.get(m) for r in rs]
            s[f"{m}_mean"], s[f"{m}_ci"], s[f"{m}_n"] = mean_ci(vals)
            if m == "adaptation_lag":
                s["adaptation_lag_censored"] = sum(1 for r in rs if r.get("lag_censored") and _row_lag(r) is not None)
        out.append(s)
    return out



def _sig(x: float | None) -> str:
    """Three significant digits in fixed notation where that stays short."""
    if x is None or math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    r = float(f"{x:.3g}")  # round first, so 9.996 becomes 10.0 and not 10.00
    if r == 0:
        return "0"
    mag = math.floor(math.log10(abs(r)))
    if mag < -3 or mag >= 6:
        return f"{r:.2e}"
    return f"{r:.{max(0, 2 - mag)}f}"


def _eps(x: float | None) -> str:
    return MISSING if x is None else "∞" if math.isinf(x) else f"{x:g}"


def _noise(s: dict) -> str:
    """Where a cell adds its noise; rows written before the ``noise`` column get their unit's default."""
    if s.get("noise"):
        return str(s["noise"])
    units = ("user", "event") if s.get("unit") == "both" else str(s.get("unit") or "none").split("+")
    return "+".join(DEFAULT_NOISE.get(u, u) for u in units)


def _row_avg(s: dict) -> bool:
    return bool(s.get("row_average"))


def noise_label(s: dict) -> str:
    """The short trust label of a cell (``"noise at the aggregate (trusted server)"``) for tables."""
    return " + ".join(NOISE_LABELS.get(part, part) for part in _noise(s).split("+"))


def format_stat(summary: dict, metric: str) -> str:
    """``mean ± ci`` of a metric in a :func:`summarize` dict (3 significant digits, "≥" for a censored lag)."""
    mean, ci = summary.get(f"{metric}_mean"), summary.get(f"{metric}_ci")
    if mean is None:
        return MISSING
    text = _sig(mean) + (f" ± {_sig(ci)}" if ci is not None else "")
    return "≥" + text if metric == "adaptation_lag" and summary.get("adaptation_lag_censored") else text


def write_tables(rows: Sequence[dict], out_dir: str | os.PathLike) -> str:
    """Write ``summary.csv`` and ``tables.md`` into ``out_dir`` and return the Markdown.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``results.csv``; the same rows always give byte-identical files.
    out_dir : path-like
        Destination folder (created if needed).
    """
    out = Path(out_dir)
    summary = summarize(rows)
    write_results(summary, out / "summary.csv")
    metrics = [m for m in DEFAULT_METRICS if m != "epsilon"]  # ε spent has its own column
    sizes = len({_population(s) for s in summary}) > 1  # a column for the population where it varies
    head = ["cell", *(["devices", "cohort"] if sizes else []), "unit", "noise (trust)", "row avg", "ε target",
            "ε spent", *[LABELS.get(m, m) for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        where = [f"{_population(s) or 0:,}", str(s.get("cohort"))] if sizes else []
        vals = [str(s.get("cell")), *where, s.get("unit") or MISSING, noise_label(s), "yes" if _row_avg(s) else "no",
                _eps(s.get("epsilon_target")), _sig(s.get("epsilon_mean")), *[format_stat(s, m) for m in metrics]]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in vals) + " |")
    lines += ["", "Mean ± half-width of the 95% Student-t interval over seeds; ≥: some seeds never recovered and "
                  "count at the largest lag observable in their run (a lower bound). Noise (trust): where the noise "
                  "is added and whom that trusts; row avg: per-row averaging (without DP each item row's step scaled up while the run has heard of it less than "
                  "of the average row; under event noise at the aggregate each row divided by its own noisy count)."]
    text = "\n".join(lines) + "\n"
    _atomic_write(out / "tables.md", text)
    return text



def _private(s: dict) -> bool:
    eps = s.get("epsilon_target")
    return s.get("unit") not in (None, "none") and eps is not None and math.isfinite(eps)


def _federated(s: dict, lr: str) -> bool:
    return s.get("method") not in BASELINES and (s.get("lr_schedule") or "fixed") == lr


def _nonprivate(summary: Sequence[dict], row_average: bool = False, population: int | None = None) -> dict | None:
    """The non-private reference: the fixed-rate federated cell without DP, with the same row averaging if any, of
    the same population (where the sweep has several; never one of another population)."""
    plain = [s for s in summary if _federated(s, "fixed") and not _private(s)
             and (population is None or _population(s) in (None, population))]
    return next((s for s in plain if _row_avg(s) == row_average), plain[0] if plain else None)


#: a series of private cells: (unit, noise, row_average, population: the devices of the run, None if not recorded)
Key = tuple[str, str, bool, "int | None"]


def _population(s: dict) -> int | None:
    p = s.get("population")
    return int(p) if isinstance(p, int | float) and math.isfinite(p) else None


def _key(s: dict) -> Key:
    return str(s["unit"]), _noise(s), _row_avg(s), _population(s)


def _series(summary: Sequence[dict]) -> list[Key]:
    """The series of private cells: user-level first, then event-level, then by noise placement."""
    units, noises = ["user", "event"], list(NOISE_LABELS)
    found = list(dict.fromkeys(_key(s) for s in summary if _private(s)))
    return sorted(found, key=lambda k: (units.index(k[0]) if k[0] in units else len(units),
                                        noises.index(k[1]) if k[1] in noises else len(noises), k[2], k[3] or 0))


def _series_name(key: Key, keys: Sequence[Key]) -> str:
    """``"event-level DP (noise at the aggregate, per-row average)"``; a unit's default placement alone is unnamed."""
    unit, noise, avg, population = key
    alone = noise == DEFAULT_NOISE.get(unit) and all(k[1] == noise for k in keys if k[0] == unit)
    quals = ([] if alone else [NOISE_NAMES.get(noise, noise)]) + (["per-row average"] if avg else [])
    where = f" at {population:,} devices" if len({k[3] for k in keys}) > 1 and population else ""
    return f"{unit}-level DP" + (f" ({', '.join(quals)})" if quals else "") + where


def _series_cells(summary: Sequence[dict], key: Key, lr: str = "fixed") -> list[dict]:
    """The private cells of a series at one learning-rate schedule, by ascending ε target."""
    return sorted((s for s in summary if _private(s) and _key(s) == key and _federated(s, lr)),
                  key=lambda s: s["epsilon_target"])


def _trust(cells: Sequence[dict]) -> str:
    """The trust sentence of a series (the short label where the results predate the ``trust`` column)."""
    text = next((str(s["trust"]) for s in cells if s.get("trust")), None) or noise_label(cells[0])
    return text.rstrip(". ")


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _atomic_write(path, buf.getvalue())
    return path


def _errorbar(ax, pts: list[tuple[float, dict]], m: str, **style) -> bool:
    pts = [(x, s) for x, s in pts if s.get(f"{m}_mean") is not None and math.isfinite(s[f"{m}_mean"])]
    if not pts:
        return False
    xs, ys = [x for x, _ in pts], [s[f"{m}_mean"] for _, s in pts]
    ax.errorbar(xs, ys, yerr=[s.get(f"{m}_ci") or 0.0 for _, s in pts], capsize=3, **style)
    if m == "adaptation_lag":  # hollow triangles mark lower bounds (censored seeds)
        cens = [(x, y) for (x, s), y in zip(pts, ys, strict=True) if s.get("adaptation_lag_censored")]
        if cens:
            ax.scatter(*zip(*cens, strict=True), marker="^", s=90, facecolors="none", edgecolors=style.get("color"))
    return True


def _baseline_lines(ax, summary: list[dict], m: str) -> bool:
    """A dashed line (and its CI band) per baseline with a finite mean of ``m``; whether any was drawn."""
    drawn = False
    for k, base in enumerate(BASELINES):
        s = next((s for s in summary if s.get("method") == base), None)
        mean, ci = (s.get(f"{m}_mean"), s.get(f"{m}_ci")) if s else (None, None)
        if mean is not None and math.isfinite(mean):
            ax.axhline(mean, ls="--", color=f"C{2 + k}", label=base)
            if ci:
                ax.axhspan(mean - ci, mean + ci, color=f"C{2 + k}", alpha=0.12, lw=0)
            drawn = True
    return drawn


def _curves(summary: list[dict], x_inf: float) -> list[tuple[list[tuple[float, dict]], dict]]:
    """Each line of the ε plot: its points ``(x, cell)`` and its matplotlib style, one per series.

    A series is one (unit, noise placement, row averaging) at the fixed learning rate, closed at ε = ∞ by the
    non-private cell with the same row averaging; adaptive-rate cells are series of their own (dashed).
    """
    keys = _series(summary)
    curves: list[tuple[list[tuple[float, dict]], dict]] = []
    for key in keys:
        pts: list[tuple[float, dict]] = [(s["epsilon_target"], s) for s in _series_cells(summary, key)]
        ref = _nonprivate(summary, key[2], key[3])
        if not pts:  # only adaptive-rate cells: they are drawn below
            continue
        pts += [(x_inf, ref)] if ref else []  # the non-private run closes every curve at ∞
        style = {"marker": MARKERS.get(key[1], "o"), "label": _series_name(key, keys)}
        curves.append((pts, {**style, "mfc": "none"} if key[2] else style))  # hollow: per-row averaging
    ref = _nonprivate(summary)
    if ref and not curves:
        curves.append(([(x_inf, ref)], {"marker": "o", "label": "no DP"}))
    adaptive = [s for s in summary if _federated(s, "adaptive")]
    for akey in dict.fromkeys(_key(s) if _private(s) else None for s in adaptive):
        pts = sorted(((s["epsilon_target"] if _private(s) else x_inf, s) for s in adaptive
                      if (_key(s) if _private(s) else None) == akey), key=lambda p: p[0])
        name = _series_name(akey, keys) if akey else "no DP"
        curves.append((pts, {"marker": "s", "ls": "--", "label": f"adaptive lr ({name})"}))
    n = len(curves)
    # nudge the series apart on the log axis so that equal values do not hide each other
    return [([(x * 1.05 ** (i - (n - 1) / 2), s) for x, s in pts], {"color": COLOURS[i % len(COLOURS)], **style})
            for i, (pts, style) in enumerate(curves)]


def plot_freshness(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Freshness against the privacy budget: ``freshness_vs_epsilon.png`` with lag, uptake and end-of-run HR.

    One line per series, a series being one (privacy unit, noise placement, row averaging), so event-level DP
    with device noise and with noise at the aggregate are separate lines; each closes at ε = ∞ on the non-private
    cell (with the same row averaging where there is one). Baselines are dashed horizontal lines.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``results.csv``.
    out_dir : path-like
        Destination folder; the list of PNG files written is returned.
    """
    summary = summarize(rows)
    finite = sorted({s["epsilon_target"] for s in summary if _private(s) and s.get("method") not in BASELINES})
    x_inf = finite[-1] * 4 if finite else 1.0  # ε = ∞ gets its own slot right of the largest finite ε
    curves = _curves(summary, x_inf)
    panels = [("adaptation_lag", "adaptation lag (rounds; △ = censored seeds)"),
              ("uptake_median", "new-item uptake, median (rounds)"), ("whr_final", "windowed HR@10 at the end")]
    legend_rows = math.ceil((len(curves) + len(BASELINES)) / 4)
    fig = Figure(figsize=(15, 4.4 + 0.22 * legend_rows))
    FigureCanvasAgg(fig)
    handles: dict[str, Artist] = {}
    for ax, (m, title) in zip(fig.subplots(1, 3), panels, strict=True):
        drawn = False
        for pts, style in curves:
            drawn |= _errorbar(ax, pts, m, **style)
        drawn |= _baseline_lines(ax, summary, m)
        ticks = [*finite, x_inf]
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels=[f"{e:g}" for e in finite] + ["∞"])
        ax.set_xticks([], minor=True)
        ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        ax.set(title=title, xlabel="ε target")
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    # one legend under the panels: a dozen series would cover the points inside any one panel
    bottom = (0.12 + 0.22 * legend_rows) / fig.get_figheight() if handles else 0.0
    labels = sorted(handles, key=lambda label: label in BASELINES)  # the series first, the baselines last
    if labels:
        fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return [_save(fig, Path(out_dir) / "freshness_vs_epsilon.png")]


def _curve(path: Path, metric: str) -> dict[int, float]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[int, float] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # a run killed mid-write leaves a truncated last line; earlier rounds still count
                break
            raise ValueError(f"{path}:{i}: not a JSON object.") from None
        if obj.get(metric) is not None and obj.get("round") is not None:
            out[int(obj["round"])] = float(obj[metric])
    return out


def _leading(rows: Sequence[dict]) -> list[dict]:
    """``rows`` with the cells that lead their curve (no DP, or the curve's largest ε) first, each group in
    row order: past :data:`MAX_CURVES` lines, what is left out is the smaller ε of a curve already drawn."""
    def eps(r: dict) -> float:
        try:
            return float(r.get("epsilon_target", math.inf))
        except (TypeError, ValueError):
            return math.inf

    def curve(r: dict) -> tuple:
        return r.get("unit"), r.get("noise"), r.get("row_average"), r.get("method"), r.get("lr_schedule")

    top: dict[tuple, float] = {}
    for r in rows:
        top[curve(r)] = max(top.get(curve(r), -math.inf), eps(r))
    lead = [r for r in rows if eps(r) == top[curve(r)]]
    return lead + [r for r in rows if eps(r) != top[curve(r)]]


def plot_rounds(sweep_dir: str | os.PathLike, rows: Sequence[dict], out_dir: str | os.PathLike,
                drift_round: int | None = None, metric: str = "whr@10", name: str = "hr_over_rounds.png") -> Path:
    """Per-round metric, mean over seeds, one line per cell: ``hr_over_rounds.png``.

    Parameters
    ----------
    sweep_dir : path-like
        Sweep folder holding ``cells/<cell>/seed-<seed>/metrics.jsonl``; cells without files are skipped.
    rows : sequence of dict
        Rows of ``results.csv`` (they say which cells and seeds exist, and in which order to draw them).
    out_dir : path-like
        Destination folder.
    drift_round : int, optional
        Round of the drift, drawn as a dotted vertical line.
    metric : str
        Key of the per-round metric in ``metrics.jsonl``.

    Returns
    -------
    Path
        The PNG written. At most :data:`MAX_CURVES` cells are drawn: first, in row order, every cell that is
        the largest ε of its curve (unit, noise, row averaging) or has no DP; then the others.
    """
    seeds: dict[str, list] = {}
    for r in _leading(rows):
        seeds.setdefault(r["cell"], [])
        if r.get("seed") not in seeds[r["cell"]]:
            seeds[r["cell"]].append(r.get("seed"))
    fig = Figure(figsize=(9, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn, truncated = 0, False
    for cell, cell_seeds in seeds.items():
        files = [Path(sweep_dir) / "cells" / cell / f"seed-{s}" / "metrics.jsonl" for s in cell_seeds]
        curves = [_curve(f, metric) for f in files if f.is_file()]
        rounds = sorted({r for c in curves for r in c})
        if not rounds:
            continue
        if drawn == MAX_CURVES:  # past a dozen lines the legend is unreadable
            truncated = True
            break
        mean = [float(np.mean([c[r] for c in curves if r in c])) for r in rounds]
        ax.plot(rounds, mean, lw=1.3, color=f"C{drawn % 10}", ls="-" if drawn < 10 else "--", label=cell)
        drawn += 1
    if drift_round is not None:
        ax.axvline(drift_round, ls=":", color="k", label="drift")
    ax.set(xlabel="round", ylabel=f"{metric} (mean over seeds)",
           title=f"{metric} per round" + (f" ({MAX_CURVES} of {len(seeds)} cells: each curve's largest ε first)" if truncated else ""))
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
    fig.tight_layout()
    return _save(fig, Path(out_dir) / name)



def _lag(s: dict, verb: bool) -> str:
    """The adaptation lag of a cell as a verb phrase ("adapts in …") or a noun phrase ("… rounds")."""
    mean, n, cens = s.get("adaptation_lag_mean"), s.get("adaptation_lag_n", 0), s.get("adaptation_lag_censored", 0)
    if mean is None:
        return "has no lag measured" if verb else "no lag measured"
    if cens == n:
        return f"never recovers (≥ {_sig(mean)} rounds)" if verb else f"≥ {_sig(mean)} rounds (never recovers)"
    text = f"{format_stat(s, 'adaptation_lag')} rounds" + (f" ({cens} of {n} seeds never recovered)" if cens else "")
    return f"adapts in {text}" if verb else text


def _uptake(s: dict) -> str:
    med, rate, ci = s.get("uptake_median_mean"), s.get("uptake_rate_mean"), s.get("uptake_rate_ci")
    share = f"{_sig(100 * rate)}{f' ± {_sig(100 * ci)}' if ci is not None else ''}%" if rate is not None else None
    if med is not None:
        return f"{format_stat(s, 'uptake_median')} rounds" + (f" ({share} taken up)" if share else "")
    # no median: fewer than half of the new items were ever taken up
    return f"no median (only {share} taken up)" if share else "not measured"


def _at(s: dict) -> str:
    return f"at ε={_eps(s['epsilon_target'])}"


def _overlap(a: dict, b: dict, m: str) -> str:
    ma, ca, mb, cb = a.get(f"{m}_mean"), a.get(f"{m}_ci"), b.get(f"{m}_mean"), b.get(f"{m}_ci")
    if ca is None or cb is None:
        return "no interval to compare"
    apart = ma + ca < mb - cb or mb + cb < ma - ca
    return "the 95% intervals do not overlap" if apart else "the 95% intervals overlap"


def _findings(summary: list[dict], drift_round: int | None) -> list[str]:
    drift = any(s.get("adaptation_lag_n") for s in summary)
    new_items = any(s.get("uptake_median_n") or s.get("uptake_rate_n") for s in summary)
    whr = any(s.get("whr_final_n") for s in summary)
    out = []
    if not drift:
        out.append("Adaptation lag: no drift in this scenario, so there is no lag to report.")
    elif drift_round is not None:
        out.append(f"Lags count rounds after the drift at round {drift_round}.")
    if not new_items:
        out.append("Uptake: no new items in this scenario.")
    if not _series(summary):
        out.append("No cell in this sweep uses differential privacy, so there is no privacy curve.")
    out += _series_findings(summary, drift=drift, new_items=new_items, whr=whr)
    out += _baseline_findings(summary, drift=drift, new_items=new_items)
    out += _adaptive_findings(summary, drift=drift)
    return out


def _share(s: dict, ref: dict | None) -> str:
    """`` (93.5% of no DP)``: a cell's windowed HR@10 as a share of the non-private reference's."""
    mean, base = s.get("whr_final_mean"), (ref or {}).get("whr_final_mean")
    if mean is None or not base or not math.isfinite(base):
        return ""
    return f" ({_sig(100 * mean / base)}% of no DP)"


def _against(ref: dict | None, text: str | None) -> str:
    """The end of a finding: the non-private reference's value, or that there is none."""
    if ref is None:
        return " (no non-private cell)."
    return f", against {text} without DP{' (per-row average)' if _row_avg(ref) else ''}."


def _series_findings(summary: list[dict], *, drift: bool, new_items: bool, whr: bool) -> list[str]:
    """Per series (fixed learning rate): its trust model; the lag and the uptake at the largest and the smallest
    finite ε, and the windowed HR@10 at every ε as a share of the non-private reference's."""
    out = []
    keys = _series(summary)
    for key in keys:
        cells = _series_cells(summary, key)
        if not cells:  # only adaptive-lr cells in this series: they get their own sentence
            continue
        ref = _nonprivate(summary, key[2], key[3])
        picks = [cells[-1], cells[0]] if len(cells) > 1 else cells  # the largest and the smallest finite ε
        name = _series_name(key, keys)
        out.append(f"Trust model of {name}: {_trust(cells)}.")
        if drift:
            out.append(f"{name[0].upper()}{name[1:]} " + " and ".join(f"{_at(s)} {_lag(s, True)}" for s in picks)
                       + _against(ref, _lag(ref, False) if ref else None))
        if new_items:
            out.append(f"Median uptake of new items with {name}: "
                       + " and ".join(f"{_uptake(s)} {_at(s)}" for s in picks) + _against(ref, _uptake(ref) if ref else None))
        if whr:
            out.append(f"With {name}, windowed HR@10 ends at "
                       + ", ".join(f"{format_stat(s, 'whr_final')} {_at(s)}{_share(s, ref)}" for s in cells[::-1])
                       + _against(ref, format_stat(ref, "whr_final") if ref else None))
    return out


def _baseline_findings(summary: list[dict], *, drift: bool, new_items: bool) -> list[str]:
    out = []
    for base in BASELINES:
        s = next((s for s in summary if s.get("method") == base), None)
        if s is None:
            out.append(f"There is no {base} baseline in this sweep.")
        elif drift or new_items:
            parts = ([_lag(s, True)] if drift else []) + ([f"median uptake of new items: {_uptake(s)}"]
                                                          if new_items else [])
            out.append(f"The {base} model {'; '.join(parts)}.")
    return out


def _adaptive_findings(summary: list[dict], *, drift: bool) -> list[str]:
    """Each adaptive-learning-rate cell against the fixed-rate cell of the same series and ε."""
    out = []
    keys = _series(summary)
    for a in (s for s in summary if _federated(s, "adaptive")):
        key = _key(a) if _private(a) else None
        f = next((s for s in _series_cells(summary, key) if s["epsilon_target"] == a["epsilon_target"]),
                 None) if key else _nonprivate(summary, _row_avg(a), _population(a))
        who = f"{_series_name(key, keys)} {_at(a)}" if key else "no DP"
        if f is None:  # nothing to compare with, but the cell's numbers still belong in the text
            if drift:
                out.append(f"With an adaptive learning rate, the model with {who} {_lag(a, True)} (no fixed-rate cell "
                           "to compare with).")
            continue
        if drift:
            out.append(f"With an adaptive learning rate, the model with {who} {_lag(a, True)}; with the fixed rate "
                       f"it {_lag(f, True)} ({_overlap(a, f, 'adaptation_lag')}).")
        if a.get("whr_final_mean") is not None and f.get("whr_final_mean") is not None:
            out.append(f"With an adaptive learning rate, the model with {who} ends at windowed HR@10 "
                       f"{format_stat(a, 'whr_final')} against {format_stat(f, 'whr_final')} with the fixed rate "
                       f"({_overlap(a, f, 'whr_final')}).")
    return out


def _privacy(rows: Sequence[dict], note: str) -> list[str]:
    out = [note.strip(), ""] if note and note.strip() else []
    keys = _series(rows)
    for key in keys:
        rs = [r for r in rows if _private(r) and _key(r) == key]
        deltas = ", ".join(f"{d:g}" for d in sorted({r["delta"] for r in rs if r.get("delta") is not None}))
        accs = ", ".join(sorted({r["accountant"] for r in rs if r.get("accountant")}))
        eps = ", ".join(_eps(e) for e in sorted({r["epsilon_target"] for r in rs}))
        out.append(f"- {_series_name(key, keys)} (unit `{key[0]}`, noise `{key[1]}`"
                   f"{', per-row average' if key[2] else ''}): δ = {deltas or MISSING}, accountant {accs or MISSING}, "
                   f"ε targets {eps}.")
    plain = list(dict.fromkeys(r["cell"] for r in rows if not _private(r)))
    if plain:
        out.append(f"- without DP: {', '.join(f'`{c}`' for c in plain)}.")
    return out


def write_report(sweep_dir: str | os.PathLike, *, title: str, scenario_text: str, drift_round: int | None = None,
                 privacy_note: str) -> Path:
    """Build the tables, plots and ``report.md`` of a finished sweep from its ``results.csv``.

    Parameters
    ----------
    sweep_dir : path-like
        Sweep folder holding ``results.csv`` (and ``cells/`` for the per-round plot); outputs go there too.
    title : str
        Report title.
    scenario_text : str
        Markdown describing the scenario.
    drift_round : int, optional
        Round of the drift, marked on the per-round plot.
    privacy_note : str
        Markdown opening the "Privacy" section; δ, accountant and ε targets per unit are added from the rows.

    Returns
    -------
    Path
        ``sweep_dir/report.md``.
    """
    sweep = Path(sweep_dir)
    rows = read_results(sweep / "results.csv")
    table = write_tables(rows, sweep)
    images = [*plot_freshness(rows, sweep), plot_rounds(sweep, rows, sweep, drift_round=drift_round)]
    if drift_round is not None:  # the series the lag is measured on: the devices whose taste shifted
        images.append(plot_rounds(sweep, rows, sweep, drift_round=drift_round, metric="drift_whr@10",
                                  name="drift_hr_over_rounds.png"))
    alt = {"freshness_vs_epsilon.png": "Freshness against the privacy budget",
           "hr_over_rounds.png": "Windowed HR@10 per round",
           "drift_hr_over_rounds.png": "Windowed HR@10 of the devices whose taste shifted, per round"}
    parts = [f"# {title}", "", scenario_text.strip(), "", "## Privacy", "", *_privacy(rows, privacy_note), "",
             "## Results", "", table.rstrip("\n"), "", *[f"![{alt.get(p.name, p.stem)}]({p.name})\n" for p in images],
             "## What the curve says", "", *[f"- {s}" for s in _findings(summarize(rows), drift_round)], ""]
    path = sweep / "report.md"
    _atomic_write(path, "\n".join(parts))
    return path

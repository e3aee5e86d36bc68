"""Sweep report: statistics by hand, exact CSV round trips, rebuildable tables, plots and the generated text."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.sweep.report import (
    DEFAULT_METRICS,
    _curves,
    format_stat,
    mean_ci,
    plot_freshness,
    plot_rounds,
    read_results,
    summarize,
    write_report,
    write_results,
    write_tables,
)
from fedrec.sweep.runner import privacy_columns

PNG = b"\x89PNG\r\n\x1a\n"
# adaptation lags per seed (seeds 0, 1, 2); None = censored at lag_max
LAGS = {"nonprivate": [2, 2, 3], "user-eps8": [3, 4, 5], "user-eps1": [7, 8, 9], "event-eps8": [2, 3, 4],
        "event-eps1": [4, 5, 6], "adaptive-user-eps1": [5, 6, 7], "static": [None, None, None],
        "centralised": [1, 1, 2]}


def _cell(cell: str) -> tuple[str, str, float, str]:
    """(method, unit, ε target, lr schedule) from a cell name."""
    if cell in ("static", "centralised"):
        return cell, "none", math.inf, "fixed"
    if cell == "nonprivate":
        return "federated", "none", math.inf, "fixed"
    lr = "adaptive" if cell.startswith("adaptive-") else "fixed"
    unit, eps = cell.removeprefix("adaptive-").split("-eps")
    return "federated", unit, float(eps), lr


def make_rows(lags: dict = LAGS) -> list[dict]:
    rows = []
    for cell, cell_lags in lags.items():
        method, unit, eps_t, lr = _cell(cell)
        private = math.isfinite(eps_t)
        for seed, lag in enumerate(cell_lags):
            rows.append({
                "cell": cell, "seed": seed, "scenario": "drift", "method": method, "unit": unit,
                "epsilon_target": eps_t, "epsilon": eps_t * 0.98 if private else (math.inf if method == "federated"
                                                                                 else None),
                "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.3 if private else 0.0, "cohort": 100,
                "rounds": 30, "events_per_round": 812.5, "lr_schedule": lr,
                "hr@10": 0.1 + 0.01 * seed, "ndcg@10": 0.05 + 0.003 * seed,
                "whr_final": 0.3 - 0.01 * (lag or 12) + 0.002 * seed,
                "popularity_hr@10": 0.07, "adaptation_lag": None if lag is None else float(lag),
                "lag_censored": int(lag is None), "lag_max": 12.0,
                "uptake_median": None if lag is None else lag / 2 + seed,
                "uptake_rate": (0.2 if lag is None else 0.8) + 0.05 * seed,
                "staleness_mean": 1.0 / 3, "wall_s": 12.25 + seed, "bytes_up_per_device_round": 2048.0,
            })
    return rows


def test_mean_ci_by_hand():
    mean, half, n = mean_ci([1, 2, 3])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975,2} * s / sqrt(n), s = 1
    assert mean_ci([4.0]) == (4.0, None, 1)
    assert mean_ci([]) == (None, None, 0)
    assert mean_ci([None, 5.0, None]) == (5.0, None, 1)  # missing seeds do not count
    assert mean_ci([math.inf, math.inf])[:2] == (math.inf, None)


def test_round_trip_is_exact(tmp_path):
    rows = make_rows()
    rows[0]["extra_metric"] = 0.1 + 0.2  # a metric the reader does not know yet, first seen on row 0
    path = tmp_path / "results.csv"
    write_results(rows, path)
    back = read_results(path)
    for r in rows:
        r.setdefault("extra_metric", None)
    assert back == rows
    assert isinstance(back[0]["seed"], int) and isinstance(back[0]["cohort"], int)
    assert back[0]["epsilon_target"] == math.inf and back[-1]["epsilon"] is None
    assert back[0]["extra_metric"] == 0.1 + 0.2
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["cell", "seed", "scenario"] and header[-1] == "extra_metric"
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind
    write_results(back, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()


def test_summarize_groups_and_censors():
    rows = make_rows()
    rows.append(dict(rows[0], seed=3, adaptation_lag=None, lag_censored=1, lag_max=20))  # nonprivate, out of order
    summary = summarize(rows)
    assert [s["cell"] for s in summary] == list(LAGS)
    by = {s["cell"]: s for s in summary}
    assert by["user-eps1"]["adaptation_lag_mean"] == 8.0 and by["user-eps1"]["adaptation_lag_censored"] == 0
    assert by["static"]["adaptation_lag_mean"] == 12.0 and by["static"]["adaptation_lag_censored"] == 3
    assert format_stat(by["static"], "adaptation_lag").startswith("≥12.0")
    np_ = by["nonprivate"]
    assert (np_["adaptation_lag_mean"], np_["adaptation_lag_n"], np_["adaptation_lag_censored"]) == (27 / 4, 4, 1)
    assert format_stat(by["user-eps1"], "adaptation_lag") == "8.00 ± 2.48"
    assert by["static"]["uptake_median_mean"] is None and by["static"]["uptake_median_n"] == 0
    assert format_stat(by["static"], "uptake_median") == "—"
    assert all(f"{m}_ci" in by["user-eps8"] for m in DEFAULT_METRICS)


def test_tables_rebuild_from_results_csv(tmp_path):
    rows = make_rows()
    first, again = tmp_path / "a", tmp_path / "b"
    md = write_tables(rows, first)
    write_results(rows, tmp_path / "results.csv")
    md2 = write_tables(read_results(tmp_path / "results.csv"), again)
    assert md == md2
    assert (first / "tables.md").read_bytes() == (again / "tables.md").read_bytes()
    assert (first / "summary.csv").read_bytes() == (again / "summary.csv").read_bytes()
    lines = md.splitlines()
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(LAGS)
    static = next(line for line in lines if line.startswith("| static "))
    assert "≥12.0" in static and "| ∞ |" in static and "—" in static
    assert "| 8.00 ± 2.48 |" in next(line for line in lines if line.startswith("| user-eps1 "))
    assert [s["cell"] for s in read_results(first / "summary.csv")] == list(LAGS)


def _fake_cells(sweep, rows, *, skip=("static",)):
    for r in rows:
        if r["cell"] in skip:
            continue
        d = sweep / "cells" / r["cell"] / f"seed-{r['seed']}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"round": k, "whr@10": None if k == 1 else 0.1 + 0.01 * k + 0.001 * r["seed"]})
                 for k in range(1, 11)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"round": 11, "whr')  # truncated last line


def test_plots_write_pngs(tmp_path):
    rows = make_rows()
    [png] = plot_freshness(rows, tmp_path)
    assert png.name == "freshness_vs_epsilon.png" and png.read_bytes().startswith(PNG)
    _fake_cells(tmp_path, rows)
    out = plot_rounds(tmp_path, rows, tmp_path / "out", drift_round=5)
    assert out.name == "hr_over_rounds.png" and out.read_bytes()[:8] == PNG


def test_plots_survive_missing_data(tmp_path):
    rows = make_rows()
    for r in rows:
        r["uptake_median"] = None  # an all-None metric: the panel says "no data"
        r["whr_final"] = None
    assert plot_freshness(rows, tmp_path)[0].stat().st_size > 1000
    assert plot_rounds(tmp_path, rows, tmp_path).stat().st_size > 1000  # no metrics.jsonl anywhere
    only_np = [r for r in rows if r["cell"] == "nonprivate"]
    assert plot_freshness(only_np, tmp_path / "np")[0].stat().st_size > 1000


def test_plot_rounds_limits_cells(tmp_path):
    lags = {f"user-eps{e}": [3, 4] for e in range(1, 16)}
    rows = make_rows(lags)
    _fake_cells(tmp_path, rows)
    assert plot_rounds(tmp_path, rows, tmp_path, metric="whr@10").read_bytes()[:8] == PNG


def test_report(tmp_path):
    rows = make_rows()
    write_results(rows, tmp_path / "results.csv")
    _fake_cells(tmp_path, rows)
    path = write_report(tmp_path, title="Freshness under DP", scenario_text="A topic drift at round 10.",
                        drift_round=10, privacy_note="Each cell calibrates its noise to its ε target.")
    text = path.read_text()
    assert text.startswith("# Freshness under DP\n")
    assert "δ = 1e-05" in text and "accountant prv" in text and "user-level" in text and "event-level" in text
    assert "ε targets 1, 8" in text
    for png in ("freshness_vs_epsilon.png", "hr_over_rounds.png"):
        assert f"]({png})" in text and (tmp_path / png).is_file()
    assert (tmp_path / "tables.md").read_text().rstrip("\n") in text
    says = text.split("## What the curve says", 1)[1]
    by = {s["cell"]: s for s in summarize(rows)}
    ref = by["nonprivate"]
    for unit in ("user", "event"):
        hi, lo = by[f"{unit}-eps8"], by[f"{unit}-eps1"]
        assert f"{unit.capitalize()}-level DP at ε=8 adapts in {format_stat(hi, 'adaptation_lag')} rounds and at ε=1 " \
               f"adapts in {format_stat(lo, 'adaptation_lag')} rounds, against " \
               f"{format_stat(ref, 'adaptation_lag')} rounds without DP." in says
        assert f"Median uptake of new items with {unit}-level DP: {format_stat(hi, 'uptake_median')} rounds " in says
        assert f"{format_stat(lo, 'uptake_median')} rounds (85.0 ± 12.4% taken up) at ε=1" in says
        assert f"windowed HR@10 ends at {format_stat(hi, 'whr_final')} at ε=8 (" in says
        assert f"% of no DP), {format_stat(lo, 'whr_final')} at ε=1 (" in says
    # hand-checked: lags 7, 8, 9 -> 8 ± t_{0.975,2} / sqrt(3); uptake medians 3.5, 5, 6.5 -> 5 ± 4.303 * 1.5 / sqrt(3)
    assert "and at ε=1 adapts in 8.00 ± 2.48 rounds" in says and "5.00 ± 3.73 rounds (85.0 ± 12.4% taken up) at ε=1" \
        in says
    # hand-checked: windowed HR@10 0.262 (lags 3, 4, 5) against 0.278667 (lags 2, 2, 3) without DP
    assert "ends at 0.262 ± 0.0199 at ε=8 (94.0% of no DP), 0.222 ± 0.0199 at ε=1 (79.7% of no DP), against " \
           "0.279 ± 0.0103 without DP." in says
    assert "Trust model of user-level DP: user-level, trusted server." in says  # no trust column: the short label
    assert "The static model never recovers (≥ 12.0 rounds); median uptake of new items: no median " \
           "(only 25.0 ± 12.4% taken up)." in says
    assert f"The centralised model adapts in {format_stat(by['centralised'], 'adaptation_lag')} rounds" in says
    assert "With an adaptive learning rate, the model with user-level DP at ε=1 adapts in 6.00 ± 2.48 rounds; " \
           "with the fixed rate it adapts in 8.00 ± 2.48 rounds (the 95% intervals overlap)." in says


def test_report_without_drift_or_new_items(tmp_path):
    rows = make_rows()
    for r in rows:
        r.update(adaptation_lag=None, lag_censored=0, uptake_median=None, uptake_rate=None)
    write_results(rows, tmp_path / "results.csv")
    text = write_report(tmp_path, title="t", scenario_text="s", privacy_note="p").read_text()
    assert "no drift in this scenario" in text and "no new items" in text
    assert "adapts in" not in text


def test_malformed_csv_names_the_line(tmp_path):
    path = tmp_path / "results.csv"
    write_results(make_rows()[:3], path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",one,", 1)  # the seed of the second data row, on line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"results\.csv:3: column 'seed'"):
        read_results(path)
    path.write_text(lines[0] + "\n" + lines[1] + ",extra\n")
    with pytest.raises(ValueError, match=r"results\.csv:2:"):
        read_results(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"results\.csv:1:"):
        read_results(path)
    path.write_text(lines[0] + "\n")  # a report of nothing would replace a good one
    with pytest.raises(ValueError, match=r"results\.csv: a header and no result rows"):
        read_results(path)
    path.write_bytes(lines[0].encode() + b"\n\xf0\x28\x8c\x28,1\n")
    with pytest.raises(ValueError, match=r"results\.csv:\d+: not UTF-8"):
        read_results(path)


def test_report_on_partial_sweeps(tmp_path):
    """Odd subsets (no baselines, a unit with only adaptive-lr cells, a single cell) still give a report."""
    for i, cells in enumerate([("nonprivate", "adaptive-user-eps1"), ("user-eps1",), ("static",)]):
        sweep = tmp_path / str(i)
        write_results(make_rows({c: LAGS[c] for c in cells}), sweep / "results.csv")
        text = write_report(sweep, title="t", scenario_text="s", privacy_note="").read_text()
        assert "There is no centralised baseline in this sweep." in text and "]( " not in text
    assert "the model with user-level DP at ε=1 adapts in 6.00 ± 2.48 rounds (no fixed-rate cell to compare with)" \
        in (tmp_path / "0" / "report.md").read_text()
    assert "(no non-private cell)" in (tmp_path / "1" / "report.md").read_text()
    assert "No cell in this sweep uses differential privacy" in (tmp_path / "2" / "report.md").read_text()


# Event-level cells with the noise at the aggregate, copied from the device-noise cells at the same ε with a lower
# windowed HR@10, and a non-private cell with per-row averaging; the rows of make_rows() predate the placement
# columns (no noise, row_average or trust), as in a results.csv written before them.
PLACED = {"aggregate-eps8": ("event-eps8", "aggregate-server", False),
          "aggregate-eps1": ("event-eps1", "aggregate-server", False),
          "aggregate-rowavg-eps8": ("event-eps8", "aggregate-server", True),
          "aggregate-rowavg-eps1": ("event-eps1", "aggregate-server", True),
          "aggregate-secagg-eps8": ("event-eps8", "aggregate-secagg", False),
          "aggregate-secagg-eps1": ("event-eps1", "aggregate-secagg", False),
          "rowavg-none": ("nonprivate", "none", True)}
TRUST = {"aggregate-server": "trusted aggregator: the server adds the noise once to the sum",
         "aggregate-secagg": "SecAgg+ with distributed noise: the server sees only the noisy sum",
         "none": "no differential privacy"}


def placed_rows() -> list[dict]:
    rows = make_rows()
    for cell, (like, noise, avg) in PLACED.items():
        rows += [dict(r, cell=cell, noise=noise, row_average=avg, trust=TRUST[noise],
                      whr_final=r["whr_final"] - (0.01 if avg else 0.02)) for r in rows if r["cell"] == like]
    return rows


def test_privacy_columns_from_summaries():
    trust = "each device's own DP-SGD: the server learns at most this about any single event"
    old_event = {"event": {"unit": "event", "trust": trust}}  # written before the noise key existed
    assert privacy_columns("event", {}, old_event) == {"noise": "device", "row_average": False, "trust": trust}
    agg = {"event": {"noise": "aggregate-secagg", "trust": "SecAgg+ shares"}}
    assert privacy_columns("event", {"row-average": True}, agg) == {"noise": "aggregate-secagg",
                                                                     "row_average": True, "trust": "SecAgg+ shares"}
    user = {"user": {"trust": "secure aggregation"}}
    assert privacy_columns("user", {"secure-aggregation": True}, user)["noise"] == "user-secagg"
    assert privacy_columns("user", {"secure-aggregation": False}, user)["noise"] == "user"
    assert privacy_columns("none", {"row-average": True}, {"unit": "none"}) == {
        "noise": "none", "row_average": True, "trust": "no differential privacy"}
    both = privacy_columns("both", {}, {"user": {"trust": "a"}, "event": {"noise": "aggregate-server", "trust": "b"}})
    assert both == {"noise": "user+aggregate-server", "row_average": False, "trust": "a; b"}


def test_placement_columns_round_trip_and_tables(tmp_path):
    rows = placed_rows()
    write_results(rows, tmp_path / "results.csv")
    back = read_results(tmp_path / "results.csv")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[4:7] == ["unit", "noise", "row_average"] and "trust" in header
    by = {r["cell"]: r for r in back}
    assert by["aggregate-rowavg-eps1"]["row_average"] is True and by["aggregate-eps1"]["row_average"] is False
    assert by["user-eps8"]["noise"] is None and by["user-eps8"]["row_average"] is None  # the old rows: empty
    assert by["aggregate-secagg-eps8"]["trust"] == TRUST["aggregate-secagg"]
    lines = (tmp_path / "results.csv").read_text().splitlines()
    (tmp_path / "results.csv").write_text("\n".join([lines[0], lines[-1].replace(",1,", ",maybe,", 1)]) + "\n")
    with pytest.raises(ValueError, match=r"results\.csv:2: column 'row_average' holds 'maybe'"):
        read_results(tmp_path / "results.csv")
    md = write_tables(rows, tmp_path)
    row = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| event | device noise (protects against the server) | no |" in row["event-eps8"]
    assert "| event | noise at the aggregate (trusted server) | yes | 8 |" in row["aggregate-rowavg-eps8"]
    assert "| SecAgg+ shares (server sees only the noisy sum) | no |" in row["aggregate-secagg-eps1"]
    assert "| user-level, trusted server | no |" in row["user-eps1"] and "| no DP | yes | ∞ |" in row["rowavg-none"]
    summary = {s["cell"]: s for s in read_results(tmp_path / "summary.csv")}
    assert (summary["aggregate-rowavg-eps8"]["noise"], summary["aggregate-rowavg-eps8"]["row_average"]) == (
        "aggregate-server", True)


def test_curves_group_by_unit_noise_and_row_average():
    summary = summarize(placed_rows())
    curves = _curves(summary, x_inf=32.0)
    cells = {style["label"]: [s["cell"] for _, s in pts] for pts, style in curves}
    assert list(cells) == ["user-level DP", "event-level DP (device noise)", "event-level DP (noise at the aggregate)",
                           "event-level DP (noise at the aggregate, per-row average)",
                           "event-level DP (SecAgg+ noise shares)", "adaptive lr (user-level DP)"]
    # each series closes at ∞ on the non-private cell with the same row averaging
    assert cells["event-level DP (device noise)"] == ["event-eps1", "event-eps8", "nonprivate"]
    assert cells["event-level DP (noise at the aggregate)"] == ["aggregate-eps1", "aggregate-eps8", "nonprivate"]
    assert cells["event-level DP (noise at the aggregate, per-row average)"] == [
        "aggregate-rowavg-eps1", "aggregate-rowavg-eps8", "rowavg-none"]
    assert cells["adaptive lr (user-level DP)"] == ["adaptive-user-eps1"]
    for pts, _ in curves[:5]:
        dodge = pts[-1][0] / 32.0  # one nudge per series, the same at every ε
        assert [x / dodge for x, _ in pts] == pytest.approx([1.0, 8.0, 32.0])
    assert len({style["color"] for _, style in curves}) == len(curves)
    assert not {"C2", "C3"} & {style["color"] for _, style in curves}  # the baselines' colours


def test_report_per_series(tmp_path):
    rows = placed_rows()
    write_results(rows, tmp_path / "results.csv")
    text = write_report(tmp_path, title="t", scenario_text="s", drift_round=10, privacy_note="").read_text()
    says = text.split("## What the curve says", 1)[1]
    by = {s["cell"]: s for s in summarize(rows)}
    assert "- event-level DP (noise at the aggregate, per-row average) (unit `event`, noise `aggregate-server`, " \
           "per-row average): δ = 1e-05, accountant prv, ε targets 1, 8." in text
    assert f"Trust model of event-level DP (noise at the aggregate): {TRUST['aggregate-server']}." in says
    assert f"Trust model of event-level DP (SecAgg+ noise shares): {TRUST['aggregate-secagg']}." in says
    assert "Trust model of event-level DP (device noise): device noise (protects against the server)." in says
    hi = by["aggregate-eps8"]
    assert f"Event-level DP (noise at the aggregate) at ε=8 adapts in {format_stat(hi, 'adaptation_lag')} rounds" \
           in says
    assert "Median uptake of new items with event-level DP (SecAgg+ noise shares): " in says
    # hand-checked: 0.272 - 0.02 = 0.252 against 0.278667 (90.4%); per-row: 0.262 and 0.242 against 0.268667
    assert "With event-level DP (noise at the aggregate), windowed HR@10 ends at 0.252 ± 0.0199 at ε=8 (90.4% of " \
           "no DP), " in says
    assert "ends at 0.262 ± 0.0199 at ε=8 (97.5% of no DP), 0.242 ± 0.0199 at ε=1 (90.1% of no DP), against " \
           "0.269 ± 0.0103 without DP (per-row average)." in says
    assert "With event-level DP (device noise), windowed HR@10 ends at " in says


def test_report_by_population(tmp_path):
    """A sweep over populations (scenarios/population.toml): each population's private cells form their own series,
    named by their size and measured against the non-private cell of the same population, never another's."""
    rows = []
    for population, cohort, ref in ((10_000, 100, 0.30), (100_000, 1_000, 0.40)):
        for r in make_rows({"nonprivate": [2, 2, 3], "user-eps8": [3, 4, 5], "user-eps1": [7, 8, 9]}):
            r.update(cell=f"{population}-{r['cell']}", population=population, cohort=cohort, adaptation_lag=None,
                     lag_censored=0, uptake_median=None, uptake_rate=None)
            r["whr_final"] = ref if r["unit"] == "none" else ref / 2 if r["epsilon_target"] == 1 else ref * 0.9
            rows.append(r)
    write_results(rows, tmp_path / "results.csv")
    assert {r["population"] for r in read_results(tmp_path / "results.csv")} == {10_000, 100_000}
    text = write_report(tmp_path, title="t", scenario_text="s", privacy_note="").read_text()
    says = text.split("## What the curve says", 1)[1]
    assert "With user-level DP at 10,000 devices, windowed HR@10 ends at 0.270 ± 0 at ε=8 (90.0% of no DP), 0.150 " \
           "± 0 at ε=1 (50.0% of no DP), against 0.300 ± 0 without DP." in says
    assert "With user-level DP at 100,000 devices, windowed HR@10 ends at 0.360 ± 0 at ε=8 (90.0% of no DP)" in says
    assert "at ε=1 (50.0% of no DP), against 0.400" in says
    assert "| devices | cohort |" in text and "| 100,000 | 1000 |" in text
    labels = [style["label"] for _, style in _curves(summarize(rows), 100.0)]
    assert labels == ["user-level DP at 10,000 devices", "user-level DP at 100,000 devices"]

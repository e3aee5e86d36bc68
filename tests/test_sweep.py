"""``fedrec sweep`` and ``fedrec report``: spec validation, a real resumable sweep, report rebuilds."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.config import ConfigError
from fedrec.sweep.report import read_results
from fedrec.sweep.spec import load_sweep

TINY = """\
[sweep]
title = "tiny"
scenario = "a tiny drifting world"
seeds = [0, 1]
reference = "none-epsinf"

[base]
engine = "local"
world-users = 120
world-items = 80
world-topics = 4
world-events-per-user = 12
world-bursts = 2
rounds = 5
cohort = 30
dim = 4
user-fit-steps = 5
local-steps = 3

[[cells]]
name = "static"
privacy = "none"
freeze-after = 2

[[cells]]
name = "centralised"
method = "centralised"
privacy = "none"

[[grid]]
name = "{privacy}-eps{epsilon}"
privacy = ["user", "event"]
epsilon = ["inf", 4]
"""


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_grid_expands_and_inf_runs_once(tmp_path):
    spec = load_sweep(_write(tmp_path, TINY))
    names = [c.name for c in spec.cells]
    assert names == ["static", "centralised", "none-epsinf", "user-eps4", "event-eps4"]
    by = {c.name: c for c in spec.cells}
    assert by["none-epsinf"].unit == "none" and math.isinf(by["none-epsinf"].epsilon_target)
    assert by["user-eps4"].unit == "user" and by["user-eps4"].epsilon_target == 4.0
    assert by["static"].method == "static" and by["centralised"].method == "centralised"
    cfg = spec.config(by["event-eps4"], 1, tmp_path / "x")
    assert cfg.privacy == "event" and cfg.epsilon == 4.0 and cfg.seed == 1 and cfg.world_users == 120


def test_grid_over_cohort_and_round_interval(tmp_path):
    text = TINY + """
[[grid]]
name = "user-eps{epsilon}-c{cohort}-r{rounds}"
privacy = ["user"]
epsilon = [2]
cohort = [20, 40]
rounds = [5, 10]
"""
    spec = load_sweep(_write(tmp_path, text))
    grid = [c for c in spec.cells if c.name.startswith("user-eps2-")]
    assert [c.name for c in grid] == ["user-eps2-c20-r5", "user-eps2-c20-r10", "user-eps2-c40-r5", "user-eps2-c40-r10"]
    cfg = spec.config(grid[1], 0, tmp_path)
    assert (cfg.cohort, cfg.rounds, cfg.epsilon, cfg.privacy) == (20, 10, 2.0, "user")


@pytest.mark.parametrize("change, words", [
    (("world-users = 120", "world-userz = 120"), "world-userz"),
    (('reference = "none-epsinf"', 'reference = "nope"'), "reference cell 'nope'"),
    (('epsilon = ["inf", 4]', 'epsilon = ["inf", "four"]'), "epsilon"),
    (('name = "{privacy}-eps{epsilon}"', 'name = "{privacy}-{cohort}"'), "name template"),
    (("freeze-after = 2", "freeze-after = -2"), "freeze-after"),
    (("seeds = [0, 1]", "seeds = []"), "seeds"),
    ((TINY[:TINY.index("[base]")], "sweep = 3\n\n"), "'sweep' must be written as [sweep]"),
    (('reference = "none-epsinf"', 'reference = ["a"]'), "'reference' must be one cell's name"),
    (('name = "{privacy}-eps{epsilon}"', 'name = "{privacy.x}"'), "name template"),
    (('name = "{privacy}-eps{epsilon}"', 'name = "{privacy"'), "is not a template"),
    ((TINY[TINY.index("[[cells]]"):], '[cells]\nname = "static"\nprivacy = "none"\n'), "[[cells]] tables"),
    (('epsilon = ["inf", 4]', 'epsilon = [["abc"]]'), "s.toml"),
])
def test_bad_sweep_files_fail_with_a_sentence(tmp_path, change, words):
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, TINY.replace(*change)))
    assert words in str(e.value)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(ConfigError, match="No such sweep file"):
        load_sweep(tmp_path / "none.toml")


def test_cells_chooses_by_pattern_and_a_pattern_matching_none_is_said(tmp_path):
    from fedrec.sweep.runner import chosen

    spec = load_sweep(_write(tmp_path, TINY))
    assert [c.name for c in chosen(spec, "*-eps4")] == ["user-eps4", "event-eps4"]
    assert [c.name for c in chosen(spec, None)] == [c.name for c in spec.cells]
    p = _fedrec("sweep", str(tmp_path / "s.toml"), "--cells", "1m-*", "--out", str(tmp_path / "out"), cwd=tmp_path)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in out
    assert "--cells '1m-*' matches no cell of" in out and "static, centralised, none-epsinf" in out
    assert not (tmp_path / "out").exists()


def _fedrec(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedrec.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sweep_killed_halfway_resumes_without_redoing_and_report_rebuilds(tmp_path):
    sweep = _write(tmp_path, TINY)
    out = tmp_path / "out"
    # first attempt: one run at a time, killed (the whole process group, like a closed terminal)
    # as soon as some runs have finished and others have not
    p = _fedrec("sweep", str(sweep), "--out", str(out), "--jobs", "1", "--no-progress", cwd=tmp_path,
                start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list(out.glob("cells/*/seed-*/summary.json"))
        if len(done) >= 3 or p.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = {f: f.stat().st_mtime_ns for f in out.glob("cells/*/seed-*/summary.json")}
    assert 3 <= len(first) < 10, "the kill should land halfway"
    assert not (out / "results.csv").exists()

    p = _fedrec("sweep", str(sweep), "--out", str(out), "--jobs", "2", "--no-progress", cwd=tmp_path)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log
    assert f"{len(first)} already finished" in log
    for f, t in first.items():  # finished runs were not redone
        assert f.stat().st_mtime_ns == t
    rows = read_results(out / "results.csv")
    assert len(rows) == 10 and {r["cell"] for r in rows} == {"static", "centralised", "none-epsinf", "user-eps4",
                                                             "event-eps4"}
    for r in rows:
        assert r["hr@10"] is not None and 0 <= r["hr@10"] <= 1
        if r["unit"] in ("user", "event"):
            assert r["epsilon"] <= 4.0 * 1.0001 and r["delta"] == 1e-5 and r["accountant"] == "prv"
    ref = [r for r in rows if r["cell"] == "none-epsinf"]
    assert all(r["adaptation_lag"] == 0 for r in ref)  # the reference is within 10% of itself at once
    static = json.loads((out / "cells/static/seed-0/summary.json").read_text())
    lrs = [json.loads(line)["server_lr"] for line in (out / "cells/static/seed-0/metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [10.0, 10.0] and set(lrs[2:]) == {0.0}  # frozen after round 2
    assert "uptake_burst" in static["freshness"]
    report = (out / "report.md").read_text()
    for words in ("δ", "accountant", "user-level", "event-level", "freshness_vs_epsilon.png", "hr_over_rounds.png"):
        assert words in report
    for png in ("freshness_vs_epsilon.png", "hr_over_rounds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # `fedrec report` rebuilds the same tables from results.csv alone
    tables = (out / "tables.md").read_text()
    (out / "tables.md").unlink()
    (out / "report.md").unlink()
    p = _fedrec("report", str(out), cwd=tmp_path)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log
    assert (out / "tables.md").read_text() == tables and (out / "report.md").is_file()


def test_report_without_results_says_so(tmp_path):
    p = _fedrec("report", str(tmp_path), cwd=tmp_path)
    log, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and "No results.csv" in log and "Traceback" not in log


def test_a_cell_run_with_another_config_or_damaged_is_not_taken_as_done(tmp_path):
    """A finished run counts only with the config its cell gives now (an edited cell used to keep its old results);
    damaged outputs of a run end in one sentence naming its folder."""
    from fedrec.config import dump_toml
    from fedrec.sweep.runner import _finished, collect, run_dir

    spec = load_sweep(_write(tmp_path, TINY))
    cell, out = spec.cells[0], tmp_path / "out"
    d = run_dir(out, cell, 0)
    d.mkdir(parents=True)
    assert not _finished(spec, cell, 0, out)
    (d / "summary.json").write_text("{}")
    (d / "config.toml").write_text(dump_toml(spec.config(cell, 0, d).to_flat()))
    assert _finished(spec, cell, 0, out)
    edited = load_sweep(_write(tmp_path, TINY.replace("freeze-after = 2", "freeze-after = 3"), "t.toml"))
    with pytest.raises(ConfigError, match="another config than cell 'static'"):
        _finished(edited, edited.cells[0], 0, out)
    with pytest.raises(ConfigError, match=r"seed-0: its summary.json or metrics.jsonl is damaged"):
        collect(spec, out)  # no metrics.jsonl
    (d / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="is damaged .KeyError"):
        collect(spec, out)  # a summary without its keys


def test_a_sweep_out_that_is_a_file_is_one_sentence(tmp_path):
    from fedrec.sweep.runner import run_sweep

    (tmp_path / "f").write_text("mine")
    with pytest.raises(ConfigError, match="is a file; a sweep writes a folder there"):
        run_sweep(_write(tmp_path, TINY), tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_text() == "mine"

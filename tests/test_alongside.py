"""Baselines measured alongside the rounds, in a process of their own, give what they give after the rounds."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _procs import Fedrec
from test_serving import _simulate

from fedrec.config import RunConfig
from fedrec.data.source import load_stream
from fedrec.eval import baselines as b
from fedrec.eval.alongside import Alongside, measure, wanted

RUNS = [("popularity", "popularity_prequential", {}),
        ("centralised_mf", "centralised_mf_prequential", {"dim": 4, "seed": 3, "context": 2, "init_scale": 0.1})]


def _world():
    cfg = RunConfig.from_mapping({"world-users": 120, "world-items": 40, "world-events-per-user": 10, "rounds": 4},
                                 where="test")
    stream = load_stream(cfg)
    return stream, [np.unique(stream.log.user[stream.round_of == r]).tolist() for r in range(1, 5)]


def _triples(rounds):
    return [(c.n, c.hits, c.ndcg) for c in rounds]


def test_a_simulation_measures_the_same_baselines_alongside_its_rounds_as_after_them(tmp_path):
    """Every baseline's figures and per-round columns are equal, and the summary says when they were measured."""
    _, after, _ = _simulate(tmp_path / "after", baselines="after")
    _, side, _ = _simulate(tmp_path / "side", baselines="alongside")
    assert side["timings"]["baselines"].startswith("alongside")
    assert after["timings"]["baselines"] == "after the rounds"
    assert side["baselines"] == after["baselines"]
    assert after["baselines"]["centralised_mf"]["events_scored"] > 0
    cols = [f"{name}_hr@10" for name in after["baselines"]]
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("after", "side")]
    assert [[r[c] for c in cols] for r in rows[0]] == [[r[c] for c in cols] for r in rows[1]]


def test_measure_runs_each_baseline_as_it_runs_alone_and_a_failing_one_alone_fails():
    stream, schedule = _world()
    got = measure(stream, schedule, 3, RUNS + [("broken", "item_knn_prequential", {"window": 2})])
    assert _triples(got["popularity"]) == _triples(b.popularity_prequential(stream, schedule, 3))
    assert _triples(got["centralised_mf"]) == _triples(
        b.centralised_mf_prequential(stream, schedule, 3, dim=4, seed=3, context=2, init_scale=0.1))
    assert got["broken"].startswith("TypeError") and "neighbours" in got["broken"]


def test_the_process_alongside_follows_the_rounds_and_its_death_is_said_not_fatal():
    stream, schedule = _world()
    side = Alongside(stream, RUNS, 3)
    for row in schedule:
        side.feed(row)
    got = side.results()
    assert got is not None and _triples(got["centralised_mf"]) == _triples(measure(stream, schedule, 3, RUNS)
                                                                           ["centralised_mf"])
    dying = Alongside(stream, RUNS, 3)
    dying.feed(schedule[0])
    os.kill(dying.pid, signal.SIGKILL)
    assert dying.results() is None


def test_auto_measures_alongside_only_large_streams_on_several_cores():
    assert wanted("alongside", 10) and not wanted("after", 10**9) and not wanted("auto", 10)
    assert wanted("auto", 10**7) == (len(os.sched_getaffinity(0)) > 1)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text() if d.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d))
    return out


def _gone(pid: int, within: float) -> bool:
    """Whether ``pid`` ends within ``within`` s (a zombie that its new parent has not reaped yet has ended)."""
    end = time.time() + within
    while time.time() < end:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] == "Z":
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_a_run_stopped_or_killed_midway_leaves_no_baselines_process(tmp_path, how):
    """``fedrec simulate`` with its baselines alongside, stopped after its first rounds as ``fedrec sweep`` stops a
    run (SIGTERM to the run's process alone) or killed (SIGKILL, as by the OOM killer): the run exits, and the
    baselines' process is gone too (stopped by the run, or on its own once the run's process is)."""
    run = Fedrec(tmp_path / "log.txt", "simulate", "--world-users", "300", "--world-items", "60", "--rounds", "200",
                 "--cohort", "30", "--engine", "local", "--privacy", "none", "--no-progress", "--baselines",
                 "alongside", "--out", str(tmp_path / "out"), cwd=tmp_path)
    try:
        end = time.time() + 120
        while "round   2" not in run.text() and time.time() < end and run.proc.poll() is None:
            time.sleep(0.2)
        kids = [p for p in _children(run.proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(kids) == 1, run.text()[-2000:]
        os.kill(run.proc.pid, how)
        run.wait(60)
        assert _gone(kids[0], 30), "the baselines' process outlived its run"
    finally:
        run.stop()

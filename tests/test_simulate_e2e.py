"""``fedrec simulate`` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import Fedrec

ROW_KEYS = {"round", "hr@10", "ndcg@10", "epsilon", "staleness", "bytes_up", "bytes_down", "devices", "wall_s"}
WORLD_TOML = """\
world-users = 30
world-items = 120
world-topics = 4
world-events-per-user = 20
dim = 4
"""


def fedrec(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


def _write_generic_csv(path: Path, users: int = 12, per_user: int = 10, items: int = 40) -> int:
    lines = ["user,item,timestamp"]
    used = set()
    for u in range(users):
        for j in range(per_user):
            it = (u * 7 + j * 3) % items
            used.add(it)
            lines.append(f"u{u},item-{it},{1_600_000_000 + 3600 * (j * users + u)}")
    path.write_text("\n".join(lines) + "\n")
    return len(used)


class Sim:
    """One ``fedrec simulate`` run as a user runs it (:class:`_procs.Fedrec`), its stdout and stderr in files."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.n_items = 0  #: the items of the data file it reads, where it reads one
        self.run = Fedrec(cwd / "stdout.txt", "simulate", *args, cwd=cwd, stderr=cwd / "stderr.txt")

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        rc = self.run.wait(timeout)
        return subprocess.CompletedProcess(self.run.proc.args, rc, (self.cwd / "stdout.txt").read_text(),
                                           (self.cwd / "stderr.txt").read_text())

    def stop(self) -> None:
        self.run.stop()


def _start_synthetic(cwd: Path) -> Sim:
    (cwd / "world.toml").write_text(WORLD_TOML)
    return Sim(cwd, "--config", "world.toml", "--rounds", "2", "--cohort", "10", "--privacy", "event",
               "--out", str(cwd / "run"), "--no-progress")


def _start_generic(cwd: Path) -> Sim:
    n_items = _write_generic_csv(cwd / "events.csv")
    sim = Sim(cwd, "--data", "events.csv", "--rounds", "2", "--privacy", "none", "--dim", "4",
              "--out", str(cwd / "run"), "--no-progress")
    sim.n_items = n_items
    return sim


STARTS = {"test_simulate_synthetic_world": _start_synthetic,
          "test_simulate_generic_csv_without_privacy": _start_generic}


class Sims(dict):
    """test name -> its run (:data:`STARTS`), started on first asking, in a folder of its own."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, name: str) -> Sim:
        sim = self[name] = STARTS[name](self.factory.mktemp(name[:20]))
        return sim

    def start(self, name: str) -> Sim:
        return self[name]


@pytest.fixture(scope="module")
def sims(request, tmp_path_factory):
    """The run of each selected end-to-end test, all started when the first of them begins: they are independent
    processes, and most of each is Ray starting up, which overlaps well with the other."""
    started = Sims(tmp_path_factory)
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and item.originalname in STARTS:
            started.start(item.originalname)
    yield started
    for sim in started.values():
        sim.stop()


@pytest.mark.slow
def test_simulate_synthetic_world(sims):
    sim = sims["test_simulate_synthetic_world"]
    out = sim.cwd / "run"
    p = sim.wait()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr

    rows = _rows(out)
    assert len(rows) == 2
    for i, row in enumerate(rows, start=1):
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["round"] == i
        assert row["devices"] == 10 and row["failed"] == 0
        assert 0.0 <= row["hr@10"] <= 1.0 and 0.0 <= row["ndcg@10"] <= row["hr@10"]
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["epsilon"] > 0
        assert row["staleness"] >= 1 and row["wall_s"] >= 0
    assert rows[1]["epsilon"] >= rows[0]["epsilon"]

    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 2
    assert s["config"]["world-users"] == 30 and s["config"]["dim"] == 4 and s["config"]["cohort"] == 10
    assert s["data"]["population"] == 30 and s["data"]["n_items"] == 120
    pop = s["baselines"]["popularity"]
    assert "hr@10" in pop and 0.0 <= pop["hr@10"] <= 1.0
    priv = s["privacy"]
    assert priv["unit"] == "event"
    assert priv["epsilon"] > 0 and math.isfinite(priv["epsilon"])
    assert priv["epsilon"] == pytest.approx(max(r["epsilon"] for r in rows))
    assert priv["delta"] == 1e-5
    assert priv["accountant"] == "PRV"
    assert s["bytes"]["up"] == sum(r["bytes_up"] for r in rows)
    _check_png(out / "hr_epsilon.png")


@pytest.mark.slow
def test_simulate_generic_csv_without_privacy(sims):
    sim = sims["test_simulate_generic_csv_without_privacy"]
    n_items = sim.n_items
    out = sim.cwd / "run"
    p = sim.wait()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 2
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["epsilon"] == 0.0
        assert row["devices"] == 12 and row["failed"] == 0  # cohort > population: everyone joins
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["source"] == "events.csv"
    assert s["data"]["population"] == 12 and s["data"]["n_items"] == n_items
    assert s["privacy"]["unit"] == "none"
    assert s["privacy"]["epsilon"] is None and s["privacy"]["accountant"] is None
    assert "hr@10" in s["baselines"]["popularity"]
    _check_png(out / "hr_epsilon.png")


# ----------------------------------------------------------------------------------------------
# user errors: exit code 2, one line on stderr, no traceback, nothing started


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("fedrec: ")
    return lines[0]


def test_error_bad_config_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(WORLD_TOML + "world-userz = 3\n")
    msg = _one_line_error(fedrec("simulate", "--config", str(cfg), "--out", str(tmp_path / "o"), cwd=tmp_path))
    assert "world-userz" in msg and str(cfg) in msg
    assert not (tmp_path / "o").exists()


def test_error_bad_config_value(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('dim = "four"\n')
    msg = _one_line_error(fedrec("simulate", "--config", str(cfg), "--out", str(tmp_path / "o"), cwd=tmp_path))
    assert "'dim'" in msg and str(cfg) in msg


def test_error_bad_privacy(tmp_path):
    msg = _one_line_error(fedrec("simulate", "--privacy", "bogus", "--out", str(tmp_path / "o"), cwd=tmp_path))
    assert "privacy" in msg and "bogus" in msg


def test_error_missing_data(tmp_path):
    missing = tmp_path / "nope" / "ratings.csv"
    msg = _one_line_error(fedrec("simulate", "--data", str(missing), "--out", str(tmp_path / "o"), cwd=tmp_path))
    assert str(missing) in msg
    assert not (tmp_path / "o").exists()


def test_error_malformed_csv_row(tmp_path):
    data = tmp_path / "events.csv"
    data.write_text("user,item,timestamp\nu1,a,100\nu2,b,200\nu1,c,not-a-time\nu2,d,400\n")
    msg = _one_line_error(fedrec("simulate", "--data", str(data), "--out", str(tmp_path / "o"), cwd=tmp_path))
    assert f"{data}:4" in msg
    assert "not-a-time" in msg

"""Server checkpoint and resume: a server killed with SIGKILL continues from its last complete round.

These run the real ``fedrec simulate`` command as a subprocess (in-process engine, small world).
The deployment version of the same check, with SuperLink and SuperNodes as processes, is in
``test_deploy.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedrec.checkpoint import load_checkpoint
from fedrec.privacy.ledger import Ledger

FLAGS = ["--engine", "local", "--world-users", "200", "--cohort", "40", "--no-progress", "--nodes", "2"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedrec.cli", "simulate", *FLAGS, "--out", str(out), *extra]


def _ckpt_round(out: Path) -> int:
    try:
        return load_checkpoint(out / "checkpoint.npz")["round"]
    except Exception:  # not there yet, or being replaced this instant
        return 0


def _kill_after(out: Path, round_: int, *extra: str) -> None:
    """Start a run and SIGKILL it as soon as its checkpoint reaches ``round_``."""
    proc = subprocess.Popen(_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.time()
    try:
        while _ckpt_round(out) < round_:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 120
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_server_resumes_from_its_last_round_and_epsilon_never_drops(tmp_path):
    out = tmp_path / "run"
    _kill_after(out, 2, "--rounds", "5")
    killed_at = _ckpt_round(out)
    assert 2 <= killed_at < 5
    eps_before = Ledger(out / "privacy_ledger.jsonl").user_epsilon(1e-5)
    done = subprocess.run(_cmd(out, "--rounds", "5"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming after round {killed_at}" in done.stdout
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]  # every round once: none lost, none doubled
    eps = [r["epsilon_user"] for r in rows]
    assert all(b >= a for a, b in zip(eps, eps[1:], strict=False)) and eps[-1] >= eps_before
    led = Ledger(out / "privacy_ledger.jsonl")
    server = [r.round for r in led.records if r.kind == "server-gaussian"]
    assert sorted(set(server)) == [1, 2, 3, 4, 5] and len(server) >= 5  # a redone round is counted twice, never zero
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 5 and summary["privacy"]["user"]["epsilon"] >= eps[-1] - 1e-6
    assert any("resuming" in n for n in summary["notes"])
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck["round"] == 5 and ck["run"]["finished"]
    final = np.load(out / "global_model.npz")["item.weight"]
    np.testing.assert_array_equal(final, ck["global"]["item.weight"])


def test_resume_refuses_another_config_and_event_level_dp_in_simulation(tmp_path):
    out = tmp_path / "run"
    _kill_after(out, 1, "--rounds", "4")
    other = subprocess.run(_cmd(out, "--rounds", "4", "--privacy", "none"), capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2
    assert "belongs to a run with privacy = 'user', not 'none'" in other.stderr
    assert "Traceback" not in other.stderr

    ev = tmp_path / "event"
    _kill_after(ev, 1, "--rounds", "4", "--privacy", "event", "--local-steps", "2")
    again = subprocess.run(_cmd(ev, "--rounds", "4", "--privacy", "event", "--local-steps", "2"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Cannot resume" in again.stderr and "event-level DP" in again.stderr


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 torn"])
def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path, damage):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(damage)
    r = subprocess.run(_cmd(out, "--rounds", "2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint.npz is not a readable fedrec checkpoint" in r.stderr
    assert "Traceback" not in r.stderr

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
    _kill_all_after([(out, round_, extra)])


def _kill_all_after(runs: list[tuple[Path, int, tuple[str, ...]]]) -> None:
    """Start runs ``(out, round_, extra)`` side by side; SIGKILL each as soon as its checkpoint reaches its
    ``round_``."""
    procs = [(out, round_, subprocess.Popen(_cmd(out, *extra), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True))
             for out, round_, extra in runs]
    t0 = time.time()
    left = list(procs)
    try:
        while left:
            for run in list(left):
                out, round_, proc = run
                if _ckpt_round(out) >= round_:
                    os.killpg(proc.pid, signal.SIGKILL)
                    left.remove(run)
                else:
                    assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 120
            time.sleep(0.05)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
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
    # two independent runs (user-level, and event-level DP), killed and resumed side by side
    out, ev = tmp_path / "run", tmp_path / "event"
    event = ("--rounds", "4", "--privacy", "event", "--local-steps", "2")
    _kill_all_after([(out, 1, ("--rounds", "4")), (ev, 1, event)])
    resumes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for cmd in (_cmd(out, "--rounds", "4", "--privacy", "none"), _cmd(ev, *event))]
    (_, other_err), (_, again_err) = (p.communicate(timeout=300) for p in resumes)
    other, again = resumes
    assert other.returncode == 2
    assert "belongs to a run with privacy = 'user', not 'none'" in other_err
    assert "Traceback" not in other_err
    assert again.returncode == 2 and "Cannot resume" in again_err and "event-level DP" in again_err


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 torn"])
def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path, damage):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(damage)
    r = subprocess.run(_cmd(out, "--rounds", "2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint.npz is not a readable fedrec checkpoint" in r.stderr
    assert "Traceback" not in r.stderr

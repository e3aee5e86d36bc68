"""Ledger and checkpoint integrity (issue 19, part 2): a crash or a bad file never loses data or spends ε twice.

Small in-process federations (the ``local`` engine, user-level DP so every round writes one release).
A "kill" is an exception raised at a chosen point of the server (a patched function), so each test is
deterministic: the files on disk are what a SIGKILL at that point would leave, because every write
before it was flushed, fsynced and (for whole files) renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrec import aggregation, report
from fedrec.checkpoint import load_checkpoint
from fedrec.clients.app import app as client_app
from fedrec.config import RunConfig
from fedrec.federation import run as run_mod
from fedrec.federation.state import FederationError, ResumeError
from fedrec.privacy.ledger import Ledger, LedgerError, line_hash
from fedrec.report import RunRecorder
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

SMALL = {"world-users": 60, "world-items": 40, "world-events-per-user": 8, "rounds": 3, "cohort": 20,
         "nodes": 1, "engine": "local", "progress": False, "dim": 4, "local-steps": 2, "user-fit-steps": 3,
         "privacy": "user", "noise-multiplier": 1.0, "clip": 0.5, "uptake-probe": False}
OUTPUTS = ("metrics.jsonl", "summary.json", "global_model.npz")


class Killed(BaseException):
    """Stands for a SIGKILL at the point that raises it (no `except Exception` catches it)."""


def _cfg(out: Path, **kw) -> RunConfig:
    return RunConfig.from_mapping({**SMALL, **{k.replace("_", "-"): v for k, v in kw.items()}, "out": str(out)},
                                  where="test")


def _run(out: Path, app=client_app, **kw) -> dict:
    cfg = _cfg(out, **kw)
    return run_federation(LocalGrid(app, cfg.nodes, cfg.to_flat()), cfg)


def _killed_before_finish(out: Path, monkeypatch, app=client_app, **kw) -> None:
    """A run killed after its last round's checkpoint, before any output is written."""
    with monkeypatch.context() as m:
        m.setattr(run_mod._Run, "finish", lambda self: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            _run(out, app, **kw)


def _edit_checkpoint(out: Path, **arrays) -> Path:
    """Overwrite entries of ``out``'s checkpoint (an edit by hand, not through fedrec); its path."""
    path = out / "checkpoint.npz"
    with np.load(path) as z:
        merged = {**{k: z[k] for k in z.files}, **arrays}
    np.savez(path, **merged)  # type: ignore[arg-type]
    return path


def _ledger(out: Path) -> Path:
    return out / "privacy_ledger.jsonl"


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# ---- the ledger's chain -------------------------------------------------------------------------------------------


def test_each_line_chains_the_hash_of_the_one_before(tmp_path):
    out = tmp_path / "run"
    _run(out)
    lines = _ledger(out).read_bytes().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["prev"] == ""
    for before, line in zip(lines, lines[1:], strict=False):
        assert json.loads(line)["prev"] == line_hash(before)
    mark = load_checkpoint(out / "checkpoint.npz")["run"]["ledger"]
    assert mark == Ledger(_ledger(out)).mark() and mark["records"] == 3 and mark["bytes"] == len(
        _ledger(out).read_bytes())


def test_a_ledger_of_an_earlier_version_is_read_and_continued_chained(tmp_path):
    path = tmp_path / "l.jsonl"
    old = json.dumps({"kind": "server-gaussian", "unit": "user", "round": 1, "noise_multiplier": 1.0,
                      "sample_rate": 0.5})
    path.write_text(old + "\n")
    led = Ledger(path)
    led.append(led.records[0])
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[1])["prev"] == line_hash(lines[0])
    assert len(Ledger(path).records) == 2
    path.write_text(path.read_text() + old + "\n")  # an unchained line after a chained one: an edit
    with pytest.raises(LedgerError, match=f"{path}:3"):
        Ledger(path)


# ---- tampering refused on resume ----------------------------------------------------------------------------------


def _delete_middle(p: Path) -> None:
    lines = p.read_text().splitlines(keepends=True)
    p.write_text(lines[0] + "".join(lines[2:]))


def _delete_last(p: Path) -> None:
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:-1]))


def _edit_noise(p: Path, line: int) -> None:
    lines = p.read_text().splitlines(keepends=True)
    lines[line] = lines[line].replace('"noise_multiplier": 1.0', '"noise_multiplier": 9.0')
    p.write_text("".join(lines))


@pytest.mark.parametrize("tamper, says", [
    (_delete_middle, "was edited, removed or reordered"),
    (_delete_last, "is shorter than the checkpoint"),
    (lambda p: _edit_noise(p, 0), "was edited, removed or reordered"),
    (lambda p: _edit_noise(p, 2), "does not match the checkpoint"),  # the last line: only the checkpoint knows
    (lambda p: p.unlink(), "is missing"),
])
def test_a_tampered_ledger_is_refused_on_resume(tmp_path, monkeypatch, tamper, says):
    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch)
    tamper(_ledger(out))
    left = _files(out)
    with pytest.raises(LedgerError) as e:
        _run(out, rounds=4)
    msg = str(e.value)
    assert says in msg and str(_ledger(out)) in msg and "\n" not in msg
    assert _files(out) == left  # refused before anything was written


def test_an_untouched_ledger_resumes_and_epsilon_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch, rounds=2)
    summary = _run(out, rounds=3)
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]
    assert [r.round for r in Ledger(_ledger(out)).records] == [1, 2, 3]
    assert summary["privacy"]["user"]["releases"] == 3


def test_a_finished_run_continued_in_the_same_out_checks_the_ledger_too(tmp_path):
    out = tmp_path / "run"
    _run(out, rounds=2)
    _delete_last(_ledger(out))  # ε of the next run would start lower
    with pytest.raises(LedgerError, match="shorter"):
        _run(out, rounds=2)


def test_a_checkpoint_set_back_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch, rounds=3)
    _edit_checkpoint(out, round=np.asarray(1))
    with pytest.raises(ResumeError, match="at round 1 but holds the metrics of round 3"):
        _run(out, rounds=3)


# ---- a kill between the last round and the outputs ----------------------------------------------------------------


def _check_done_once(out: Path, rounds: int) -> None:
    """Every round once in the metrics, one release per round, and the run finished with its outputs."""
    assert [r["round"] for r in _rows(out)] == list(range(1, rounds + 1))
    assert [r.round for r in Ledger(_ledger(out)).records] == list(range(1, rounds + 1))
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck["run"]["finished"] and ck["round"] == rounds
    np.testing.assert_array_equal(np.load(out / "global_model.npz")["item.weight"], ck["global"]["item.weight"])
    assert json.loads((out / "summary.json").read_text())["privacy"]["user"]["releases"] == rounds


def test_a_kill_before_the_outputs_resumes_without_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch)
    assert not load_checkpoint(out / "checkpoint.npz")["run"]["finished"]  # outputs first, then "finished"
    assert not (out / "summary.json").exists()
    _run(out)
    _check_done_once(out, 3)


@pytest.mark.parametrize("at", ["hr_epsilon.png", "global_model.npz", "metrics.jsonl", "summary.json"])
def test_a_kill_while_the_outputs_are_written_resumes_without_training(tmp_path, monkeypatch, at):
    """Killed as the output ``at`` is written (those before it are in place): not yet marked finished."""
    out = tmp_path / "run"
    finishing = []

    def dying(write):
        def guarded(path, arg):
            if finishing and Path(path).name == at:
                raise Killed()
            return write(path, arg)
        return guarded

    def finish(self, *a, **kw):
        finishing.append(True)
        return real_finish(self, *a, **kw)

    real_finish = RunRecorder.finish
    with monkeypatch.context() as m:
        m.setattr(report, "write_atomic", dying(report.write_atomic))
        m.setattr(report, "write_bytes_atomic", dying(report.write_bytes_atomic))
        m.setattr(RunRecorder, "finish", finish)
        with pytest.raises(Killed):
            _run(out)
    assert not load_checkpoint(out / "checkpoint.npz")["run"]["finished"]
    assert not (out / "summary.json").exists()
    _run(out)
    _check_done_once(out, 3)


def test_a_finished_checkpoint_without_outputs_rebuilds_them_and_trains_nothing(tmp_path):
    out = tmp_path / "run"
    first = _run(out)
    ledger = _ledger(out).read_bytes()
    model = np.load(out / "global_model.npz")["item.weight"]
    for name in ("summary.json", "global_model.npz"):
        (out / name).unlink()
    again = _run(out, rounds=5)  # more rounds asked: still only the outputs of the finished run
    assert _ledger(out).read_bytes() == ledger
    _check_done_once(out, 3)
    np.testing.assert_array_equal(np.load(out / "global_model.npz")["item.weight"], model)
    assert again["metrics"] == first["metrics"] and again["privacy"] == first["privacy"]
    assert any("nothing is trained" in n for n in again["notes"])


# ---- a failed start touches nothing -------------------------------------------------------------------------------


class _NoNodes:
    def discover(self, config: dict) -> list:
        return []


def test_a_failed_start_leaves_an_earlier_run_byte_identical(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(out, rounds=2)
    before = _files(out)
    cfg = _cfg(out, rounds=2)
    with pytest.raises(FederationError, match="No node"):  # discovery fails
        run_mod.run_federation(_NoNodes(), cfg)  # type: ignore[arg-type]
    assert _files(out) == before
    with monkeypatch.context() as m:  # calibration (or any other set-up step) fails
        m.setattr(run_mod, "user_noise", lambda cfg, q: (_ for _ in ()).throw(ValueError("cannot calibrate")))
        with pytest.raises(ValueError, match="cannot calibrate"):
            _run(out, rounds=2)
    assert _files(out) == before
    _killed_before_finish(out, monkeypatch, rounds=2)  # a new run over the finished one: its files are its own now
    before = _files(out)
    with pytest.raises(ResumeError, match="belongs to a run with"):  # a checkpoint of another config
        _run(out, rounds=2, clip=0.25)
    assert _files(out) == before
    (out / "checkpoint.npz").write_bytes(b"PK\x03\x04 torn")
    before = _files(out)
    with pytest.raises(Exception, match="not a readable fedrec checkpoint"):
        _run(out, rounds=2)
    assert _files(out) == before


def test_the_recorder_writes_nothing_before_it_begins(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")
    rec = RunRecorder(_cfg(out))
    rec.load_state_dict({**RunRecorder(_cfg(tmp_path / "other")).state_dict(), "rows": [{"round": 1}]})
    assert (out / "metrics.jsonl").read_text() == "earlier\n"
    rec.begin()
    assert _rows(out) == [{"round": 1}]


# ---- the server checks its own new version ------------------------------------------------------------------------


def test_a_non_finite_model_is_not_published(tmp_path, monkeypatch):
    real = aggregation.from_config

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def step(self, gstate, *a, **kw):
            diag = self.inner.step(gstate, *a, **kw)
            self.calls += 1
            if self.calls == 2:  # round 2 overflows (as --clip 1e300 does in float32)
                next(iter(gstate.values()))[0, 0] = float("inf")
            return diag

    monkeypatch.setattr(aggregation, "from_config", lambda *a, **kw: Poisoned(real(*a, **kw)))
    out = tmp_path / "run"
    with pytest.raises(FederationError) as e:
        _run(out)
    msg = str(e.value)
    assert msg.startswith("Round 2 produced a global model with non-finite values") and "not published" in msg
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck["round"] == 1 and not ck["run"]["finished"]  # the last version published is round 1's
    assert all(np.isfinite(v).all() for v in ck["global"].values())
    assert not (out / "global_model.npz").exists() and not (out / "summary.json").exists()


def test_the_command_line_refuses_a_deleted_ledger_with_one_sentence(tmp_path, monkeypatch, capsys):
    from fedrec.cli import main

    out = tmp_path / "run"
    argv = ["simulate", "--out", str(out), "--no-progress",
            *[f"--{k}={v}" for k, v in SMALL.items() if k != "progress" and not isinstance(v, bool)],
            "--no-uptake-probe"]
    with monkeypatch.context() as m:
        m.setattr(run_mod._Run, "finish", lambda self: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            main(argv)
    _ledger(out).unlink()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedrec: The privacy ledger {_ledger(out)} is missing") and "\n" not in err


# ---- at-least-once delivery: the server acknowledges the updates it kept ------------------------------------------


def test_each_request_acknowledges_the_updates_the_server_kept_and_so_does_its_checkpoint(tmp_path, monkeypatch):
    """Every request to train tells each device the round of its newest update that the server kept (-1: none),
    from the checkpointed state, and a resumed server tells the same (clients.device trains a lost one again)."""
    from fedrec.clients.records import from_records
    from fedrec.messages import decode_reply, decode_train

    asked: dict[int, dict[int, int]] = {}  # round -> device -> acked
    sent: dict[int, set[int]] = {}  # round -> devices whose update the node sent

    def node(msg, ctx):
        rep = client_app(msg, ctx)
        if msg.metadata.message_type == "train" and not rep.has_error():
            ins = decode_train(from_records(msg.content)).instruction
            asked[ins.round] = {d: ins.acked_for(d) for d in ins.devices}
            sent[ins.round] = {u.device for u in decode_reply(from_records(rep.content)).updates}
        return rep

    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch, node, rounds=2)  # killed after round 2's checkpoint
    _run(out, node, rounds=4)  # resumed for rounds 3 and 4
    last: dict[int, int] = {}
    for r in sorted(asked):
        assert asked[r] == {d: last.get(d, -1) for d in asked[r]}
        last.update({d: r for d in sent[r]})
    assert any(a >= 1 for r in asked for a in asked[r].values())  # some device was asked again after a kept update
    ck = load_checkpoint(out / "checkpoint.npz")["acked"]
    assert dict(zip(ck["devices"].tolist(), ck["rounds"].tolist(), strict=True)) == last


def test_a_checkpoint_with_damaged_acknowledgements_is_refused(tmp_path, monkeypatch):
    from fedrec.checkpoint import CheckpointError

    out = tmp_path / "run"
    _killed_before_finish(out, monkeypatch, rounds=2)
    rounds = load_checkpoint(out / "checkpoint.npz")["acked"]["rounds"]
    path = _edit_checkpoint(out, **{"acked:rounds": rounds[:-1]})
    with pytest.raises(CheckpointError, match="acknowledged updates are damaged"):
        load_checkpoint(path)

"""Every user error is one sentence: exit 2, no traceback, nothing written under ``--out``.

A fuzz over every key's extremes (just outside its bounds, huge, the wrong type), the cases a
user met as tracebacks (issue 19), data files with ids beyond int64, TOML files that used to be
read wrongly, and the device store's SQLite failures.
"""

from __future__ import annotations

import json
import math
import sqlite3
import stat
from pathlib import Path

import pytest

from fedrec.cli import main
from fedrec.clients.store import EventStore, StoreError, store_error
from fedrec.config import KeySpec, RunConfig
from fedrec.deploy.stores import fill_stores


def _outside(typ: type, spec: KeySpec) -> list[str]:
    """Values just outside the key's bounds, a huge one, and one of the wrong type, as flag text."""
    vals: list[float] = []
    lows = [(spec.ge, -1), (spec.gt, 0)]
    highs = [(spec.le, 1), (spec.lt, 0)]
    for bound, step in lows + highs:
        if bound is None:
            continue
        if typ is int:
            vals.append(int(bound) + step)
        else:
            vals.append(bound if step == 0 else math.nextafter(bound, step * math.inf))
    vals += [10**30] if typ is int else [1e300, -1e300]
    return [str(v) for v in vals] + ["not-a-number"]


def _cases() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    for key, (typ, _, spec) in RunConfig.specs().items():
        if typ in (int, float):
            cases += [(key, v) for v in _outside(typ, spec)]
        elif spec.choices:
            cases.append((key, "no-such-choice"))
    return cases + [("device", "tpu"), ("device", "cuda:x"), ("data", "/no/such/file.csv")]


def _run(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; assert exit 2, no traceback, one line, nothing written; the line."""
    try:
        engine = [] if "--engine" in args else ["--engine", "local"]
        rc = main([*args, "--out", str(out), *engine, "--no-progress"])
    except SystemExit as e:  # argparse's own refusal of a value that is not of the flag's type
        rc = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert rc == 2, (args, err)
    assert "Traceback" not in err, err
    assert not out.exists(), f"{args} wrote {sorted(out.iterdir())}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(("fedrec: ", "fedrec simulate: error: ")), err
    return last


@pytest.mark.parametrize("key, value", _cases())
def test_every_keys_extremes_are_one_sentence_exit_2_nothing_written(key, value, tmp_path, capsys):
    line = _run(["simulate", f"--{key}", value], tmp_path / "out", capsys)
    assert key in line or "No such data file" in line, line


@pytest.mark.parametrize("key, value", [(k, v) for k, v in _cases() if v != "not-a-number"])
def test_the_same_extremes_in_a_config_file(key, value, tmp_path, capsys):
    typ = RunConfig.specs()[key][0]
    text = value if typ in (int, float) else f'"{value}"'
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"{key} = {text}\n")
    line = _run(["simulate", "--config", str(cfg)], tmp_path / "out", capsys)
    assert key in line or "No such data file" in line, line


@pytest.mark.parametrize("key, text", [("rounds", '"30"'), ("lr", "[1.0]"), ("progress", '"maybe"'),
                                       ("out", "3"), ("epsilon", "inf"), ("clip", "nan")])
def test_a_value_of_the_wrong_type_in_a_config_file(key, text, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"{key} = {text}\n")
    assert key in _run(["simulate", "--config", str(cfg)], tmp_path / "out", capsys)


# the flags issue 19 found ending in a traceback, each with the words its sentence must hold
REPORTED = [
    (["--epsilon", "1e-9"], "privacy accounting fails for epsilon = 1e-09"),
    (["--delta", "1e-300"], "privacy accounting fails"),
    (["--noise-multiplier", "1e-300"], "noise multiplier is too small or too large"),
    (["--noise-multiplier", "1e300"], "'noise-multiplier' must be at most 10000"),
    (["--clip", "1e300"], "'clip' must be at most"),
    (["--seed", "-1"], "'seed' must lie in [0, 4294967295]"),
    (["--seed", str(2**64)], "'seed' must lie in"),
    (["--world-items", "1"], "'world-items' must be at least 2 per topic"),
    (["--rounds", str(9 * 10**18)], "'rounds' must be at most"),
    (["--rounds", "9e18"], "invalid int value"),
    (["--dim", str(10**8)], "'dim' must be at most 4096"),
    (["--world-users", str(10**9)], "'world-users' must be at most"),
    (["--world-users", "5000000"], "'world-users' must be at most 4000000 with world-events-per-user = 25"),
    (["--negatives", "100000"], "'negatives' must be below world-items (400)"),
    (["--k", "401"], "'k' must be at most world-items (400)"),
    (["--dim", "4096", "--world-items", "1000000"], "'dim' must be at most 1000"),
]


@pytest.mark.parametrize("flags, says", REPORTED, ids=[" ".join(f) for f, _ in REPORTED])
def test_the_reported_flags_are_one_sentence(flags, says, tmp_path, capsys):
    line = _run(["simulate", "--world-users", "50", "--cohort", "10", *flags, "--rounds", flags[1]
                 if flags[0] == "--rounds" else "1"], tmp_path / "out", capsys)
    assert says in line, line


def test_cuda_without_cuda_is_one_sentence(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _run(["simulate", "--world-users", "50", "--rounds", "1", "--device", "cuda"], tmp_path / "out", capsys)
    assert "'device' asks for 'cuda' but CUDA is not available" in line


def test_calibration_failures_name_the_budget(tmp_path, capsys):
    line = _run(["simulate", "--world-users", "50", "--rounds", "1", "--privacy", "event", "--epsilon", "1e-6"],
                tmp_path / "out", capsys)
    assert "epsilon = 1e-06" in line and "raise epsilon or delta" in line


def test_deploy_checks_the_run_before_any_process_starts(tmp_path, capsys):
    line = _run(["deploy", "local", "--devices", "2", "--rounds", "1", "--privacy", "event", "--epsilon", "1e-6"],
                tmp_path / "out", capsys)
    assert "epsilon = 1e-06" in line and "raise epsilon or delta" in line


# ---- data files ------------------------------------------------------------------------------
@pytest.mark.parametrize("row, says", [("99999999999999999999999::6::4::101", "user id"),
                                       ("2::99999999999999999999::4::101", "item id"),
                                       ("-99999999999999999999999::6::4::101", "user id")])
def test_movielens_ids_beyond_int64_are_one_sentence(row, says, tmp_path, capsys):
    data = tmp_path / "ratings.dat"
    data.write_text("1::5::3::100\n" + row + "\n")
    line = _run(["simulate", "--data", str(data), "--rounds", "1"], tmp_path / "out", capsys)
    assert f"{data}:2: {says}" in line and "64-bit integer range" in line


def test_negatives_beyond_a_data_files_catalogue_are_one_sentence(tmp_path, capsys):
    data = tmp_path / "ratings.dat"
    data.write_text("".join(f"{u}::{i}::4::{100 + 10 * u + i}\n" for u in range(6) for i in range(5)))
    line = _run(["simulate", "--data", str(data), "--rounds", "1", "--negatives", "100000"], tmp_path / "out",
                capsys)
    assert "'negatives' must be below the 5 items of" in line and str(data) in line


# ---- TOML files ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, says", [("privacy = { a = 1 }\n", "'privacy' is a table"),
                                        ("[extra]\nrounds = 3\n", "'extra' is a table"),
                                        ("world-users = 10\nworld_users = 20\n",
                                         "'world-users' is given twice"),
                                        ("[run]\nrounds = 3\nrounds_ = 1\n", "Unknown config key 'rounds_'")])
def test_toml_tables_and_duplicate_spellings_are_refused(text, says, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    assert says in _run(["simulate", "--config", str(cfg)], tmp_path / "out", capsys)


# ---- the device store ------------------------------------------------------------------------
def _store(tmp_path: Path) -> EventStore:
    return EventStore(tmp_path / "d.sqlite", create=True, device_id=0, n_items=10)


def test_a_new_store_is_readable_by_its_owner_only(tmp_path):
    with _store(tmp_path) as s:
        s.record(1, timestamp=1.0)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_a_locked_store_is_a_store_error_naming_it(tmp_path):
    with _store(tmp_path) as s:
        s._db.execute("PRAGMA busy_timeout = 50")
        other = sqlite3.connect(s.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError, match=f"The device store {s.path} is locked by another process"):
                s.record(1, timestamp=1.0)
        finally:
            other.execute("ROLLBACK")
            other.close()


def test_a_damaged_schema_is_a_store_error_naming_it(tmp_path):
    with _store(tmp_path) as s:
        s._db.execute("DROP TABLE events")
        with pytest.raises(StoreError, match=f"The device store {s.path} is damaged .*no such table: events"):
            s.record(1, timestamp=1.0)
        with pytest.raises(StoreError, match="is damaged"):
            s.count()


def test_a_read_only_store_is_a_store_error_naming_it(tmp_path):
    # root ignores file modes, so the read-only case is SQLite's own error, as the store sees it
    e = store_error(tmp_path / "d.sqlite", sqlite3.OperationalError("attempt to write a readonly database"))
    assert str(e) == f"The device store {tmp_path / 'd.sqlite'} is read-only; the device needs to write to it."


@pytest.mark.parametrize("leftover", ["empty", "tables-missing", "part"])
def test_a_half_created_store_is_made_again(leftover, tmp_path):
    cfg = RunConfig(world_users=4, rounds=2, out=str(tmp_path))
    d = tmp_path / "devices"
    d.mkdir()
    if leftover == "empty":
        (d / "device-0.sqlite").touch()
    elif leftover == "tables-missing":
        sqlite3.connect(d / "device-0.sqlite").execute("PRAGMA user_version = 0").connection.close()
        (d / "device-0.sqlite").write_bytes(b"")
    else:
        (d / "device-0.sqlite.part").write_bytes(b"half")
    paths = fill_stores(cfg, 2, d)
    for i, p in enumerate(paths):
        with EventStore(p) as s:
            assert s.device_id == i and s.count() > 0
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not list(d.glob("*.part*"))


def test_a_budget_spent_before_the_first_round_is_one_sentence_not_a_traceback(tmp_path, capsys):
    rc = main(["simulate", "--privacy", "user", "--epsilon", "0.05", "--no-calibrate", "--rounds", "2",
               "--world-users", "60", "--cohort", "30", "--engine", "local", "--no-progress",
               "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    # nothing could be released: one sentence, exit 2, and nothing written (it used to write empty outputs, exit 0)
    assert rc == 2 and "Traceback" not in out.err + out.out
    assert "Nothing to run: user-level budget spent: round 1 would bring epsilon to" in out.err + out.out
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "summary.json").exists()


def test_a_run_into_a_folder_whose_ledger_spent_the_budget_keeps_the_earlier_outputs(tmp_path, capsys):
    """A second run into a finished run's folder continues its ledger; where that ledger leaves no budget for one
    more release it ends in one sentence, exit 2, and the earlier run's outputs stay as they were (they were
    replaced by empty ones)."""
    args = ["simulate", "--privacy", "user", "--rounds", "2", "--world-users", "60", "--cohort", "30", "--engine",
            "local", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    spent = json.loads((tmp_path / "out" / "summary.json").read_text())["privacy"]["user"]["epsilon"]
    capsys.readouterr()
    assert main([*args, "--epsilon", f"{spent * 1.01:.4f}"]) == 2
    out = capsys.readouterr()
    assert "Nothing to run: user-level budget spent" in out.out + out.err and "2 earlier releases" in out.out + out.err
    assert "continuing the privacy ledger" not in out.out + out.err  # the refusal is its one sentence
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_new_run_in_a_finished_run_s_folder_moves_its_outputs_aside_and_replaces_none(tmp_path, capsys):
    """A second run in a finished run's folder continues its ledger (the composition goes on); the first run's
    outputs move to ``earlier/run-1`` before anything is written (they used to be replaced)."""
    out = tmp_path / "out"
    args = ["simulate", "--privacy", "none", "--rounds", "2", "--world-users", "40", "--cohort", "12", "--engine",
            "local", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "privacy_ledger.jsonl"}
    assert main([*args, "--seed", "3"]) == 0
    assert "were moved to" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "earlier" / "run-1").iterdir()} == first
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 3
    assert main([*args, "--seed", "4"]) == 0 and (out / "earlier" / "run-2" / "summary.json").is_file()

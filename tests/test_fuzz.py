"""Bad input everywhere: fuzzed configs, data files, device-store events and CLI flags.

Whatever a user hands fedrec, it either works or fails with the project's own error type (one
sentence naming the place); never an unexplained exception.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.cli import main
from fedrec.clients.device import Device
from fedrec.clients.store import StoreError
from fedrec.config import ConfigError, RunConfig
from fedrec.data.events import DataError
from fedrec.data.loaders import load_events

KEYS = RunConfig.keys()
values = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), values, max_size=4))
def test_any_config_mapping_builds_or_fails_with_a_config_error_naming_the_key(mapping):
    try:
        RunConfig.from_mapping(mapping, where="fuzz")
    except ConfigError as e:
        msg = str(e)
        assert "fuzz" in msg and "\n" not in msg
        assert any(repr(str(k)) in msg or f"'{str(k).replace('_', '-')}'" in msg for k in mapping)


lines = st.lists(st.text(alphabet=st.sampled_from(list("0123456789,.:-:e \tabcx\"") + ["\u00e9", "\x00"]),
                         max_size=30), min_size=1, max_size=6)
headers = st.sampled_from(["", "user,item,timestamp\n", "userId,movieId,rating,timestamp\n",
                           "user,item,timestamp,weight,kind\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers, lines, st.sampled_from(["ratings.csv", "data.csv", "u.data", "ratings.dat"]))
def test_any_data_file_loads_or_fails_with_a_data_error_naming_file_and_line(header, body, name):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(header + "\n".join(body) + "\n")
        try:
            log = load_events(p)
        except DataError as e:
            assert name in str(e)
        else:
            assert len(log) >= 0


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-5, 70), st.floats(allow_nan=True), st.text(max_size=3), st.none()),
       st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)),
       st.one_of(st.sampled_from(["click", "view", "purchase", "rating", "event"]), st.text(max_size=6)),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)))
def test_any_event_is_recorded_or_refused_with_a_store_error(item, ts, kind, weight):
    with tempfile.TemporaryDirectory() as d, Device(Path(d) / "s.sqlite", create=True, device_id=0, n_items=60) as dev:
        try:
            dev.record(item, timestamp=ts, kind=kind, weight=weight)
        except StoreError as e:
            assert "Event" in str(e)
            assert dev.store.count() == 0
        else:
            assert dev.store.count() == 1
            assert isinstance(item, int) and 0 <= item < 60 and (ts is None or math.isfinite(ts))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["--rounds", "--cohort", "--epsilon", "--clip", "--privacy", "--model", "--aggregator",
                        "--trim", "--attackers", "--wire", "--server-opt", "--delta", "--data", "--config"]),
       st.sampled_from(["0", "-1", "nan", "inf", "abc", "1e309", "", "2", "/no/such/file", "0.7"]))
def test_bad_cli_flags_end_in_one_sentence_and_exit_2(capsys, flag, value):
    capsys.readouterr()
    other = ["--cohort", "-1"] if flag != "--cohort" else ["--rounds", "0"]  # never starts a run
    try:
        code = main(["simulate", flag, value, *other])
    except SystemExit as e:  # argparse refuses a value of the wrong type before fedrec sees it
        code = e.code
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
    else:
        err = capsys.readouterr().err
        assert err.startswith("fedrec: ") and err.count("\n") == 1
    assert code == 2


def test_a_config_file_that_is_not_toml_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"rounds = = 3\n\xff")
    assert main(["simulate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and err.count("\n") == 1


@pytest.mark.parametrize("args", [["deploy", "local", "--devices", "0"], ["deploy", "local", "--privacy", "loud"],
                                  ["deploy", "local", "--data", "/no/such/ratings.csv"]])
def test_deploy_refuses_bad_input_before_starting_anything(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrec: ") and err.count("\n") == 1

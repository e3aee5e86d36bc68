"""One source of configuration: each key's default, help, bounds and choices live on RunConfig's fields;
the pyproject table, the per-key checks and the CLI flags are made from them."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fedrec.cli import _parser, build_config, main
from fedrec.config import ConfigError, RunConfig, dump_toml, load_pyproject_defaults, pyproject_table, toml_value
from fedrec.config import main as config_main


def test_pyproject_defaults_equal_runconfig_defaults():
    assert load_pyproject_defaults() == RunConfig().to_flat()


def test_pyproject_table_is_a_checked_copy_key_for_key_in_order_and_type():
    table, want = load_pyproject_defaults(), RunConfig().to_flat()
    assert list(table) == list(want), "regenerate with: python -m fedrec.config --pyproject"
    for k, v in want.items():
        assert table[k] == v and type(table[k]) is type(v), k


def test_the_pyproject_generator_writes_the_defaults(capsys):
    assert config_main(["--pyproject"]) == 0
    out = capsys.readouterr().out
    assert out == pyproject_table() and out.startswith("[tool.flwr.app.config]\n")
    assert out == "[tool.flwr.app.config]\n" + dump_toml(RunConfig().to_flat())
    parsed = tomllib.loads(out)["tool"]["flwr"]["app"]["config"]
    assert list(parsed.items()) == list(load_pyproject_defaults().items())
    assert config_main(["--bogus"]) == 2


def test_the_pyproject_generator_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "fedrec.config", "--pyproject"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == pyproject_table()


@pytest.mark.parametrize("value", [True, False, 0, -3, 10**12, 0.1, 1e-5, -2.5, 600.0, "", "runs/latest",
                                   'a "quoted" path\\with\\backslashes', "caf\u00e9 \u65e5\u672c", "tab\there\nnl"])
def test_the_toml_writer_round_trips_every_kind_of_value(value):
    back = tomllib.loads(f"x = {toml_value(value)}\n")["x"]
    assert back == value and type(back) is type(value)


def test_model_keys_are_checked_with_a_sentence():
    for name in ("mf", "neumf", "sasrec"):
        assert RunConfig.from_mapping({"model": name, "seq-len": 5}).model == name
    with pytest.raises(ConfigError, match=r"'model' must be one of mf, neumf, sasrec, deepfm \(got 'bert'\)"):
        RunConfig.from_mapping({"model": "bert"})
    with pytest.raises(ConfigError, match="'seq-len' must be at least 2"):
        RunConfig.from_mapping({"model": "sasrec", "seq-len": 1})
    with pytest.raises(ConfigError, match="must be mf with method = centralised"):
        RunConfig.from_mapping({"model": "neumf", "method": "centralised"})


# the sentences the generated per-key checks must give, written out by hand
SENTENCES = [
    ("rounds", 0, "must be at least 1"),
    ("world-bursts", -1, "must be 0 or more"),
    ("sample-rate", 0.0, "must lie in (0, 1]"),
    ("world-shift-share", 1.5, "must lie in [0, 1]"),
    ("world-new-item-share", 1.0, "must lie in [0, 1)"),
    ("trim", 0.5, "must lie in [0, 0.5)"),
    ("delta", 1.0, "must lie strictly between 0 and 1"),
    ("lr", 0.0, "must be positive"),
    ("user-lr", -1.0, "must be 0 (same as lr) or positive"),
    ("epsilon", -1.0, "must be 0 (no target) or positive"),
    ("round-timeout", 0.0, "must be a positive number of seconds"),
    ("async-buffer", -1, "must be 0 (synchronous) or a number of updates"),
    ("privacy", "loud", "must be one of none, event, user, both"),
    ("server-opt", "sgd", "must be one of fedavg, fedadagrad, fedadam, fedyogi"),
    ("aggregator", "max", "must be one of mean, trimmed-mean, median"),
    ("wire", "zip", "must be one of auto, dense, fp16, sparse"),
    ("clock", "now", "must be replay or live"),
    ("update-backend", "jax", "must be auto or autograd"),
    ("device", "tpu", "must be auto, cpu or cuda[:N]"),
    ("rounds", 2.5, "must be an integer"),
    ("lr", float("nan"), "must be a finite number"),
    ("progress", "yes", "must be true or false"),
    ("out", 3, "must be a string"),
]


@pytest.mark.parametrize("key, value, rule", SENTENCES)
def test_each_key_fails_with_its_sentence(key, value, rule):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: value}, where="here")
    assert str(e.value) == f"Config key '{key}' {rule} (got {value!r}). [here]"


@pytest.mark.parametrize("mapping, key, rule", [
    ({"privacy": "event", "event-noise": "device", "wire": "sparse"}, "wire", "cannot be sparse under event-level DP"),
    ({"privacy": "event", "model": "deepfm", "wire": "sparse"}, "wire", "cannot be sparse under event-level DP"),
    ({"privacy": "none", "secure-aggregation": True}, "secure-aggregation", "needs privacy = user or both"),
    ({"aggregator": "median"}, "aggregator", "must be mean under user-level DP"),
    ({"async-buffer": 2}, "async-buffer", "must be 0 under user-level DP"),
    ({"secure-aggregation": True, "slow-devices": 0.1}, "slow-devices", "must be 0 with secure-aggregation"),
    ({"secure-aggregation": True, "min-reply-share": 0.5}, "min-reply-share", "must be 1 with secure-aggregation"),
    ({"noise-multiplier": 0.0}, "noise-multiplier", "must be positive when privacy is on"),
    ({"privacy": "none", "epsilon": 4.0}, "epsilon", "is a privacy budget, which privacy = none does not have"),
])
def test_rules_across_keys_name_the_key(mapping, key, rule):
    with pytest.raises(ConfigError, match=f"Config key '{key}' {rule}"):
        RunConfig.from_mapping(mapping)


@pytest.mark.parametrize("privacy, event, user", [("none", False, False), ("event", True, False),
                                                  ("user", False, True), ("both", True, True)])
def test_event_dp_and_user_dp_follow_the_privacy_mode(privacy, event, user):
    cfg = RunConfig.from_mapping({"privacy": privacy, "wire": "dense"})
    assert (cfg.event_dp, cfg.user_dp) == (event, user)


def test_every_key_declares_a_help_sentence():
    for key, (typ, default, spec) in RunConfig.specs().items():
        assert spec.help.strip() and "\n" not in spec.help, key
        assert type(default) is typ, key
        assert spec.holds(default), key


@pytest.mark.parametrize("cmd", [["simulate"], ["deploy", "local"]])
def test_help_lists_every_key_with_its_help_default_and_choices(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    entries: dict[str, str] = {}  # flag -> its usage and help (a long flag's help starts on the next line)
    for ln in capsys.readouterr().out.splitlines():
        if ln.strip().startswith("-"):
            flag = ln.split()[0].rstrip(",")
            entries[flag] = ln
        elif entries and ln.startswith("   "):
            entries[flag] += " " + ln.strip()
    for key, (typ, default, spec) in RunConfig.specs().items():
        line = entries[f"--{key}"]
        assert spec.help in line and f"default {toml_value(default)}" in line, key
        if typ is bool:
            assert f"--no-{key}" in line, key
        for choice in spec.choices:
            assert choice in line, key


def test_flags_override_the_config_file_which_overrides_pyproject(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 4\ncohort = 7\nprogress = false\nprivacy = "none"\n')
    cfg = build_config(_parser().parse_args(["simulate", "--config", str(f), "--rounds", "9", "--lr", "2"]))
    assert (cfg.rounds, cfg.cohort, cfg.lr, cfg.progress, cfg.privacy) == (9, 7, 2.0, False, "none")
    assert cfg.dim == RunConfig().dim  # from pyproject
    cfg = build_config(_parser().parse_args(["simulate", "--config", str(f), "--progress"]))
    assert cfg.progress is True


def test_bool_flags_keep_their_old_spellings():
    args = _parser().parse_args(["simulate", "--no-progress", "--secure-aggregation"])
    cfg = build_config(args)
    assert cfg.progress is False and cfg.secure_aggregation is True
    cfg = build_config(_parser().parse_args(["deploy", "local", "--devices", "3", "--no-progress"]))
    assert cfg.progress is False and cfg.secure_aggregation is False


def test_a_bad_flag_value_is_one_sentence_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--rounds", "x"])
    assert e.value.code == 2 and "argument --rounds: invalid int value: 'x'" in capsys.readouterr().err
    assert main(["simulate", "--privacy", "loud"]) == 2  # choices are RunConfig's to check, with its sentence
    err = capsys.readouterr().err
    assert err == "fedrec: Config key 'privacy' must be one of none, event, user, both (got 'loud'). [command line]\n"


def test_event_noise_goes_to_the_aggregate_where_the_run_allows_it():
    auto = RunConfig(privacy="event")
    assert auto.aggregate_noise and auto.steps == 1  # mf, one local step: noise once on the sum
    for model in ("neumf", "deepfm"):  # a sample per event: a release clipped per event, through Opacus
        assert RunConfig(privacy="event", model=model).aggregate_noise
    assert RunConfig(privacy="event", update_backend="autograd").aggregate_noise
    for other in ({"model": "sasrec"}, {"local-steps": 5}, {"async-buffer": 3}):
        cfg = RunConfig.from_mapping({"privacy": "event", **other})
        assert not cfg.aggregate_noise, other  # no release bounded per event: noise on each device
    assert RunConfig(privacy="event").steps == 1 and RunConfig(privacy="event", event_noise="device").steps == 10
    assert not RunConfig(privacy="both").aggregate_noise and not RunConfig(privacy="user").aggregate_noise
    assert RunConfig(privacy="none").steps == 10 and RunConfig(privacy="none", local_steps=3).steps == 3
    with pytest.raises(ConfigError, match="Config key 'local-steps' must be 1 with event-noise = aggregate"):
        RunConfig.from_mapping({"privacy": "event", "event-noise": "aggregate", "local-steps": 5})


def test_the_auto_cohort_takes_every_device_only_where_the_noise_is_on_the_sum():
    assert RunConfig(privacy="event").cohort_for(610) == 610  # noise at the aggregate: no device left out
    assert RunConfig(privacy="event").cohort_for(10**6) == 5000  # up to the cap, a compute bound
    assert RunConfig(privacy="user").cohort_for(610) == 300  # the sampling rate of the user-level accounting
    assert RunConfig(privacy="none").cohort_for(610) == 300
    assert RunConfig(privacy="event", event_noise="device").cohort_for(610) == 300
    assert RunConfig(privacy="event", cohort=40).cohort_for(610) == 40


def test_a_message_s_run_config_is_its_known_entries_checked_once():
    flat = {**RunConfig(privacy="event").to_flat(), "devices": "1,2", "round": 3}  # instructions beside the config
    a, b = RunConfig.of_message(flat, "server message"), RunConfig.of_message(dict(flat), "server message")
    assert a is b and a == RunConfig(privacy="event")  # the same entries: built and checked once
    with pytest.raises(ConfigError, match=r"lr.*\[server message\]"):
        RunConfig.of_message({**flat, "lr": -1.0}, "server message")
    with pytest.raises(ConfigError, match="cohort"):
        RunConfig.of_message({**flat, "cohort": [3]}, "server message")  # unhashable: refused without the cache


@pytest.mark.parametrize("text, words", [
    ("run = 3\n", "run must be a table"),
    ("[tool]\nflwr = 3\n", "'tool' is a table"),
    ("[tool.flwr.app]\nconfig = 3\n", "[tool.flwr.app.config] must be a table"),
    ("rounds = 99\n[run]\ncohort = 5\n", "keys beside the [run] table (rounds) would be ignored"),
])
def test_a_config_file_of_the_wrong_shape_fails_with_a_sentence(tmp_path, text, words):
    """A config file whose run table is not a table, or with keys beside ``[run]`` (silently ignored before), ends in
    one sentence naming the file (``run = 3`` raised AttributeError)."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_toml(p)
    assert words in str(e.value) and "c.toml" in str(e.value)
    (tmp_path / "ok.toml").write_text("[run]\nrounds = 7\n")
    assert RunConfig.from_toml(tmp_path / "ok.toml").rounds == 7


def test_an_empty_out_or_more_rounds_than_events_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """``--out ""`` wrote every output into the current folder; 1000 rounds of 300 events ran hundreds of empty
    rounds. Each ends in one sentence, exit 2, with nothing written."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "r.csv"
    data.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{i % 7},{i % 11},4.0,{1000 + i}\n" for i in range(30)))
    assert main(["simulate", "--out", "", "--world-users", "20", "--engine", "local", "--no-progress"]) == 2
    assert "Config key 'out' must name a folder" in "".join(capsys.readouterr())
    assert main(["simulate", "--data", str(data), "--rounds", "31", "--out", "o", "--engine", "local",
                 "--no-progress"]) == 2
    assert "Config key 'rounds' = 31 is more than the 30 events of" in "".join(capsys.readouterr())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


def test_a_folder_named_as_a_config_file_is_said_to_be_one(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder; name the config file in it\.$"):
        RunConfig.from_toml(tmp_path)

"""One source of configuration: the pyproject defaults are RunConfig's defaults, key for key."""

from fedrec.config import RunConfig, load_pyproject_defaults


def test_pyproject_defaults_equal_runconfig_defaults():
    assert load_pyproject_defaults() == RunConfig().to_flat()


def test_model_keys_are_checked_with_a_sentence():
    import pytest

    from fedrec.config import ConfigError

    for name in ("mf", "neumf", "sasrec"):
        assert RunConfig.from_mapping({"model": name, "seq-len": 5}).model == name
    with pytest.raises(ConfigError, match=r"'model' must be one of mf, neumf, sasrec \(got 'bert'\)"):
        RunConfig.from_mapping({"model": "bert"})
    with pytest.raises(ConfigError, match="'seq-len' must be at least 2"):
        RunConfig.from_mapping({"model": "sasrec", "seq-len": 1})
    with pytest.raises(ConfigError, match="must be mf with method = centralised"):
        RunConfig.from_mapping({"model": "neumf", "method": "centralised"})

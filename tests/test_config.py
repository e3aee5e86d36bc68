"""One source of configuration: the pyproject defaults are RunConfig's defaults, key for key."""

from fedrec.config import RunConfig, load_pyproject_defaults


def test_pyproject_defaults_equal_runconfig_defaults():
    assert load_pyproject_defaults() == RunConfig().to_flat()

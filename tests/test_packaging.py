"""Every package of the source tree is shipped: a subpackage missing from pyproject's list would import
in the editable install and vanish from the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    folders = {pkg: ROOT / folder for pkg, folder in cfg["package-dir"].items()}
    found = set()
    for pkg, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((pkg, *rel)))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"

"""Run mypy on fedrec's source folders under the module names they are installed as.

``[tool.setuptools.package-dir]`` in pyproject.toml installs ``clients/`` as ``fedrec.clients``
and ``server/`` as ``fedrec.server``. The editable install makes that mapping with an import
hook, which mypy never runs, and mypy has no setting that renames a folder: plain
``mypy fedrec clients server`` checks ``clients/app.py`` as ``clients.app``, and every
``fedrec.clients``/``fedrec.server`` import elsewhere fails to resolve. This script reads the
command line exactly as mypy does (so ``[tool.mypy]`` applies and any mypy flag may be added),
gives each source found in a mapped folder its installed name, and runs the same build, so
errors name the real files and types flow across the mapping.

Usage: ``python tools/typecheck.py fedrec clients server`` (``make lint`` runs it).
Exit status as mypy's: 0 clean, 1 type errors, 2 a blocking error.
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parent.parent


def folder_packages(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Folders that setuptools installs under another name: ``{"clients": "fedrec.clients", ...}``."""
    with pyproject.open("rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"].get("package-dir", {})
    return {folder.replace("/", "."): package for package, folder in package_dir.items() if folder != package}


def installed_name(module: str, mapping: dict[str, str]) -> str:
    """``clients.store`` -> ``fedrec.clients.store``; names outside a mapped folder are kept."""
    for folder, package in mapping.items():
        if module == folder or module.startswith(folder + "."):
            return package + module[len(folder) :]
    return module


def main(argv: list[str]) -> int:
    t0 = time.time()
    fscache = FileSystemCache()
    sources, options = process_options(argv, fscache=fscache)
    mapping = folder_packages()
    sources = [
        BuildSource(s.path, installed_name(s.module, mapping), s.text, s.base_dir, s.followed) for s in sources
    ]
    # run_build prints each file's messages as mypy does; the summary line below is mypy's own.
    _, messages, blockers = run_build(sources, options, fscache, t0, sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    n_errors, n_notes, n_files = util.count_stats(messages)
    if n_errors:
        print(formatter.format_error(n_errors, n_files, len(sources), blockers=blockers, use_color=False))
    else:
        print(formatter.format_success(len(sources), use_color=False))
    if blockers:
        return 2
    return 1 if messages and n_notes < len(messages) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

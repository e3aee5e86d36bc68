"""The layering of the package, read from the source with ``ast`` (nothing here imports fedrec).

- The protocol in ``fedrec/`` is plain Python and PyTorch: only the command line
  (``fedrec/cli.py``) and the deployment helpers (``fedrec/deploy/``) may import Flower.
- Models know nothing of the protocol or of the device SDK: ``fedrec/models/`` imports neither
  ``fedrec.client_update``, ``fedrec.messages``, ``fedrec.federation``, ``fedrec.serving`` nor
  ``fedrec.clients`` (installed from ``clients/``).
- No function in ``fedrec/``, ``clients/`` or ``server/`` is longer than 60 lines
  (``tools/check_shape.py``, which ``make lint`` runs too).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedrec"

FLOWER_ALLOWED = (PACKAGE / "cli.py", PACKAGE / "deploy")
PROTOCOL = ("fedrec.client_update", "fedrec.messages", "fedrec.federation", "fedrec.serving")
DEVICE_SDK = ("fedrec.clients", "clients")


def package_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def imported_modules(source: str, package: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every module a file of ``package`` imports, anywhere in it.

    Relative imports are resolved against ``package``; ``from a import b`` yields both ``a``
    and ``a.b`` (``b`` may be a module).
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            if node.module:
                base.append(node.module)
            module = ".".join(base)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def file_imports(path: Path) -> Iterator[tuple[int, str]]:
    # A file's package is its folder (for __init__.py too); fedrec/ files sit where they are named.
    package = path.relative_to(ROOT).parts[:-1]
    return imported_modules(path.read_text(encoding="utf-8"), package)


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    found: dict[tuple[Path, int], str] = {}  # one line per import statement: its first banned name
    for f in files:
        for line, module in file_imports(f):
            if within(module, banned):
                found.setdefault((f, line), module)
    return [f"{f.relative_to(ROOT)}:{line} imports {module}" for (f, line), module in found.items()]


def test_resolves_relative_imports() -> None:
    # The resolver the rules below rely on, on a file of fedrec/models/.
    source = "from ..serving import serve\nfrom .. import clients\nfrom .base import RecModel\nimport flwr.app\n"
    found = {m for _, m in imported_modules(source, ("fedrec", "models"))}
    assert {"fedrec.serving", "fedrec.clients", "fedrec.models.base", "flwr.app"} <= found
    assert within("fedrec.clients.store", DEVICE_SDK) and not within("fedrec.client_update_x", PROTOCOL)


def test_only_cli_and_deploy_import_flower() -> None:
    files = [
        f
        for f in package_files(PACKAGE)
        if not any(f == allowed or allowed in f.parents for allowed in FLOWER_ALLOWED)
    ]
    bad = offenders(files, ("flwr",))
    assert not bad, "Flower belongs in fedrec/cli.py, fedrec/deploy/ and the apps:\n" + "\n".join(bad)


def test_models_import_neither_protocol_nor_device_sdk() -> None:
    bad = offenders(package_files(PACKAGE / "models"), PROTOCOL + DEVICE_SDK)
    assert not bad, "fedrec/models/ must not depend on the protocol or the device SDK:\n" + "\n".join(bad)


def _check_shape():
    spec = importlib.util.spec_from_file_location("check_shape", ROOT / "tools" / "check_shape.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder", ["fedrec", "clients", "server"])
def test_functions_are_short(folder: str) -> None:
    shape = _check_shape()
    bad = [
        f"{f.relative_to(ROOT)}:{line} {name} {n} lines"
        for f in package_files(ROOT / folder)
        for line, name, n in shape.long_functions(f)
    ]
    assert not bad, f"functions longer than {shape.MAX_LINES} lines:\n" + "\n".join(bad)

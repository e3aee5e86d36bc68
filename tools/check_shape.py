"""Hold functions to a readable length: none in the package sources may run past MAX_LINES.

A function's length is counted from its ``def`` line to its last line, docstring and
comments included (a nested function counts inside its parent too, and is checked itself).
Prints ``path:line name N lines`` for each offender and exits 1 when there is any.

Usage: ``python tools/check_shape.py [PATH ...]`` (default: fedrec clients server).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 60
DEFAULT_PATHS = ("fedrec", "clients", "server")


def python_files(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        yield from sorted(p.rglob("*.py")) if p.is_dir() else [p]


def long_functions(path: Path, max_lines: int = MAX_LINES) -> Iterator[tuple[int, str, int]]:
    """``(line, qualified name, length)`` of each function in ``path`` longer than ``max_lines``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}."
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (child.end_lineno or child.lineno) - child.lineno + 1
                if n > max_lines:
                    yield child.lineno, name[:-1], n
            yield from visit(child, name)

    yield from visit(tree, "")


def main(argv: list[str]) -> int:
    offenders = 0
    for path in python_files(argv or list(DEFAULT_PATHS)):
        for line, name, n in long_functions(path):
            print(f"{path}:{line} {name} {n} lines")
            offenders += 1
    if offenders:
        print(f"{offenders} function(s) longer than {MAX_LINES} lines")
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

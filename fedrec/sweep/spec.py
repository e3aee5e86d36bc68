"""A sweep file: shared run config, seeds, and the cells (listed, or a grid of their product).

```toml
[sweep]
title = "Freshness versus privacy budget"
scenario = "what the world does, in words"
seeds = [0, 1, 2]
reference = "nonprivate"          # the non-private every-round cell: adaptation lag is measured against it

[base]                            # run config keys (kebab-case) shared by every cell
rounds = 20
engine = "local"

[[cells]]                         # cells listed one by one
name = "static"
privacy = "none"
freeze-after = 6

[[grid]]                          # and/or the product of lists; "inf" as an epsilon means no DP
name = "{privacy}-eps{epsilon}"
privacy = ["user", "event"]
epsilon = ["inf", 8, 4, 2, 1]
```
Every cell becomes a :class:`~fedrec.config.RunConfig` here, so a bad key or value fails before any
run starts, naming the file and the cell.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig, load_pyproject_defaults, read_toml


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict  #: run config keys of this cell (over base)
    method: str  #: federated, static or centralised
    unit: str  #: none, user, event, both
    epsilon_target: float  #: inf when no DP


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    title: str
    scenario: str
    seeds: tuple[int, ...]
    reference: str
    base: dict
    cells: tuple[Cell, ...]
    privacy_note: str = ""
    extra: dict = field(default_factory=dict)

    def config(self, cell: Cell, seed: int, out: Path) -> RunConfig:
        """The run config of one cell and seed, writing into ``out``."""
        where = f"{self.path} cell '{cell.name}'"
        cfg = RunConfig.from_mapping(load_pyproject_defaults(), where="pyproject.toml")
        cfg = RunConfig.from_mapping(self.base, where=f"{self.path} [base]", base=cfg)
        return RunConfig.from_mapping({**cell.values, "seed": seed, "out": str(out), "progress": False},
                                      where=where, base=cfg)


def _eps(v, where: str) -> float:
    if isinstance(v, str) and v.strip().lower() in ("inf", "infinity", "∞"):
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: an epsilon in a sweep must be a number or \"inf\" (got {v!r}).")
    return float(v)


def _cell(name: str, values: dict, where: str) -> Cell:
    values = dict(values)
    eps = math.inf
    if "epsilon" in values:
        eps = _eps(values["epsilon"], f"{where}: cell '{name}'")
        if math.isinf(eps):  # epsilon = inf: no differential privacy at all
            values.pop("epsilon")
            values["privacy"] = "none"
        else:
            values["epsilon"] = eps
            if values.get("privacy", "none") == "none":
                raise ConfigError(f"{where}: cell '{name}' sets a finite epsilon but no privacy unit (privacy=user|event).")
    unit = values.get("privacy", "user")
    if unit == "none":
        eps = math.inf
    method = "centralised" if values.get("method") == "centralised" else (
        "static" if values.get("freeze-after", 0) else "federated")
    return Cell(name=name, values=values, method=method, unit=unit, epsilon_target=eps)


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and validate a sweep file (every cell's config is built once here)."""
    p = Path(path)
    doc = read_toml(p, "sweep file")
    unknown = set(doc) - {"sweep", "base", "cells", "grid"}
    if unknown:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown)}; expected [sweep], [base], [[cells]], [[grid]].")
    for name, want in (("sweep", dict), ("base", dict), ("cells", list), ("grid", list)):
        if name in doc and not (isinstance(doc[name], want) and (want is dict or all(isinstance(t, dict)
                                                                                      for t in doc[name]))):
            form = f"[{name}]" if want is dict else f"[[{name}]] tables"
            raise ConfigError(f"{p}: '{name}' must be written as {form}, not {type(doc[name]).__name__}.")
    head = doc.get("sweep", {})
    bad = set(head) - {"title", "scenario", "seeds", "reference", "privacy_note"}
    if bad:
        raise ConfigError(f"{p} [sweep]: unknown key(s) {sorted(bad)}.")
    seeds = head.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{p} [sweep]: 'seeds' must be a non-empty list of integers.")
    uniq = _unique_cells(_listed_cells(doc.get("cells", []), p) + _grid_cells(doc.get("grid", []), p), p)
    ref = head.get("reference", "")
    if not isinstance(ref, str):
        raise ConfigError(f"{p} [sweep]: 'reference' must be one cell's name, not {type(ref).__name__}.")
    if ref and ref not in uniq:
        raise ConfigError(f"{p} [sweep]: reference cell '{ref}' is not one of the cells ({', '.join(uniq)}).")
    base = dict(doc.get("base", {}))
    if isinstance(base.get("data"), str) and base["data"] and not Path(base["data"]).is_absolute():
        # a data path in a sweep file is relative to that file (scenarios travel with their data paths)
        base["data"] = str((p.parent / base["data"]).resolve())
    spec = SweepSpec(path=p, title=str(head.get("title", p.stem)), scenario=str(head.get("scenario", "")),
                     seeds=tuple(seeds), reference=ref, base=base, cells=tuple(uniq.values()),
                     privacy_note=str(head.get("privacy_note", "")))
    for c in spec.cells:  # fail now, naming the cell, rather than in a worker later
        spec.config(c, spec.seeds[0], Path("/nonexistent"))
    return spec


def _listed_cells(tables: list[dict], p: Path) -> list[Cell]:
    """The ``[[cells]]`` tables, one cell each."""
    cells = []
    for i, c in enumerate(tables):
        c = dict(c)
        name = c.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{p}: [[cells]] number {i + 1} needs a name.")
        cells.append(_cell(name, c, str(p)))
    return cells


def _grid_cells(tables: list[dict], p: Path) -> list[Cell]:
    """The ``[[grid]]`` tables: one cell per combination of their list values, named by the template."""
    cells = []
    for i, g in enumerate(tables):
        g = dict(g)
        template = g.pop("name", None)
        if not isinstance(template, str):
            raise ConfigError(f"{p}: [[grid]] number {i + 1} needs a name template such as \"{{privacy}}-eps{{epsilon}}\".")
        fixed = {k: v for k, v in g.items() if not isinstance(v, list)}
        axes = {k: v for k, v in g.items() if isinstance(v, list)}
        for combo in itertools.product(*axes.values()):
            values = {**fixed, **dict(zip(axes, combo, strict=True))}
            if "epsilon" in values and math.isinf(_eps(values["epsilon"], f"{p}: [[grid]] {template!r}")):
                values["privacy"] = "none"
            try:
                name = template.format(**{**values, **{k.replace("-", "_"): v for k, v in values.items()}})
            except (KeyError, IndexError, AttributeError) as e:
                raise ConfigError(f"{p}: [[grid]] name template {template!r} uses {e}, which the grid does not set.") from None
            except ValueError as e:
                raise ConfigError(f"{p}: [[grid]] name template {template!r} is not a template ({e}).") from None
            cells.append(_cell(name, values, str(p)))
    return cells


def _unique_cells(cells: list[Cell], p: Path) -> dict[str, Cell]:
    """The cells by name; the same configuration reached twice (epsilon=inf under both units) runs once,
    under its first name."""
    uniq: dict[str, Cell] = {}
    seen_values: set = set()
    for c in cells:
        key = tuple(sorted((k, str(v)) for k, v in c.values.items()))
        if key in seen_values:
            continue
        if c.name in uniq:
            raise ConfigError(f"{p}: two different cells are named '{c.name}'.")
        seen_values.add(key)
        uniq[c.name] = c
    if not uniq:
        raise ConfigError(f"{p}: no cells; add [[cells]] or [[grid]] tables.")
    for c in uniq.values():
        if "/" in c.name or c.name.startswith("."):
            raise ConfigError(f"{p}: cell name '{c.name}' cannot be a folder name.")
    return uniq

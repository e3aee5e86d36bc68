"""The server round keeps its behaviour: each case of ``round_reference.CASES`` is run again and held to
the metric lines, summary and final global model that the code wrote before the round moved into
``fedrec/`` (issue 15). A change that alters what a round does fails here; one that only moves code
passes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from round_reference import CASES, HERE, run_case, stable_summary

#: SecAgg+ quantises the masked vectors with stochastic rounding from the OS's RNG, so a secure round's
#: sum moves by about one quantisation step between runs; SASRec's attention rounds differently on CPUs with
#: other vector units (1e-4 of a weight after three rounds); every other case is deterministic
TOLERANCE = {"secagg": 1e-3, "sasrec": 1e-3}
#: upload sizes count the rows a device changed: in SASRec a row that exact arithmetic leaves unchanged (the attention
#: logits of a one-item sequence get a zero gradient) may move by a rounding error on another CPU, and is then sent;
#: every other case's sizes are held exactly
BYTES_TOLERANCE = {"sasrec": 0.01}


def _close(got, want, where: str, tol: float = 1e-6, bytes_tol: float = 0.0) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], f"{where}.{k}", max(tol, bytes_tol) if "bytes" in k else tol, bytes_tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{where}[{i}]", tol, bytes_tol)
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and (math.isclose(got, want, rel_tol=tol, abs_tol=tol * 1e-3)), \
            f"{where}: {got!r} != {want!r}"
    elif isinstance(want, int) and not isinstance(want, bool) and bytes_tol and tol >= bytes_tol:
        assert isinstance(got, int) and math.isclose(got, want, rel_tol=tol), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_matches_the_saved_reference(name, tmp_path):
    ref = json.loads((HERE / f"{name}.json").read_text())
    rows, summary, model = run_case(name, tmp_path / name)
    tol = TOLERANCE.get(name, 1e-6)
    bytes_tol = BYTES_TOLERANCE.get(name, 0.0)
    _close(rows, ref["rows"], f"{name} metrics", tol, bytes_tol)
    _close(stable_summary(summary), ref["summary"], f"{name} summary", tol, bytes_tol)
    with np.load(HERE / f"{name}.npz") as want:
        assert sorted(model) == sorted(want.files)
        for k in want.files:
            np.testing.assert_allclose(model[k], want[k], rtol=max(tol, 1e-5), atol=tol, err_msg=f"{name}: {k}")

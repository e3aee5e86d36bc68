"""Independent references the privacy tests compare fedrec against."""

from __future__ import annotations

import functools
import warnings

from opacus.accountants import create_accountant


@functools.cache
def opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """ε of ``steps`` subsampled Gaussian steps straight from Opacus's PRV accountant (memoised: PRV takes
    ~0.1-0.5 s a call)."""
    acc = create_accountant("prv")
    acc.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))

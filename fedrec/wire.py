"""How a device's delta travels: dense float32, dense float16, or sparse item rows.

* ``sparse``: for each 2-D table, the ids of the rows the update touched and those rows
  (``<name>.ids`` int64, ``<name>.rows`` float32). Without event-level noise a device's delta is
  zero outside the rows its events and sampled negatives touched, so nothing is lost — but the
  server learns *which* rows were touched. That is allowed where the trust model already shows
  the server each device's delta: no DP, or user-level DP without secure aggregation (the dense
  delta's zero rows reveal the same set). It is refused under event-level DP, whose noise covers
  every row precisely so the touched set stays hidden.
* ``fp16``: dense, half precision: event-level DP-SGD noise is spread over every row, so the
  delta is dense; half the bytes, and the rounding (relative 1e-3) sits far below the noise.
* ``dense``: float32 as computed.

``auto`` picks sparse for ``none``/``user``, fp16 for ``event``, and dense float32 for ``both``
(the server checks the user-level clip on what it receives; half precision could round a
clipped delta's norm above the clip).
"""

from __future__ import annotations

import numpy as np

from . import registry

WIRES = registry.WIRES.names()
#: the encodings themselves (``auto`` only picks one of them)
MODES = tuple(w for w in WIRES if w != "auto")


def wire_mode(wire: str, privacy: str) -> str:
    """The encoding a device uses for ``wire`` (a config value) under ``privacy``."""
    event = registry.PRIVACY_MODES.check(privacy) in registry.EVENT_DP_MODES
    if wire == "auto":  # event DP: noise covers every row; with user DP as well the server checks the clip in fp32
        return ("dense" if privacy in registry.USER_DP_MODES else "fp16") if event else "sparse"
    if wire == "sparse" and event:
        raise ValueError("Sparse deltas would reveal which item rows a device touched, which event-level DP hides; "
                         "use wire = \"fp16\" or \"dense\" with privacy event/both.")
    return wire


def encode_delta(delta: dict, mode: str) -> dict[str, np.ndarray]:
    """Flat arrays (for one Flower ArrayRecord) of a dense delta in ``mode``.

    A table that is sparse by construction (event noise at the aggregate releases ``name -> (ids, rows)``)
    travels as sparse rows whatever the mode (rows in half precision under ``fp16``): that mode's trust
    model lets the server see the touched rows (docs/privacy.md).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown wire mode {mode!r}; expected one of {', '.join(MODES)}.")
    out = {}
    for k, v in delta.items():
        if isinstance(v, tuple):
            out[f"{k}.ids"] = np.ascontiguousarray(v[0], dtype=np.int64)
            out[f"{k}.rows"] = np.ascontiguousarray(v[1], dtype=np.float16 if mode == "fp16" else np.float32)
        elif mode != "sparse" or np.ndim(v) != 2:
            out[k] = np.ascontiguousarray(v, dtype=np.float16 if mode == "fp16" else np.float32) \
                if mode != "sparse" else np.ascontiguousarray(v)
        else:
            v = np.asarray(v, dtype=np.float32)
            ids = np.flatnonzero(np.any(v != 0, axis=1)).astype(np.int64)
            out[f"{k}.ids"] = ids
            out[f"{k}.rows"] = np.ascontiguousarray(v[ids])
    return out


def decode_delta(arrays: dict[str, np.ndarray]) -> dict:
    """The inverse: ``name -> dense float32 array`` or ``name -> (ids, rows)`` for sparse tables."""
    out: dict = {}
    for k, v in arrays.items():
        if k.endswith(".ids"):
            name = k[:-4]
            rows = arrays.get(f"{name}.rows")
            if rows is None:
                raise ValueError(f"sparse delta {name} has ids but no rows")
            out[name] = (np.asarray(v), np.asarray(rows, dtype=np.float32))
        elif k.endswith(".rows"):
            if f"{k[:-5]}.ids" not in arrays:
                raise ValueError(f"sparse delta {k[:-5]} has rows but no ids")
        else:
            out[k] = np.asarray(v, dtype=np.float32)
    return out



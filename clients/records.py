"""Flower's records <-> the plain mappings of :mod:`fedrec.messages` (the only place that converts them).

:mod:`fedrec.messages` encodes and decodes every message as plain mappings (arrays as numpy,
values as Python numbers, strings, lists), so the core never imports Flower; the ClientApp, the
ServerApp, the in-process grid and the SecAgg+ round convert with the two functions here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedrec.messages import record_type


def to_records(plain: Mapping[str, Any]) -> RecordDict:
    """A RecordDict of ``plain`` (record name -> mapping), each record of the type its name calls for."""
    out = RecordDict()
    for name, rec in plain.items():
        kind = record_type(name)
        if kind == "arrays":
            out[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in rec.items()})
        elif kind == "metrics":
            out[name] = MetricRecord(dict(rec))
        else:
            out[name] = ConfigRecord(dict(rec))
    return out


def from_records(content: RecordDict) -> dict[str, Any]:
    """The plain mappings of a RecordDict, in its order (ArrayRecords as numpy arrays)."""
    out: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {k: v.numpy() for k, v in rec.items()}
        else:
            out[name] = dict(rec)
    return out

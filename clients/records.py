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

from fedrec.messages import MessageError, record_type


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
    """The plain mappings of a RecordDict, in its order (ArrayRecords as numpy arrays).

    An array that does not load as a plain numeric numpy array (another serialisation, object arrays,
    damaged bytes) is a :class:`~fedrec.messages.MessageError` naming its record.
    """
    out: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {k: _array(name, k, v) for k, v in rec.items()}
        else:
            out[name] = dict(rec)
    return out


def _array(record: str, key: str, v: Array) -> np.ndarray:
    try:
        a = v.numpy()
    except Exception as e:  # whatever numpy.load raises on hostile bytes
        raise MessageError(f"array {key!r} of record {record!r} does not load ({type(e).__name__})") from None
    if a.dtype.kind not in "biuf":
        raise MessageError(f"array {key!r} of record {record!r} holds {a.dtype}, not numbers")
    return a

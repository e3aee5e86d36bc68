"""Flower's records <-> the plain mappings of :mod:`fedrec.messages` (the only place that converts them).

:mod:`fedrec.messages` encodes and decodes every message as plain mappings (arrays as numpy,
values as Python numbers, strings, lists), so the core never imports Flower; the ClientApp, the
ServerApp, the in-process grid and the SecAgg+ round convert with the two functions here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npformat

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
    """The numpy array ``v`` carries, its serialisation, dtype and shape checked before anything is allocated.

    Flower's ``Array.numpy()`` would ``np.load`` whatever header the bytes hold (a header may claim terabytes);
    here the header must agree with the Array's own dtype and shape and with the length of its bytes first.
    """
    where = f"array {key!r} of record {record!r}"
    if v.stype != SType.NUMPY:
        raise MessageError(f"{where} has serialisation {str(v.stype)[:40]!r}, not {SType.NUMPY!r}")
    try:
        buf = io.BytesIO(v.data)
        version = npformat.read_magic(buf)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read(buf)
        declared = np.dtype(v.dtype)
    except Exception as e:  # whatever numpy's header parser raises on hostile bytes
        raise MessageError(f"{where} has no readable numpy header ({type(e).__name__})") from None
    if dtype.kind not in "biuf" or dtype.hasobject or dtype != declared:
        raise MessageError(f"{where} holds {dtype}, declared {declared}, not plain numbers")
    if tuple(shape) != tuple(v.shape) or fortran:
        raise MessageError(f"{where} has header shape {shape}, declared {tuple(v.shape)}")
    size = math.prod(shape) * dtype.itemsize
    if size != len(v.data) - buf.tell():
        raise MessageError(f"{where} declares {size} bytes but carries {len(v.data) - buf.tell()}")
    return np.frombuffer(v.data, dtype=dtype, count=math.prod(shape), offset=buf.tell()).reshape(shape).copy()

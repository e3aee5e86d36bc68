"""Flower's records <-> the plain mappings of :mod:`fedrec.messages` (the only place that converts them).

:mod:`fedrec.messages` encodes and decodes every message as plain mappings (arrays as numpy,
values as Python numbers, strings, lists), so the core never imports Flower; the ClientApp, the
ServerApp, the in-process grid and the SecAgg+ round convert with the two functions here.

**One packed record per message.** A deployed message travels as Flower objects (the message, its
RecordDict, each record, each Array and each of its chunks), and every object is one request to the
SuperLink, which checks, stores and serves each one; a node's reply of a few small records was 18 of
them, and those requests, not the bytes, set the length of a deployment round. So :func:`to_records`
writes one ConfigRecord, :data:`PACKED`: a JSON manifest of the plain records (name, type, values;
each array as dtype, shape and its place in the blob) and, up to :data:`INLINE_MAX` bytes, the arrays'
bytes back to back. A larger blob goes in one uint8 Array of the ArrayRecord :data:`PACKED_ARRAYS`
(Flower chunks it). A message is then 3 objects (6 with the Array). :func:`from_records` checks the
whole manifest against the blob before it copies a byte, and still reads unpacked RecordDicts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npformat

from fedrec.messages import MessageError, record_type

PACKED, PACKED_ARRAYS = "fedrec-packed", "fedrec-packed-arrays"
#: a blob up to this many bytes travels inside the packed ConfigRecord (Flower chunks Arrays at 5 MiB)
INLINE_MAX = 4 << 20
#: the longest manifest read (a message's record names, config values and array headers)
MANIFEST_MAX = 4 << 20
#: a list of numbers this long or longer travels in the blob (a node's serving report lists every device it served)
LIST_BLOB = 64
_KINDS = ("arrays", "metrics", "config")


def to_records(plain: Mapping[str, Any]) -> RecordDict:
    """``plain`` (record name -> mapping) as one packed record (:data:`PACKED`, module docstring)."""
    records: list[list] = []
    blob = _Blob()
    for name, rec in plain.items():
        kind = record_type(name)
        if kind == "arrays":
            records.append([name, kind, {k: blob.add(np.asarray(v)) for k, v in rec.items()}])
            continue
        values = {k: _sendable(name, k, v) for k, v in rec.items()}
        nums = {k: a for k, a in ((k, _numbers(v)) for k, v in values.items()) if a is not None}
        lists = {k: blob.add(a) for k, a in nums.items()}  # long lists of numbers travel as bytes, not as JSON
        body = {k: v for k, v in values.items() if k not in lists}
        records.append([name, kind, body, lists] if lists else [name, kind, body])
    manifest = json.dumps({"records": records}, separators=(",", ":"))
    data = np.concatenate(blob.parts) if blob.parts else np.zeros(0, np.uint8)
    out = RecordDict()
    if data.nbytes <= INLINE_MAX:
        out[PACKED] = ConfigRecord({"manifest": manifest, "blob": data.tobytes()})
    else:
        out[PACKED] = ConfigRecord({"manifest": manifest})
        out[PACKED_ARRAYS] = ArrayRecord({"blob": Array(data)})
    return out


class _Blob:
    """The arrays' bytes of a packed message, back to back."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray) -> list:
        """Append ``a``'s bytes; its manifest entry ``[dtype, shape, offset, nbytes]``."""
        a = a if a.flags.c_contiguous else a.copy(order="C")
        entry = [a.dtype.str, list(a.shape), self.size, a.nbytes]
        self.parts.append(a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8))
        self.size += a.nbytes
        return entry


def _numbers(v: Any) -> np.ndarray | None:
    """A list of at least :data:`LIST_BLOB` ints (or of floats) as int64 (float64), exact both ways; else None."""
    if not isinstance(v, list) or len(v) < LIST_BLOB:
        return None
    for kind, dtype in ((int, np.int64), (float, np.float64)):
        if all(type(x) is kind for x in v):
            try:
                return np.asarray(v, dtype=dtype)
            except OverflowError:  # a Python int beyond int64 stays in the manifest
                return None
    return None


def _sendable(record: str, key: str, v: Any) -> Any:
    """``v`` as a record value (numpy scalars as Python numbers, tuples as lists); TypeError if no record can
    hold it (what Flower's own records refuse: nested mappings, arrays, bytes, objects)."""
    def scalar(x: Any) -> Any:
        return x.item() if isinstance(x, np.generic) and x.dtype.kind in "biuf" else x

    v = [scalar(x) for x in v] if isinstance(v, list | tuple) else scalar(v)
    try:
        return _value(record, key, v)
    except MessageError as e:
        raise TypeError(str(e)) from None


def from_records(content: RecordDict) -> dict[str, Any]:
    """The plain mappings of a RecordDict, in its order (arrays as numpy arrays), packed or not.

    Anything that does not decode as plain records of plain numbers, strings and flat lists (a garbled
    manifest, an array outside its blob, another serialisation, object arrays, damaged bytes) is a
    :class:`~fedrec.messages.MessageError` that names the record.
    """
    if PACKED in content:
        return _unpack(content)
    out: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {k: _array(name, k, v) for k, v in rec.items()}
        else:
            out[name] = dict(rec)
    return out


def values_of(content: RecordDict, name: str) -> dict[str, Any] | None:
    """Record ``name`` (numbers, strings, lists; not arrays) of a RecordDict, packed or not, without copying
    any array; None when there is no such record."""
    if PACKED not in content:
        return dict(content[name]) if name in content else None
    reader = _Reader(_blob(content, content[PACKED]))
    for entry in _manifest(content[PACKED]):
        got, kind, body = _entry(entry)
        if got == name and kind != "arrays":
            return {k: _value(name, k, v) for k, v in body.items()} | _lists(name, entry, reader)
        for k, spec in (body if kind == "arrays" else entry[3] if len(entry) == 4 else {}).items():
            reader.take(got, k, spec, copy=False)  # only to know where the bytes of the records after it start
    return None


def _unpack(content: RecordDict) -> dict[str, Any]:
    """The records of a packed RecordDict, every manifest entry checked against the blob before any copy."""
    if set(content) - {PACKED, PACKED_ARRAYS}:
        raise MessageError(f"a packed message holds other records too: {sorted(content)[:5]}")
    head = content[PACKED]
    records, reader = _manifest(head), _Reader(_blob(content, head))
    out: dict[str, Any] = {}
    for entry in records:
        name, kind, body = _entry(entry)
        if name in out:
            raise MessageError(f"record {name!r} appears twice in the packed message")
        out[name] = ({k: reader.take(name, k, spec) for k, spec in body.items()} if kind == "arrays"
                     else {k: _value(name, k, v) for k, v in body.items()} | _lists(name, entry, reader))
    if reader.at != len(reader.blob):
        raise MessageError(f"the packed blob holds {len(reader.blob) - reader.at} bytes that no record names")
    return out


def _lists(record: str, entry: list, reader: _Reader) -> dict[str, list]:
    """The long lists of numbers a packed metrics or config record keeps in the blob (its entry's 4th part; they
    come after the record's other values)."""
    if len(entry) == 3:
        return {}
    out = {}
    for k, spec in entry[3].items():
        a = reader.take(record, k, spec)
        if a.ndim != 1 or a.dtype not in (np.int64, np.float64) or k in entry[2]:
            raise MessageError(f"value {k!r} of record {record!r} is not one list of int64 or float64 numbers")
        out[k] = a.tolist()
    return out


def _manifest(head: Any) -> list:
    """The list of ``[name, kind, values]`` entries of a packed record (entries checked by :func:`_entry`)."""
    manifest = head.get("manifest") if isinstance(head, ConfigRecord) else None
    if not isinstance(manifest, str) or len(manifest) > MANIFEST_MAX:
        raise MessageError(f"record {PACKED!r} carries no manifest of at most {MANIFEST_MAX} characters")
    try:
        records = json.loads(manifest)["records"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise MessageError(f"the manifest of record {PACKED!r} is not a JSON object with its records") from None
    if not isinstance(records, list):
        raise MessageError(f"the manifest of record {PACKED!r} lists no records")
    return records


def _blob(content: RecordDict, head: Any) -> memoryview:
    """The packed arrays' bytes: inline in ``head`` (the packed ConfigRecord, checked by :func:`_manifest`), or
    the one uint8 array of :data:`PACKED_ARRAYS`."""
    if PACKED_ARRAYS in content:
        rec = content[PACKED_ARRAYS]
        if not isinstance(rec, ArrayRecord) or list(rec) != ["blob"]:
            raise MessageError(f"record {PACKED_ARRAYS!r} must hold exactly one array 'blob'")
        a = _array(PACKED_ARRAYS, "blob", rec["blob"])
        if a.dtype != np.uint8 or a.ndim != 1:
            raise MessageError(f"array 'blob' of record {PACKED_ARRAYS!r} is not a flat uint8 array")
        return a.data
    blob = head.get("blob", b"")
    if not isinstance(blob, bytes):
        raise MessageError(f"record {PACKED!r} has a blob that is not bytes")
    return memoryview(blob)


def _entry(entry: Any) -> tuple[str, str, dict]:
    """``[name, kind, body]`` of one manifest record, its types checked."""
    if not (isinstance(entry, list) and len(entry) in (3, 4) and isinstance(entry[0], str) and entry[1] in _KINDS
            and all(isinstance(x, dict) for x in entry[2:]) and (len(entry) == 3 or entry[1] != "arrays")):
        raise MessageError(f"the packed manifest has an entry that is not [name, kind, values(, lists)]: "
                           f"{str(entry)[:80]}")
    name, kind, body = entry[:3]
    if kind != record_type(name):
        raise MessageError(f"record {name!r} is packed as {kind}, not as {record_type(name)}")
    return name, kind, body


class _Reader:
    """Reads a packed blob front to back: each array's bytes must follow the bytes of the one named before it (as
    :func:`to_records` writes them), so no two arrays share bytes, and a message decodes to at most its own size."""

    def __init__(self, blob: memoryview) -> None:
        self.blob, self.at = blob, 0

    def take(self, record: str, key: str, spec: Any, *, copy: bool = True) -> np.ndarray:
        """Array ``key`` of ``record``: ``spec`` = [dtype, shape, offset, nbytes], checked, then copied (with
        ``copy = False`` only checked: an empty array)."""
        where = f"array {key!r} of record {record!r}"
        try:
            dtype_str, shape, offset, nbytes = spec
            dtype = np.dtype(dtype_str)
            shape = tuple(shape)
            ok = all(type(x) is int and x >= 0 for x in (*shape, offset, nbytes)) and plain_shape(shape)
        except (TypeError, ValueError):
            raise MessageError(f"{where} has no readable [dtype, shape, offset, bytes] entry") from None
        if not ok or dtype.kind not in "biuf" or dtype.hasobject:
            raise MessageError(f"{where} is not plain numbers of a non-negative shape ({str(spec)[:80]})")
        if math.prod(shape) * dtype.itemsize != nbytes or offset != self.at or offset + nbytes > len(self.blob):
            raise MessageError(f"{where} declares {nbytes} bytes at {offset}, which its shape or the blob "
                               f"({len(self.blob)} bytes, the next array's at {self.at}) does not hold")
        self.at += nbytes
        if not copy:
            return np.zeros(0, dtype)
        return np.frombuffer(self.blob, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape).copy()


#: the most dimensions, and the longest dimension, an array a node sends may have (numpy cannot reshape beyond
#: either; with a dimension of 0 any other one holds no bytes, so the byte count alone does not bound them)
MOST_DIMS, MOST_DIM = 32, 2**40


def plain_shape(shape: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` can be made: at most :data:`MOST_DIMS` dimensions, each at most
    :data:`MOST_DIM`."""
    return len(shape) <= MOST_DIMS and all(x <= MOST_DIM for x in shape)


def _value(record: str, key: str, v: Any) -> Any:
    """A config or metric value: a number, a string, a bool or a flat list of them (what Flower's records hold)."""
    scalar = (int, float, str, bool)
    if isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v)):
        return v
    raise MessageError(f"value {key!r} of record {record!r} is not a number, a string or a flat list of them")


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
    if tuple(shape) != tuple(v.shape) or fortran or not plain_shape(shape):
        raise MessageError(f"{where} has header shape {shape}, declared {tuple(v.shape)}")
    size = math.prod(shape) * dtype.itemsize
    if size != len(v.data) - buf.tell():
        raise MessageError(f"{where} declares {size} bytes but carries {len(v.data) - buf.tell()}")
    return np.frombuffer(v.data, dtype=dtype, count=math.prod(shape), offset=buf.tell()).reshape(shape).copy()

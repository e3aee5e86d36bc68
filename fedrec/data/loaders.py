"""Loaders that turn rating / behaviour files into an :class:`~fedrec.data.events.EventLog`.

Four formats are recognised from the file's first line (not from its name):

``movielens-csv``
    MovieLens ``ratings.csv`` (ml-latest-small, ml-20m, ml-25m): header
    ``userId,movieId,rating,timestamp``; integer ids, weight = rating, kind ``"rating"``.
``ml-100k``
    MovieLens 100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header.
``ml-1m``
    MovieLens 1M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header.
``generic-csv``
    A CSV file whose header names the columns ``user``, ``item``, ``timestamp`` and optionally
    ``weight`` and ``kind`` (any order, any case). Ids are arbitrary strings; a timestamp is a number
    of seconds or an ISO-8601 date/time (naive ones are taken as UTC).

The three MovieLens formats are parsed block by block with a vectorised byte-level fast path
(well under a microsecond a row, so ml-25m parses in seconds); a block the fast path does not
accept verbatim is re-parsed row by row, which either accepts it, with the same values, or raises a
:class:`~fedrec.data.events.DataError` naming the file and line. Generic CSV is read row by row with
:mod:`csv`.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
from array import array
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.data.events import KINDS, DataError, EventLog

__all__ = ["DIRECTORY_FILES", "FORMATS", "load_events"]

#: Format names as stored in ``EventLog.meta["format"]``.
FORMATS: tuple[str, ...] = ("movielens-csv", "ml-100k", "ml-1m", "generic-csv")

#: File names looked for, in this order, when ``load_events`` is given a directory.
DIRECTORY_FILES: tuple[str, ...] = ("ratings.csv", "u.data", "ratings.dat")

_ACCEPTED = (
    "MovieLens ratings.csv (header userId,movieId,rating,timestamp), "
    "MovieLens 100K u.data (user<TAB>item<TAB>rating<TAB>timestamp, no header), "
    "MovieLens 1M ratings.dat (UserID::MovieID::Rating::Timestamp, no header) "
    "and generic CSV (header user,item,timestamp with optional weight and kind columns)"
)

_ML_HEADER = {"userid": "user", "movieid": "item", "rating": "weight", "timestamp": "timestamp"}
_GENERIC_COLUMNS = ("user", "item", "timestamp", "weight", "kind")
_LABELS = {"user": "user id", "item": "item id", "weight": "rating", "timestamp": "timestamp"}
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}

#: Bytes read per block by the MovieLens parsers (tests shrink it to exercise block boundaries).
_CHUNK_BYTES = 8 << 20

#: Longest numeric field the fast path parses (15 digits stay exact in int64 and float64).
_FAST_MAX_WIDTH = 15
#: Newlines put before a block in the fast path so that right-aligned field windows never start before 0.
_PAD = b"\n" * (_FAST_MAX_WIDTH + 1)


@dataclass(frozen=True)
class _Numeric:
    """Layout of one of the MovieLens formats: separator and the role of each column."""

    name: str
    sep: bytes
    roles: tuple[str, ...]  # a permutation of ("user", "item", "weight", "timestamp")
    sep_name: str


def load_events(path: str | os.PathLike, *, max_rows: int | None = None) -> EventLog:
    """Load a ratings / events file into an :class:`EventLog`, detecting its format from its content.

    Parameters
    ----------
    path : str or os.PathLike
        A data file, or a directory holding one of ``ratings.csv``, ``u.data`` or
        ``ratings.dat`` (looked for in that order).
    max_rows : int, optional
        Stop after this many data rows (blank lines and the header do not count); rows after
        them are neither read nor checked.

    Returns
    -------
    EventLog
        Events sorted by time with dense user / item ids; ``user_ids`` / ``item_ids`` keep the
        original ids (integers for the MovieLens formats, strings for generic CSV).
        ``source`` is the path of the file read and ``meta == {"format": name}`` with ``name``
        one of :data:`FORMATS`.

    Raises
    ------
    DataError
        If the file is missing, empty, has an unrecognised header or has no data rows, or if a
        row is malformed: the message then starts with ``"{path}:{line}: "`` (1-based physical
        line, the header being line 1) and shows the offending field.
    ValueError
        If ``max_rows`` is given and is not a positive integer.

    Notes
    -----
    Blank lines are skipped. In MovieLens files ids must be integers and ratings and timestamps
    finite numbers; ratings must not be negative. In generic CSV files ids are stripped,
    non-empty strings, ``weight`` (default 1.0) must be a finite non-negative number and ``kind``
    (default ``"event"``, case-insensitive) one of :data:`~fedrec.data.events.KINDS`.
    """
    if max_rows is not None and (isinstance(max_rows, bool) or int(max_rows) != max_rows or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
    limit = None if max_rows is None else int(max_rows)
    src = _resolve(path)
    with open(src, "rb") as fh:
        header, header_line, offset = _first_line(fh, src)
        fmt = _detect(header, header_line, src)
        if isinstance(fmt, _Numeric):
            if fmt.name != "movielens-csv":  # headerless: the first line is data
                fh.seek(offset)
                return _load_numeric(fh, fmt, src, header_line, limit)
            return _load_numeric(fh, fmt, src, header_line + 1, limit)
        return _read_generic(fh, fmt, src, header_line, limit)


def _load_numeric(fh: io.BufferedReader, fmt: _Numeric, src: str, first_body_line: int, limit: int | None) -> EventLog:
    """The events of a MovieLens file, ``fh`` positioned at its first data line (``first_body_line``)."""
    cols = _read_numeric(fh, fmt, src, first_body_line, limit)
    n = len(cols["user"])
    if n == 0:
        raise DataError(f"{src}: the file has a header but no data rows.")
    return EventLog.from_arrays(
        cols["user"],
        cols["item"],
        cols["timestamp"],
        cols["weight"],
        np.full(n, _KIND_CODE["rating"], np.int8),
        source=src,
        meta={"format": fmt.name},
    )


# ----------------------------------------------------------------------------------------------
# locating the file and detecting the format


def _resolve(path: str | os.PathLike) -> str:
    """The file to read for ``path`` (a file, or a directory holding a known ratings file)."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    p = Path(name)
    if p.is_dir():
        for candidate in DIRECTORY_FILES:
            if (p / candidate).is_file():
                return os.path.join(name, candidate)
        raise DataError(
            f"Directory {name} holds none of the data files {', '.join(DIRECTORY_FILES)}."
        )
    if not p.exists():
        raise DataError(f"No such data file: {name}.")
    return name


def _first_line(fh: io.BufferedReader, src: str) -> tuple[str, int, int]:
    """The first non-blank line (decoded, without its newline), its line number and byte offset."""
    line_no = 0
    offset = 0
    while True:
        offset = fh.tell()
        raw = fh.readline()
        if not raw:
            raise DataError(f"{src}: the file is empty.")
        line_no += 1
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
            offset += len(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _decode_error(src, line_no, raw, exc) from None
        text = text.rstrip("\r\n")
        if text.strip():
            return text, line_no, offset


def _detect(line: str, line_no: int, src: str) -> _Numeric | tuple[str, ...]:
    """The format of a file whose first non-blank line is ``line``.

    Returns a :class:`_Numeric` layout for the MovieLens formats, or the tuple of column roles of
    a generic CSV header.
    """
    names = [c.strip() for c in next(csv.reader([line]))]
    lower = [c.lower() for c in names]
    if len(lower) == 4 and set(lower) == set(_ML_HEADER):
        return _Numeric("movielens-csv", b",", tuple(_ML_HEADER[c] for c in lower), "comma")
    if set(lower) & set(_GENERIC_COLUMNS):
        dupes = sorted({c for c in lower if lower.count(c) > 1})
        if dupes:
            raise DataError(f"{src}:{line_no}: the header repeats the column(s) {_quote_list(dupes)}.")
        unknown = [n for n, c in zip(names, lower, strict=True) if c not in _GENERIC_COLUMNS]
        if unknown:
            raise DataError(
                f"{src}:{line_no}: unknown column(s) {_quote_list(unknown)} in the header "
                "(a generic CSV has the columns user, item, timestamp and optionally weight and kind)."
            )
        missing = [c for c in ("user", "item", "timestamp") if c not in lower]
        if missing:
            raise DataError(
                f"{src}:{line_no}: the header lacks the required column(s) {_quote_list(missing)} "
                "(a generic CSV has the columns user, item, timestamp and optionally weight and kind)."
            )
        return tuple(lower)
    for sep, name, sep_name in (("::", "ml-1m", "'::'"), ("\t", "ml-100k", "tab")):
        if sep in line and line.split(sep, maxsplit=1)[0].strip().isdigit():
            return _Numeric(name, sep.encode(), ("user", "item", "weight", "timestamp"), sep_name)
    raise DataError(
        f"{src}:{line_no}: unrecognised header {_show(line)}; the accepted formats are {_ACCEPTED}."
    )


# ----------------------------------------------------------------------------------------------
# MovieLens formats: fast vectorised path with a row-by-row fallback


def _read_numeric(
    fh: io.BufferedReader, fmt: _Numeric, src: str, first_line: int, limit: int | None
) -> dict[str, np.ndarray]:
    """Read the body of a MovieLens file block by block; returns the columns by role."""
    parts: dict[str, list[np.ndarray]] = {r: [] for r in fmt.roles}
    line_no = first_line  # physical line number of the next line to be read
    n_rows = 0
    carry = b""
    while limit is None or n_rows < limit:
        block = fh.read(_CHUNK_BYTES)
        if block:
            data = carry + block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            data, carry = data[: cut + 1], data[cut + 1:]
        else:
            data, carry = carry, b""
            if not data:
                break
        remaining = None if limit is None else limit - n_rows
        cols = _fast_numeric(data, fmt)
        if cols is None:
            cols = _slow_numeric(data, fmt, src, line_no, remaining)
        elif remaining is not None:
            cols = {r: v[:remaining] for r, v in cols.items()}
        for r, v in cols.items():
            parts[r].append(v)
        n_rows += len(cols["user"])
        line_no += data.count(b"\n")
    out = {}
    for r in fmt.roles:
        dtype = np.int64 if r in ("user", "item") else np.float64
        out[r] = np.concatenate(parts[r]).astype(dtype, copy=False) if parts[r] else np.empty(0, dtype)
    return out


def _fast_numeric(data: bytes, fmt: _Numeric) -> dict[str, np.ndarray] | None:
    """Parse a block of complete lines that use only digits, '.', the separator and newlines.

    Returns ``None`` whenever the block is not in that strict shape (exactly the right number of
    non-empty fields on every line, integer ids, at most one '.' in numbers, at most 15 characters
    a field); the row-by-row parser then decides. Whatever this accepts, the row-by-row parser
    accepts too and reads to the same values.
    """
    if fmt.sep == b"::":
        if b"," in data:
            return None
        data = data.replace(b"::", b",")
    sep = b"," if fmt.sep == b"::" else fmt.sep
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    data = data.rstrip(b"\n") + b"\n"  # trailing blank lines are skipped anyway
    if data.translate(None, b"0123456789.\n" + sep):
        return None
    buf = np.frombuffer(_PAD + data, np.uint8)
    sep_code = sep[0]
    ncols = len(fmt.roles)
    delim = np.flatnonzero((buf == sep_code) | (buf == 10))[len(_PAD):]
    if delim.size % ncols:
        return None
    ends = delim.reshape(-1, ncols)
    if not (buf[ends[:, -1]] == 10).all() or not (buf[ends[:, :-1]] == sep_code).all():
        return None
    starts = np.empty_like(delim)
    starts[0] = len(_PAD)
    starts[1:] = delim[:-1] + 1
    lengths = delim - starts
    if lengths.min() < 1 or lengths.max() > _FAST_MAX_WIDTH:
        return None
    lengths = lengths.reshape(-1, ncols)
    out = {}
    for j, role in enumerate(fmt.roles):
        values = _fast_field(buf, ends[:, j], lengths[:, j], allow_dot=role in ("weight", "timestamp"))
        if values is None:
            return None
        out[role] = values
    return out


def _fast_field(
    buf: np.ndarray, ends: np.ndarray, lengths: np.ndarray, *, allow_dot: bool
) -> np.ndarray | None:
    """Numbers made of digits (and one optional '.') at ``buf[ends-lengths:ends]``."""
    width = int(lengths.max())
    pos = np.arange(width)[:, None]
    # right-aligned windows, one row per place value; ``buf`` starts with padding, so idx >= 0
    chars = buf[ends[None, :] + (pos - width)]
    inside = pos >= (width - lengths)[None, :]
    dot = (chars == 46) & inside
    ndot = dot.sum(axis=0)
    if allow_dot:
        if ndot.max() > 1 or (lengths - ndot).min() < 1:
            return None
    elif ndot.any():
        return None
    digits = (chars - 48) * (inside & ~dot)
    full = digits[0].astype(np.int64)  # the digits with '.' read as 0 (at most 15: no overflow)
    for row in digits[1:]:
        full *= 10
        full += row
    if not allow_dot:
        return full
    if not ndot.any():
        return full.astype(np.float64)
    has_dot = ndot > 0
    frac = np.where(has_dot, width - 1 - np.argmax(dot, axis=0), 0)  # digits after the '.'
    scale = 10 ** frac
    mantissa = np.where(has_dot, full // (scale * 10) * scale + full % scale, full)
    # both operands are exact, so the correctly rounded quotient equals float(text)
    return mantissa / scale.astype(np.float64)


def _slow_numeric(
    data: bytes, fmt: _Numeric, src: str, first_line: int, limit: int | None
) -> dict[str, np.ndarray]:
    """Parse a block of lines row by row, raising :class:`DataError` at the first bad row."""
    try:
        text = data.decode("utf-8")
        checked = True
    except UnicodeDecodeError:  # report the bad line only when the rows before it are fine
        text = data.decode("utf-8", "surrogateescape")
        checked = False
    sep = fmt.sep.decode()
    ncols = len(fmt.roles)
    store: dict[str, array[Any]] = {r: array("q") if r in ("user", "item") else array("d") for r in fmt.roles}
    n = 0
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line_no, line in enumerate(lines, first_line):
        if limit is not None and n >= limit:
            break
        if not line.strip():
            continue
        if not checked:
            _check_utf8(line, src, line_no)
        fields = line.split(sep)
        if len(fields) != ncols:
            raise DataError(
                f"{src}:{line_no}: expected {ncols} {fmt.sep_name}-separated fields "
                f"({', '.join(_LABELS[r] for r in fmt.roles)}) but found {len(fields)} in {_show(line)}."
            )
        for role, field in zip(fmt.roles, fields, strict=True):
            store[role].append(_parse_ml_field(field, role, src, line_no))
        n += 1
    return {r: np.array(v, dtype=np.int64 if v.typecode == "q" else np.float64) for r, v in store.items()}


def _parse_ml_field(field: str, role: str, src: str, line_no: int) -> int | float:
    label = _LABELS[role]
    s = field.strip()
    if not s:
        raise DataError(f"{src}:{line_no}: the {label} is empty.")
    if role in ("user", "item"):
        try:
            v = int(s)
        except ValueError:
            raise DataError(f"{src}:{line_no}: {label} {_show(field)} is not an integer.") from None
        if not -(2**63) <= v < 2**63:
            raise DataError(f"{src}:{line_no}: {label} {_show(field)} lies outside the 64-bit integer range.")
        return v
    try:
        value = float(s)
    except ValueError:
        raise DataError(f"{src}:{line_no}: {label} {_show(field)} is not a number.") from None
    if not math.isfinite(value):
        raise DataError(f"{src}:{line_no}: {label} {_show(field)} is not a finite number.")
    if role == "weight" and value < 0:
        raise DataError(f"{src}:{line_no}: {label} {_show(field)} is negative.")
    return value


# ----------------------------------------------------------------------------------------------
# generic CSV


def _read_generic(
    fh: io.BufferedReader, roles: tuple[str, ...], src: str, header_line: int, limit: int | None
) -> EventLog:
    """Read the rows of a generic CSV file (``fh`` positioned just after the header)."""
    rows = _GenericRows(roles, src)
    text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    prev_end = header_line  # physical line where the previous record ended
    n = 0
    try:
        for row in reader:
            line_no = prev_end + 1
            prev_end = header_line + reader.line_num
            if len(row) <= 1 and not "".join(row).strip():
                continue  # blank line
            if limit is not None and n >= limit:
                break
            rows.add(row, line_no)
            n += 1
    except csv.Error as exc:
        raise DataError(f"{src}:{header_line + reader.line_num}: unreadable CSV ({exc}).") from None
    finally:
        text.detach()
    if n == 0:
        raise DataError(f"{src}: the file has a header but no data rows.")
    return rows.event_log()


class _GenericRows:
    """The columns of a generic CSV file, filled row by row; ids get dense codes as first seen."""

    def __init__(self, roles: tuple[str, ...], src: str) -> None:
        self.roles, self.src = roles, src
        self.ui, self.ii, self.ti = roles.index("user"), roles.index("item"), roles.index("timestamp")
        self.wi = roles.index("weight") if "weight" in roles else None
        self.ki = roles.index("kind") if "kind" in roles else None
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.u_col, self.i_col, self.k_col = array("q"), array("q"), array("b")
        self.t_col, self.w_col = array("d"), array("d")

    def add(self, row: list[str], line_no: int) -> None:
        """Check and append one non-blank record, which starts on physical line ``line_no``."""
        src, roles = self.src, self.roles
        if len(row) != len(roles):
            raise DataError(
                f"{src}:{line_no}: expected {len(roles)} comma-separated fields ({', '.join(roles)}) "
                f"but found {len(row)} in {_show(','.join(row))}."
            )
        u = row[self.ui].strip()
        if not u:
            raise DataError(f"{src}:{line_no}: the user id is empty.")
        it = row[self.ii].strip()
        if not it:
            raise DataError(f"{src}:{line_no}: the item id is empty.")
        self.u_col.append(self._code(self.users, u, "user", line_no))
        self.i_col.append(self._code(self.items, it, "item", line_no))
        self.t_col.append(_parse_timestamp(row[self.ti], src, line_no))
        self.w_col.append(1.0 if self.wi is None else _parse_weight(row[self.wi], src, line_no))
        self.k_col.append(_KIND_CODE["event"] if self.ki is None else self._kind(row[self.ki], line_no))

    def _code(self, codes: dict[str, int], name: str, role: str, line_no: int) -> int:
        code = codes.get(name)
        if code is None:
            _check_id(name, role, self.src, line_no)
            code = codes[name] = len(codes)
        return code

    def _kind(self, field: str, line_no: int) -> int:
        kind = _KIND_CODE.get(field.strip().lower())
        if kind is None:
            raise DataError(
                f"{self.src}:{line_no}: unknown kind {_show(field)} (expected one of {', '.join(KINDS)})."
            )
        return kind

    def event_log(self) -> EventLog:
        log = EventLog.from_arrays(
            np.frombuffer(self.u_col, np.int64),
            np.frombuffer(self.i_col, np.int64),
            np.frombuffer(self.t_col, np.float64),
            np.frombuffer(self.w_col, np.float64),
            np.frombuffer(self.k_col, np.int8),
            source=self.src,
            meta={"format": "generic-csv"},
        )
        user_names = np.array(list(self.users), dtype=str)
        item_names = np.array(list(self.items), dtype=str)
        return replace(log, user_ids=user_names[log.user_ids], item_ids=item_names[log.item_ids])


def _parse_timestamp(field: str, src: str, line_no: int) -> float:
    s = field.strip()
    if not s:
        raise DataError(f"{src}:{line_no}: the timestamp is empty.")
    try:
        value = float(s)
    except ValueError:
        try:
            when = datetime.fromisoformat(s)
        except ValueError:
            raise DataError(
                f"{src}:{line_no}: timestamp {_show(field)} is neither a number of seconds "
                "nor an ISO-8601 date/time."
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if not math.isfinite(value):
        raise DataError(f"{src}:{line_no}: timestamp {_show(field)} is not a finite number.")
    return value


def _parse_weight(field: str, src: str, line_no: int) -> float:
    s = field.strip()
    if not s:
        raise DataError(f"{src}:{line_no}: the weight is empty.")
    try:
        value = float(s)
    except ValueError:
        raise DataError(f"{src}:{line_no}: weight {_show(field)} is not a number.") from None
    if not math.isfinite(value):
        raise DataError(f"{src}:{line_no}: weight {_show(field)} is not a finite number.")
    if value < 0:
        raise DataError(f"{src}:{line_no}: weight {_show(field)} is negative.")
    return value


# ----------------------------------------------------------------------------------------------
# message helpers


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of ``text``, shortened to about ``limit`` characters."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _quote_list(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _decode_error(src: str, line_no: int, raw: bytes, exc: UnicodeDecodeError) -> DataError:
    bad = raw[exc.start: exc.start + 4]
    return DataError(f"{src}:{line_no}: the line is not UTF-8 text (bytes {bad!r} at byte {exc.start + 1}).")


def _check_utf8(text: str, src: str, line_no: int) -> None:
    """Raise a :class:`DataError` if ``text`` (decoded with ``surrogateescape``) held invalid UTF-8."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start: exc.start + 4].encode("utf-8", "surrogateescape")
        shown = text[:80].encode("utf-8", "surrogateescape")
        raise DataError(
            f"{src}:{line_no}: the line is not UTF-8 text (bytes {bad!r} in {shown!r})."
        ) from None


def _check_id(text: str, role: str, src: str, line_no: int) -> None:
    """Reject ids that are not valid UTF-8 or hold NUL characters (numpy strings would drop them)."""
    _check_utf8(text, src, line_no)
    if "\x00" in text:
        raise DataError(f"{src}:{line_no}: the {role} id {_show(text)} contains a NUL character.")

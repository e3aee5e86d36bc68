"""Tests for :mod:`fedrec.data.loaders`."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.data import loaders
from fedrec.data.events import KINDS, DataError
from fedrec.data.loaders import load_events

REAL_RATINGS = Path(__file__).resolve().parents[1].parent / "shared/data/ml-latest-small/ratings.csv"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def triples(log) -> list[tuple]:
    """The events as (original user, original item, timestamp, weight, kind) in log order."""
    return [
        (log.user_ids[u].item(), log.item_ids[i].item(), float(t), float(w), KINDS[k])
        for u, i, t, w, k in zip(log.user, log.item, log.timestamp, log.weight, log.kind, strict=True)
    ]


def check_dense(log) -> None:
    assert log.user.dtype == np.int64 and log.item.dtype == np.int64
    assert set(log.user.tolist()) == set(range(log.n_users))
    assert set(log.item.tolist()) == set(range(log.n_items))
    assert len(log.user_ids) == log.n_users and len(log.item_ids) == log.n_items
    assert np.all(np.diff(log.timestamp) >= 0)


def expect_error(path: Path, line: int, *fragments: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_events(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert msg.endswith("."), msg
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------
# the four formats


def test_movielens_csv(tmp_path):
    path = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "10,100,4.0,300\n"
        "20,100,3.5,100\n"
        "10,200,5,200\n"
        "30,300,0.5,100\n",
    )
    log = load_events(path)
    check_dense(log)
    assert len(log) == 4 and log.n_users == 3 and log.n_items == 3
    assert log.meta == {"format": "movielens-csv"}
    assert log.source == str(path)
    assert log.timestamp.tolist() == [100, 100, 200, 300]
    # stable sort by time; dense ids in order of first appearance in time
    assert triples(log) == [
        (20, 100, 100.0, 3.5, "rating"),
        (30, 300, 100.0, 0.5, "rating"),
        (10, 200, 200.0, 5.0, "rating"),
        (10, 100, 300.0, 4.0, "rating"),
    ]
    assert log.user.tolist() == [0, 1, 2, 2]
    assert log.item.tolist() == [0, 1, 2, 0]
    assert log.user_ids.tolist() == [20, 30, 10]
    assert log.item_ids.tolist() == [100, 300, 200]


def test_movielens_csv_column_order_case_crlf_and_blank_lines(tmp_path):
    text = "\ufefftimestamp,Rating,MOVIEID,userid\r\n5,2.5,7,1\r\n\r\n3,4,8,2\r\n\r\n"
    path = write(tmp_path / "r.csv", text)
    log = load_events(path)
    assert triples(log) == [(2, 8, 3.0, 4.0, "rating"), (1, 7, 5.0, 2.5, "rating")]


def test_ml_100k(tmp_path):
    text = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
    path = write(tmp_path / "u.data", text)
    log = load_events(path)
    check_dense(log)
    assert log.meta == {"format": "ml-100k"}
    assert triples(log) == [
        (22, 377, 878887116.0, 1.0, "rating"),
        (196, 242, 881250949.0, 3.0, "rating"),
        (186, 302, 891717742.0, 3.0, "rating"),
    ]


def test_ml_1m(tmp_path):
    text = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000"  # no final newline
    path = write(tmp_path / "ratings.dat", text)
    log = load_events(path)
    check_dense(log)
    assert log.meta == {"format": "ml-1m"}
    assert log.n_users == 2 and log.n_items == 2
    assert triples(log) == [
        (2, 1193, 978300000.0, 4.0, "rating"),
        (1, 1193, 978300760.0, 5.0, "rating"),
        (1, 661, 978302109.0, 3.0, "rating"),
    ]
    assert log.item.tolist() == [0, 0, 1]


def test_generic_csv(tmp_path):
    path = write(
        tmp_path / "events.csv",
        "Item, KIND ,user,Timestamp,weight\n"
        "book-1,click,alice,30,1\n"
        '"shoe, red",Purchase,bob,10,2.5\n'
        "book-1,view,bob,20,0\n",
    )
    log = load_events(path)
    check_dense(log)
    assert log.meta == {"format": "generic-csv"}
    assert triples(log) == [
        ("bob", "shoe, red", 10.0, 2.5, "purchase"),
        ("bob", "book-1", 20.0, 0.0, "view"),
        ("alice", "book-1", 30.0, 1.0, "click"),
    ]
    assert log.user_ids.tolist() == ["bob", "alice"]
    assert log.item_ids.tolist() == ["shoe, red", "book-1"]


def test_generic_csv_defaults(tmp_path):
    path = write(tmp_path / "e.csv", "user,item,timestamp\nu1,i1,2\n u2 , i1 ,1.5\n")
    log = load_events(path)
    assert triples(log) == [("u2", "i1", 1.5, 1.0, "event"), ("u1", "i1", 2.0, 1.0, "event")]


def test_generic_csv_iso_timestamps(tmp_path):
    path = write(
        tmp_path / "e.csv",
        "user,item,timestamp\n"
        "a,x,2021-03-04T05:06:07Z\n"
        "a,y,2021-03-04 05:06:07\n"  # naive: UTC
        "b,x,2021-03-04T07:06:07+02:00\n"
        "b,y,2021-03-04\n"
        "c,z,1614834367\n",
    )
    log = load_events(path)
    t = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp()
    midnight = datetime(2021, 3, 4, tzinfo=UTC).timestamp()
    assert log.timestamp.tolist() == [midnight, t, t, t, t]
    assert t == 1614834367.0
    assert triples(log)[0][:2] == ("b", "y")


def test_generic_ids_stay_strings(tmp_path):
    path = write(tmp_path / "e.csv", "user,item,timestamp\n007,1,0\n7,1,1\n")
    log = load_events(path)
    assert log.n_users == 2
    assert log.user_ids.tolist() == ["007", "7"]


# ----------------------------------------------------------------------------------------------
# detection, files and directories


def test_format_detected_from_content_not_name(tmp_path):
    assert load_events(write(tmp_path / "x.txt", "1\t2\t3\t4\n")).meta["format"] == "ml-100k"
    assert load_events(write(tmp_path / "y.csv", "1::2::3::4\n")).meta["format"] == "ml-1m"
    generic = write(tmp_path / "u.data", "user,item,timestamp\na,b,1\n")
    assert load_events(generic).meta["format"] == "generic-csv"
    ml = write(tmp_path / "ratings.dat", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    assert load_events(ml).meta["format"] == "movielens-csv"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        load_events(path)
    assert str(info.value) == f"No such data file: {path}."


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n", "movielens-csv"),
        ("u.data", "1\t2\t3\t4\n", "ml-100k"),
        ("ratings.dat", "1::2::3::4\n", "ml-1m"),
    ],
)
def test_directory_resolution(tmp_path, name, text, fmt):
    write(tmp_path / "README", "not data\n")
    write(tmp_path / name, text)
    log = load_events(tmp_path)
    assert log.meta["format"] == fmt
    assert log.source == str(tmp_path / name)


def test_directory_prefers_ratings_csv(tmp_path):
    write(tmp_path / "u.data", "1\t2\t3\t4\n")
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    assert load_events(str(tmp_path)).meta["format"] == "movielens-csv"


def test_directory_without_data(tmp_path):
    write(tmp_path / "movies.csv", "movieId,title\n")
    with pytest.raises(DataError, match="holds none of the data files") as info:
        load_events(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "\r\n  \n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path / "e.csv", text)
    with pytest.raises(DataError, match="empty") as info:
        load_events(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("header", ["userId,movieId,rating,timestamp\n", "user,item,timestamp\n\n"])
def test_header_without_rows(tmp_path, header):
    path = write(tmp_path / "e.csv", header)
    with pytest.raises(DataError, match="no data rows"):
        load_events(path)


@pytest.mark.parametrize(
    "header",
    ["a,b,c", "1,2,3.5,4", "user item timestamp", "userId;movieId;rating;timestamp", "uid\tiid\tr\tt"],
)
def test_bad_header_lists_formats(tmp_path, header):
    path = write(tmp_path / "e.csv", header + "\n1,2,3\n")
    msg = expect_error(path, 1, "unrecognised header", repr(header))
    for fmt in ("ratings.csv", "u.data", "ratings.dat", "generic CSV"):
        assert fmt in msg


def test_bad_header_line_counts_leading_blank_lines(tmp_path):
    expect_error(write(tmp_path / "e.csv", "\n\nfoo,bar\n"), 3, "unrecognised header")


def test_generic_header_problems(tmp_path):
    expect_error(write(tmp_path / "a.csv", "user,item,timestamp,Rating,extra\n"), 1, "'Rating'", "'extra'")
    expect_error(write(tmp_path / "b.csv", "user,item,weight\n"), 1, "lacks", "'timestamp'")
    expect_error(write(tmp_path / "c.csv", "user,item,timestamp,USER\n"), 1, "repeats", "'user'")
    expect_error(write(tmp_path / "d.csv", "userId,movieId,rating,timestamp,tag\n"), 1, "'userId'", "'tag'")


def test_max_rows(tmp_path):
    body = "".join(f"{u},{u + 1},3,{100 - u}\n" for u in range(10))
    path = write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n" + body + "bad row\n")
    log = load_events(path, max_rows=4)
    assert len(log) == 4 and sorted(log.user_ids.tolist()) == [0, 1, 2, 3]
    generic = write(tmp_path / "g.csv", "user,item,timestamp\na,b,1\n\nc,d,2\nbad\n")
    assert len(load_events(generic, max_rows=2)) == 2
    with pytest.raises(ValueError):
        load_events(path, max_rows=0)


# ----------------------------------------------------------------------------------------------
# malformed rows: the message names the file, the physical line and the field

ML_HEADER = "userId,movieId,rating,timestamp\n"


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("1,2,3", ["expected 4", "found 3", "'1,2,3'"]),
        ("1,2,3,4,5", ["found 5"]),
        ("1,2,abc,4", ["rating 'abc' is not a number"]),
        ("1,2,4,yesterday", ["timestamp 'yesterday' is not a number"]),
        ("x1,2,4,5", ["user id 'x1' is not an integer"]),
        ("1,2.5,4,5", ["item id '2.5' is not an integer"]),
        (",2,4,5", ["user id is empty"]),
        ("1,2,nan,5", ["rating 'nan' is not a finite number"]),
        ("1,2,3,inf", ["timestamp 'inf' is not a finite number"]),
        ("1,2,-1,5", ["rating '-1' is negative"]),
    ],
)
def test_movielens_csv_bad_row(tmp_path, row, fragments):
    path = write(tmp_path / "ratings.csv", ML_HEADER + "1,2,3,4\n\n5,6,7,8\n" + row + "\n9,9,9,9\n")
    expect_error(path, 5, *fragments)


def test_ml_100k_bad_rows(tmp_path):
    good = "1\t2\t3\t4\n"
    path = write(tmp_path / "a.txt", good * 3 + "1\t2\t3\n")
    expect_error(path, 4, "expected 4 tab-separated", "'1\\t2\\t3'")
    expect_error(write(tmp_path / "b.txt", good + "1\t2\tfive\t4\n"), 2, "rating 'five'")
    expect_error(write(tmp_path / "c.txt", "1\t\t3\t4\n"), 1, "item id is empty")
    expect_error(write(tmp_path / "d.txt", good + "1 2 3 4\n"), 2, "found 1")


def test_ml_1m_bad_rows(tmp_path):
    good = "1::2::3::4\n"
    path = write(tmp_path / "a.dat", good + good + "1::2::3\n")
    expect_error(path, 3, "expected 4 '::'-separated", "found 3")
    expect_error(write(tmp_path / "b.dat", good + "1,5::2::3::4\n"), 2, "user id '1,5' is not an integer")
    expect_error(write(tmp_path / "c.dat", good + "1::2::3::4::\n"), 2, "found 5")
    expect_error(write(tmp_path / "d.dat", good + "1::2::-3::4\n"), 2, "rating '-3' is negative")


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("a,b", ["expected 3", "found 2", "'a,b'"]),
        (",b,1", ["user id is empty"]),
        ("a,  ,1", ["item id is empty"]),
        ("a,b,", ["timestamp is empty"]),
        ("a,b,soon", ["timestamp 'soon' is neither a number of seconds nor an ISO-8601 date/time"]),
        ("a,b,2021-13-01", ["'2021-13-01'"]),
        ("a,b,nan", ["timestamp 'nan' is not a finite number"]),
    ],
)
def test_generic_bad_row(tmp_path, row, fragments):
    path = write(tmp_path / "g.csv", "user,item,timestamp\na,b,1\n" + row + "\n")
    expect_error(path, 3, *fragments)


@pytest.mark.parametrize(
    ("cells", "fragments"),
    [
        ("-0.5,click", ["weight '-0.5' is negative"]),
        ("heavy,click", ["weight 'heavy' is not a number"]),
        ("inf,click", ["weight 'inf' is not a finite number"]),
        ("1,like", ["unknown kind 'like'", "rating, click"]),
        ("1,", ["unknown kind ''"]),
    ],
)
def test_generic_bad_weight_or_kind(tmp_path, cells, fragments):
    path = write(tmp_path / "g.csv", "user,item,timestamp,weight,kind\n\nu,i,1,1,view\nu,i,2," + cells + "\n")
    expect_error(path, 4, *fragments)


def test_generic_line_numbers_count_physical_lines(tmp_path):
    # a quoted id spanning two lines: the bad row after it is on physical line 4
    path = write(tmp_path / "g.csv", 'user,item,timestamp\n"multi\nline",b,1\nc,d,oops\n')
    expect_error(path, 4, "'oops'")


def test_invalid_utf8_and_nul(tmp_path):
    path = tmp_path / "g.csv"
    path.write_bytes(b"user,item,timestamp\na,b,1\nc\xff,d,2\n")
    expect_error(path, 3, "not UTF-8")
    path.write_bytes(b"userId,movieId,rating,timestamp\n1,2,3,4\n1,2\xff,3,4\n")
    expect_error(path, 3, "not UTF-8")
    path.write_bytes(b"user,item,timestamp\na\x00,b,1\n")
    expect_error(path, 2, "NUL")


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_block_boundaries_keep_line_numbers(tmp_path, monkeypatch, chunk):
    """Small read blocks: values are unchanged and error lines stay exact across blocks."""
    monkeypatch.setattr(loaders, "_CHUNK_BYTES", chunk)
    rows = [f"{u % 7},{u % 5},{(u % 10) / 2},{1000 + 37 * u % 101}" for u in range(60)]
    path = write(tmp_path / "ratings.csv", ML_HEADER + "\n".join(rows) + "\n")
    log = load_events(path)
    monkeypatch.setattr(loaders, "_CHUNK_BYTES", 1 << 20)
    ref = load_events(path)
    assert triples(log) == triples(ref) and len(log) == 60
    bad = [*rows[:41], "3,4,x,5", *rows[41:]]
    monkeypatch.setattr(loaders, "_CHUNK_BYTES", chunk)
    expect_error(write(tmp_path / "bad.csv", ML_HEADER + "\n".join(bad) + "\n"), 43, "rating 'x'")


# ----------------------------------------------------------------------------------------------
# the real ml-latest-small file


def test_real_ml_latest_small():
    if not REAL_RATINGS.is_file():
        pytest.skip(f"{REAL_RATINGS} is absent")
    start = time.perf_counter()
    log = load_events(REAL_RATINGS)
    elapsed = time.perf_counter() - start
    assert len(log) == 100836
    assert log.n_users == 610
    assert log.n_items == 9724
    assert np.all(np.diff(log.timestamp) >= 0)
    assert log.meta == {"format": "movielens-csv"}
    assert set(np.unique(log.weight).tolist()) <= {x / 2 for x in range(1, 11)}
    assert elapsed < 1.5, f"loading {REAL_RATINGS} took {elapsed:.2f} s"


# ----------------------------------------------------------------------------------------------
# properties

ID_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
IDS = st.text(ID_CHARS, min_size=1, max_size=6).filter(lambda s: s == s.strip() and s != "")
TIMES = st.one_of(
    st.integers(-(10**10), 10**10).map(lambda t: (str(t), float(t))),
    st.floats(-1e9, 1e9, allow_nan=False).map(lambda t: (repr(t), t)),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: (d.isoformat(), d.replace(tzinfo=UTC).timestamp())
    ),
)
ROWS = st.lists(
    st.tuples(IDS, IDS, TIMES, st.floats(0, 1e6, allow_nan=False), st.sampled_from(KINDS)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=ROWS,
    order=st.permutations(range(5)),
    # minimal quoting only with "\r\n" endings: the writer then quotes ids holding "\r" or "\n"
    style=st.sampled_from([("\n", csv.QUOTE_ALL), ("\r\n", csv.QUOTE_ALL), ("\r\n", csv.QUOTE_MINIMAL)]),
)
def test_generic_csv_round_trip(tmp_path, rows, order, style):
    names = ["user", "item", "timestamp", "weight", "kind"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=style[0], quoting=style[1])
    writer.writerow([names[j] for j in order])
    for user, item, (t_text, _), weight, kind in rows:
        cells = [user, item, t_text, repr(weight), kind]
        writer.writerow([cells[j] for j in order])
    path = write(tmp_path / "prop.csv", buf.getvalue())
    log = load_events(path)
    check_dense(log)
    assert len(log) == len(rows)
    assert log.n_users == len({r[0] for r in rows})
    assert log.n_items == len({r[1] for r in rows})
    got = Counter((u, i, t, k) for u, i, t, _, k in triples(log))
    assert got == Counter((u, i, t, k) for u, i, (_, t), _, k in rows)
    assert sorted(log.weight.tolist()) == sorted(float(np.float32(r[3])) for r in rows)


ML_ROWS = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.one_of(st.integers(0, 10), st.decimals(0, 10, places=3).map(str), st.just("4.")),
        st.one_of(st.integers(0, 2 * 10**9), st.floats(0, 1e9, allow_nan=False).map(repr)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ML_ROWS, sep=st.sampled_from([",", "\t", "::"]), chunk=st.sampled_from([8, 50, 1 << 20]))
def test_fast_path_matches_row_by_row(tmp_path, rows, sep, chunk):
    """The vectorised parser reads exactly what the row-by-row parser reads."""
    header = ML_HEADER if sep == "," else ""
    text = header + "".join(sep.join(str(c) for c in row) + "\n" for row in rows)
    path = write(tmp_path / "ml.txt", text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loaders, "_CHUNK_BYTES", chunk)
        fast = load_events(path)
        mp.setattr(loaders, "_fast_numeric", lambda data, fmt: None)
        slow = load_events(path)
    assert triples(fast) == triples(slow)
    assert Counter((u, i, t) for u, i, t, _, _ in triples(fast)) == Counter(
        (u, i, float(t)) for u, i, _, t in rows
    )

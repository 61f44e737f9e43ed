"""Property-based tests of the clickstream loaders (`read_clickstream`, and `replay.load_events` on top),
and of the flow's click decoder (`schemas.events.decode_click`: any bytes give an event or a dead-letter
reason).

Whatever a file holds, loading it gives either every row, with its values, or one DataError that
names the file (and the row and column when one row is to blame): never another exception and never
a row dropped or changed silently. Derandomized with no example database, so CI sees the same
examples every run; the example counts keep the whole module to a few seconds.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slsrec.data import MAX_MS, MIN_MS, read_clickstream
from slsrec.errors import DataError
from slsrec.replay import load_events

FUZZ = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FORMATS = ("csv", "parquet", "jsonl")
SCRATCH = tempfile.TemporaryDirectory(prefix="slsrec-fuzz-")  # one file per format, rewritten by each example

# Ids: any text that is not blank (blank ids are an error of their own, tested below).
ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip())
rows = st.lists(st.tuples(ids, ids, st.integers(MIN_MS, MAX_MS), st.sampled_from(["view", "click", "purchase"])),
                min_size=1, max_size=8)


def frame(rs) -> pd.DataFrame:
    return pd.DataFrame(rs, columns=["user_id", "item_id", "timestamp", "event_type"])


def encode(df: pd.DataFrame, fmt: str) -> bytes:
    """The bytes another program would write for ``df``."""
    if fmt == "csv":
        return df.to_csv(index=False, lineterminator="\r\n").encode()  # so that a lone \r in an id is quoted
    if fmt == "parquet":
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
        return out.getvalue()
    return "".join(json.dumps(r) + "\n" for r in df.to_dict("records")).encode()


def load(data: bytes, fmt: str) -> tuple[Path, pd.DataFrame | DataError]:
    """Write ``data`` as a .``fmt`` file and read it back: the frame, or the DataError it raised."""
    path = Path(SCRATCH.name) / f"clicks.{fmt}"
    path.write_bytes(data)
    try:
        return path, read_clickstream(path)
    except DataError as e:
        return path, e


def assert_valid_or_named(path: Path, got) -> None:
    """Valid rows (ids non-blank text, timestamps in range), or a DataError naming the file."""
    if isinstance(got, DataError):
        assert str(got).startswith(f"{path}: "), got
        assert "\n" not in str(got)
        return
    assert list(got.columns[:3]) == ["user_id", "item_id", "timestamp"] and len(got) > 0
    for col in ("user_id", "item_id"):
        assert all(isinstance(v, str) and v.strip() for v in got[col]), got[col]
    assert got["timestamp"].dtype == np.int64 and got["timestamp"].between(MIN_MS, MAX_MS).all()


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(rs=rows)
def test_every_valid_row_comes_back_unchanged(fmt, rs):
    df = frame(rs)
    _, got = load(encode(df, fmt), fmt)
    assert not isinstance(got, DataError), got
    pd.testing.assert_frame_equal(got, df, check_dtype=False)
    assert got["timestamp"].dtype == np.int64


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_give_valid_rows_or_a_data_error(fmt, data):
    assert_valid_or_named(*load(data, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(rs=rows, edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["flip", "drop", "insert"]),
                                         st.integers(0, 255)), min_size=1, max_size=4))
def test_a_damaged_file_gives_valid_rows_or_a_data_error(fmt, rs, edits):
    data = bytearray(encode(frame(rs), fmt))
    for at, how, byte in edits:  # a few bytes flipped, dropped or inserted: mostly well-formed, a little broken
        i = at % (len(data) + 1)
        if how == "insert":
            data.insert(i, byte)
        elif i < len(data):
            data[i] = byte if how == "flip" else data[i]
            if how == "drop":
                del data[i]
    assert_valid_or_named(*load(bytes(data), fmt))


# One cell made bad: the error names the row and the column.
bad_cells = st.one_of(
    st.tuples(st.sampled_from(["user_id", "item_id"]), st.sampled_from(["", "  ", None])),
    st.tuples(st.just("timestamp"), st.sampled_from([None, "", "soon", "2024-13-45", "1e30", "inf", "-inf", "nan",
                                                     "99999999999999999999", "-1e17", "2262-04-12T00:00:00Z"])),
)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(rs=rows, where=st.integers(0, 7), cell=bad_cells)
def test_a_bad_value_is_named_by_row_and_column(fmt, rs, where, cell):
    column, value = cell
    df = frame(rs).astype({"timestamp": object})
    if fmt != "jsonl":  # a column holds one type there: timestamps as text, as a spreadsheet would export them
        df["timestamp"] = df["timestamp"].astype(str)
    row = where % len(df)
    df.loc[row, column] = value
    path, got = load(encode(df, fmt), fmt)
    assert isinstance(got, DataError), f"{value!r} in {column} was accepted: {got}"
    assert str(got).startswith(f"{path}: row {row + 1}") and f"column {column!r}" in str(got), got


@FUZZ
@given(rs=rows, extra=st.integers(1, 3))
def test_csv_rows_longer_than_the_header_are_an_error_not_a_shift(rs, extra):
    longer = frame(rs)[["user_id", "item_id", "timestamp"]].assign(**{f"x{k}": 7 for k in range(extra)})
    body = longer.to_csv(index=False, header=False, lineterminator="\r\n")  # every row: more fields than named
    path, got = load(("user_id,item_id,timestamp\r\n" + body).encode(), "csv")
    assert isinstance(got, DataError) and str(got).startswith(f"{path}: "), got


@pytest.mark.parametrize("header", ["user_id,user_id,item_id,timestamp", "user_id,item_id,timestamp,timestamp"])
def test_csv_with_a_required_column_twice_is_an_error(header):
    path, got = load(f"{header}\nu,v,i,5\n".encode(), "csv")
    assert isinstance(got, DataError) and "appears 2 times in the header" in str(got), got


json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({}, optional={"user_id": json_values, "item_id": json_values,
                                                             "timestamp": json_values, "event_type": json_values}),
                        min_size=1, max_size=5))
def test_json_lines_of_any_values_give_valid_rows_or_a_data_error(records):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path, got = load(data, "jsonl")
    assert_valid_or_named(path, got)
    if not isinstance(got, DataError):  # every record is a row, and only what could be an id was taken as one
        assert len(got) == len(records)
        assert all(isinstance(r["user_id"], (str, int, float)) and not isinstance(r["user_id"], bool) for r in records)


arrow_columns = st.sampled_from([
    pa.array(["u1", "u2"]), pa.array([1, 2]), pa.array([1.5, float("nan")]), pa.array([True, False]),
    pa.array([b"\xff", b"ok"]), pa.array([[1], [2, 3]]), pa.array([None, None], pa.null()),
    pa.array([{"a": 1}, {"a": 2}]), pa.array([0, 2**63 + 5], pa.uint64()), pa.array([1.0, float("inf")]),
    pa.array([1_700_000_000_000, None], pa.timestamp("ms")), pa.array(["x", "y"]).dictionary_encode(),
    pa.array(["2024-01-01", "2024-02-30"]),
])


@FUZZ
@given(user=arrow_columns, item=arrow_columns, ts=arrow_columns)
def test_parquet_columns_of_any_type_give_valid_rows_or_a_data_error(user, item, ts):
    out = io.BytesIO()
    pq.write_table(pa.table({"user_id": user, "item_id": item, "timestamp": ts}), out)
    assert_valid_or_named(*load(out.getvalue(), "parquet"))


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(rs=rows, data=st.binary(max_size=60))
def test_replay_loads_every_row_or_names_the_problem(fmt, rs, data):
    """What `slsrec replay` reads: as many events as rows, or a DataError (a UserError: one CLI line)."""
    for content in (encode(frame(rs), fmt), data):
        path, got = load(content, fmt)
        try:
            events = load_events(path, now_ms=1_750_000_000_000)
        except DataError as e:
            assert str(e).startswith(f"{path}: "), e
            continue
        assert not isinstance(got, DataError) and len(events) == len(got)


# ---- the click decoder: any Kafka message value ------------------------------------------------------

from schemas.events import MAX_REASON_CHARS, ClickEvent, InvalidEvent, decode_click  # noqa: E402

NOW_MS = 1_764_000_000_000  # a fixed "recent" time: within the decoder's accepted range for years
click_ids = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
click_fields = st.fixed_dictionaries(
    {"event_id": click_ids, "user_id": click_ids, "item_id": click_ids, "ts": st.integers(946_684_800_000, NOW_MS),
     "event_type": st.sampled_from(["view", "click", "add_to_cart", "purchase"])})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


def assert_event_or_reason(raw: bytes) -> ClickEvent | None:
    """A valid ClickEvent, or an InvalidEvent with a short one-line reason: nothing else ever."""
    try:
        event = decode_click(raw)
    except InvalidEvent as e:
        assert e.reason and "\n" not in e.reason and len(e.reason) <= MAX_REASON_CHARS, e.reason
        return None
    assert isinstance(event, ClickEvent)
    return event


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_an_event_or_a_reason(raw):
    assert_event_or_reason(raw)


@FUZZ
@given(click_fields)
def test_every_valid_click_decodes_to_itself(fields):
    assert assert_event_or_reason(json.dumps(fields).encode()) == ClickEvent(**fields)


@FUZZ
@given(click_fields, st.text(max_size=10), json_values, st.booleans())
def test_a_click_with_one_field_changed_or_added_decodes_or_names_a_reason(fields, key, value, replace):
    """One field replaced (or an extra one added) by any JSON value: still an event or a reason."""
    changed = {**fields, (list(fields)[len(key) % len(fields)] if replace else key): value}
    event = assert_event_or_reason(json.dumps(changed, allow_nan=True).encode())
    if event is not None:
        assert decode_click(event.model_dump_json().encode()) == event


@FUZZ
@given(click_fields, st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_a_damaged_click_decodes_or_names_a_reason(fields, at, noise):
    raw = json.dumps(fields).encode()
    at %= len(raw)
    assert_event_or_reason(raw[:at] + noise + raw[at + len(noise):])

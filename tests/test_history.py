"""The recorded history: sessions topic -> Parquet -> load_history, each event exactly once."""

from __future__ import annotations

import pandas as pd
import pytest

from schemas.events import SessionClosed, SessionItem
from slsrec.data import Interactions
from slsrec.errors import DataError
from slsrec.history import ingest_sessions, load_history, read_history, write_events
from conftest import ordered_producer


def session(user: str, items: list[str], start_ts: int) -> SessionClosed:
    its = [SessionItem(item_id=i, ts=start_ts + 1000 * k, event_type="click") for k, i in enumerate(items)]
    return SessionClosed(user_id=user, items=its, start_ts=its[0].ts, end_ts=its[-1].ts, reason="gap")


def produce(settings, values: list[bytes]) -> None:
    producer = ordered_producer(settings)
    for v in values:
        producer.produce(settings.topic_sessions, v, key=b"k")
    assert producer.flush(30) == 0


def frame_of(inter: Interactions) -> set[tuple[str, str, int]]:
    return {(inter.users.raw_of(int(u)), inter.items.raw_of(int(i)), int(t))
            for u, i, t in zip(inter.user, inter.item, inter.ts)}


@pytest.mark.integration
def test_sessions_are_ingested_once_and_bad_records_are_counted(fresh_topics, topic_prefix, tmp_path, caplog):
    sessions = [session("u1", ["a", "b", "c"], 1_700_000_000_000), session("u2", ["b", "d"], 1_700_000_500_000),
                session("u1", ["e"], 1_700_100_000_000)]
    produce(fresh_topics, [s.model_dump_json().encode() for s in sessions[:2]] + [b"{not json", b'{"user_id": "x"}']
            + [sessions[2].model_dump_json().encode()])
    group = topic_prefix + "history"

    stats = ingest_sessions(fresh_topics, tmp_path, group_id=group)
    assert (stats.records, stats.sessions, stats.events, sum(stats.bad.values())) == (5, 3, 6, 2)
    assert "not a SessionClosed" in caplog.text
    expected = {(s.user_id, it.item_id, it.ts) for s in sessions for it in s.items}
    assert frame_of(load_history(tmp_path)) == expected and len(load_history(tmp_path)) == 6

    # Committed: running again reads nothing and writes nothing.
    again = ingest_sessions(fresh_topics, tmp_path, group_id=group)
    assert (again.records, again.files) == (0, [])
    # New records only are read; an event recorded twice (a flow replaying after recovery) counts once.
    produce(fresh_topics, [session("u3", ["a"], 1_700_200_000_000).model_dump_json().encode(),
                           sessions[0].model_dump_json().encode()])
    third = ingest_sessions(fresh_topics, tmp_path, group_id=group)
    assert (third.records, third.sessions) == (2, 2)
    history = load_history(tmp_path)
    assert len(history) == 7 and frame_of(history) == expected | {("u3", "a", 1_700_200_000_000)}

    # Ingesting everything again from scratch (another group: a lost commit) still gives each event once.
    ingest_sessions(fresh_topics, tmp_path, group_id=group + "-again")
    assert len(load_history(tmp_path)) == 7


def test_base_and_recorded_events_merge_once_and_base_keeps_its_indices(tmp_path):
    base = Interactions.from_frame(pd.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["a", "b", "b"],
                                                 "timestamp": [10, 20, 30]}))
    recorded = pd.DataFrame({"user_id": ["u1", "u9"], "item_id": ["b", "z"], "timestamp": [30, 40],
                             "event_type": ["view", "purchase"]})  # ("u1", "b", 30) is in the base already
    write_events(recorded, tmp_path / "somewhere-else")
    merged = load_history(tmp_path / "somewhere-else", base=base)
    assert len(merged) == 4
    assert merged.users.raw[:2] == base.users.raw and merged.items.raw[:2] == base.items.raw
    assert frame_of(merged) == frame_of(base) | {("u9", "z", 40)}
    # A missing history directory is an empty history when there is a base.
    assert frame_of(load_history(tmp_path / "nothing-yet", base=base)) == frame_of(base)


def test_nothing_to_load_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no recorded sessions"):
        load_history(tmp_path)
    (tmp_path / "date=2026-01-01").mkdir()
    pd.DataFrame({"user": ["u1"]}).to_parquet(tmp_path / "date=2026-01-01" / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: missing column 'event_id'"):
        read_history(tmp_path)
    (tmp_path / "date=2026-01-01" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_history(tmp_path)

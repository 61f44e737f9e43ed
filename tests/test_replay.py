"""`slsrec replay`: a recorded clickstream through the real local Kafka."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from typer.testing import CliRunner

from schemas.events import decode_click
from slsrec.cli import app
from slsrec.errors import DataError, ServiceError, UserError
from slsrec.replay import event_id, load_events, replay
from slsrec.settings import Settings

runner = CliRunner()
T0 = 1_700_000_000_000


def _clickstream(n_users: int = 6, per_user: int = 12) -> pd.DataFrame:
    """Interleaved users, some sharing timestamps (ties must keep file order), not sorted by time."""
    rows = []
    for u in range(n_users):
        for k in range(per_user):
            rows.append({"user_id": f"user-{u}", "item_id": f"item-{(u * 7 + k) % 23}",
                         "timestamp": T0 + k * 1000 + (u % 3) * 10, "event_type": ["view", "click"][k % 2]})
    return pd.DataFrame(rows[::-1])  # newest first: replay must sort by time


def _write(df: pd.DataFrame, path: Path) -> Path:
    {".csv": lambda: df.to_csv(path, index=False), ".parquet": lambda: df.to_parquet(path),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True)}[path.suffix]()
    return path


def _expected_order(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per user, item ids in (timestamp, file row) order: the order training uses."""
    ordered = df.reset_index(drop=True).sort_values("timestamp", kind="stable")
    return {u: g["item_id"].tolist() for u, g in ordered.groupby("user_id", sort=False)}


def _consume(settings: Settings, topic: str, n: int, timeout_s: float = 30.0) -> list:
    consumer = Consumer({**settings.kafka_config(), "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])  # no group join
    messages, deadline = [], time.monotonic() + timeout_s
    try:
        while len(messages) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                messages.append(msg)
        extra = consumer.poll(0.5)  # nothing beyond what was replayed
        assert extra is None, "more messages than events replayed"
    finally:
        consumer.close()
    return messages


@pytest.mark.integration
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_row_arrives_keyed_by_user_in_per_user_order(fresh_topics, tmp_path, suffix):
    df = _clickstream()
    path = _write(df, tmp_path / f"clicks{suffix}")
    stats = replay(path, fresh_topics.topic_clicks, fresh_topics, speed=None, progress=False)
    assert stats.events == len(df)

    messages = _consume(fresh_topics, fresh_topics.topic_clicks, len(df))
    events = [decode_click(m.value()) for m in messages]  # valid for the flow: ts not in the future
    assert sorted(e.event_id for e in events) == sorted(event_id(path, r) for r in range(1, len(df) + 1))
    assert all(m.key().decode() == e.user_id for m, e in zip(messages, events))

    partitions: dict[str, set[int]] = {}
    arrived: dict[str, list[tuple[int, str]]] = {}
    for m, e in zip(messages, events):
        partitions.setdefault(e.user_id, set()).add(m.partition())
        arrived.setdefault(e.user_id, []).append((m.offset(), e.item_id))
    assert all(len(p) == 1 for p in partitions.values())  # one user, one partition
    assert len(set().union(*partitions.values())) > 1  # ...and the users spread over partitions
    assert {u: [item for _, item in sorted(a)] for u, a in arrived.items()} == _expected_order(df)


@pytest.mark.integration
def test_replay_through_the_cli(fresh_topics, tmp_path, monkeypatch):
    path = _write(_clickstream(n_users=2, per_user=3), tmp_path / "clicks.csv")
    monkeypatch.setenv("SLSREC_KAFKA_BOOTSTRAP", fresh_topics.kafka_bootstrap)
    result = runner.invoke(app, ["replay", str(path), "--topic", fresh_topics.topic_clicks,
                                 "--as-fast-as-possible", "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert f"replayed 4 events to '{fresh_topics.topic_clicks}'" in result.output
    assert len(_consume(fresh_topics, fresh_topics.topic_clicks, 4)) == 4


@pytest.mark.integration
def test_speed_scales_the_recorded_timing(fresh_topics, tmp_path):
    # 5 events over 2.0 recorded seconds: sent over 0.5 s at speed 4, at once as fast as possible.
    df = pd.DataFrame({"user_id": ["a", "b", "a", "b", "a"], "item_id": list("vwxyz"),
                       "timestamp": [T0 + i * 500 for i in range(5)]})
    path = _write(df, tmp_path / "short.csv")
    spans = {}
    for topic, speed in ((fresh_topics.topic_clicks, 4.0), (fresh_topics.topic_sessions, None)):
        stats = replay(path, topic, fresh_topics, speed=speed, progress=False)
        sent_ms = sorted(m.timestamp()[1] for m in _consume(fresh_topics, topic, 5))  # producer CreateTime
        spans[speed] = (sent_ms[-1] - sent_ms[0]) / 1000
        assert stats.seconds >= spans[speed]
    assert 0.45 <= spans[4.0] < 1.0
    assert spans[None] < 0.2


def test_timestamps_shift_to_now_keeping_gaps_and_ids_are_reproducible(tmp_path):
    df = _clickstream(n_users=2, per_user=4)
    path = _write(df, tmp_path / "clicks.csv")
    before = int(time.time() * 1000)
    events = load_events(path)
    recorded = sorted(df["timestamp"])
    assert [e.ts - events[0].ts for e in events] == [t - recorded[0] for t in recorded]
    assert before <= events[-1].ts <= int(time.time() * 1000)
    again = load_events(path, shift_to_now=False)
    assert [e.event_id for e in again] == [e.event_id for e in events]
    assert [e.ts for e in again] == recorded


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.csv: file not found"):
        load_events(tmp_path / "missing.csv")
    bad_type = tmp_path / "bad_type.csv"
    bad_type.write_text(f"user_id,item_id,timestamp,event_type\nu1,i1,{T0},click\nu1,i2,{T0 + 1},hover\n")
    with pytest.raises(DataError, match=r"bad_type.csv: row 2, column 'event_type'.*'hover'"):
        load_events(bad_type)
    future = tmp_path / "future.csv"
    tomorrow = int(time.time() * 1000) + 86_400_000
    future.write_text(f"user_id,item_id,timestamp\nu1,i1,{T0}\nu1,i2,{tomorrow}\n")
    load_events(future)  # shifted to now: fine
    with pytest.raises(DataError, match="future.csv: row 2, column 'ts'"):
        load_events(future, shift_to_now=False)


def test_bad_flags_are_clear_errors(tmp_path):
    path = _write(_clickstream(1, 2), tmp_path / "clicks.csv")
    result = runner.invoke(app, ["replay", str(path), "--speed", "2", "--as-fast-as-possible"])
    assert isinstance(result.exception, UserError) and "not both" in str(result.exception)
    with pytest.raises(UserError, match="--speed must be positive"):
        replay(path, "clicks", speed=0.0)


def test_cli_prints_one_line_errors_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from slsrec.cli import main; main()", "replay",
                           str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert (done.returncode, done.stderr.strip()) == (2, f"error: {tmp_path / 'nope.jsonl'}: file not found")


@pytest.mark.integration
def test_a_missing_topic_is_named(services, tmp_path, topic_prefix):
    path = _write(_clickstream(1, 2), tmp_path / "clicks.csv")
    with pytest.raises(ServiceError, match=f"topic '{topic_prefix}nope' does not exist"):
        replay(path, f"{topic_prefix}nope", progress=False)

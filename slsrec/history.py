"""The interaction history the system records itself: topic ``sessions`` -> Parquet -> Interactions.

:func:`ingest_sessions` reads the ``SessionClosed`` records the flow writes to topic ``sessions``
(its own consumer group), appends them as Parquet files under ``settings.history_dir`` and only
then commits the offsets, so a crash never loses a session (it may write one twice; loading
de-duplicates). Layout, one file per ingestion chunk, partitioned by ingestion date::

    {history_dir}/date=2026-11-29/sessions-20261129T110501.123Z-3f9a1c.parquet

Columns: ``event_id, user_id, item_id, timestamp`` (epoch ms), ``event_type``. Session items carry no
event id on the wire, so ``event_id`` is derived from ``(user_id, item_id, timestamp)``: the same
event recorded twice (a flow replaying after recovery, an ingestion redone after a crash) gets the
same id, and so does the same event in the base training data.

:func:`load_history` merges the base training data with every recorded event, each once:

>>> import tempfile, pandas as pd
>>> d = Path(tempfile.mkdtemp())
>>> rows = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"],
...                      "timestamp": [1_000, 2_000, 1_500], "event_type": ["view"] * 3})
>>> _ = write_events(rows, d)
>>> _ = write_events(rows.iloc[:1], d)  # recorded again: still one event
>>> base = Interactions.from_frame(pd.DataFrame({"user_id": ["u3", "u1"], "item_id": ["c", "a"],
...                                              "timestamp": [500, 1_000]}))
>>> h = load_history(d, base=base)
>>> len(h), h.users.raw, h.items.raw  # base ids keep their indices; new ones follow
(4, ['u3', 'u1', 'u2'], ['c', 'a', 'b'])
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas.events import SessionClosed
from slsrec.data import Interactions, Vocab
from slsrec.errors import DataError, ServiceError
from slsrec.kafka_check import QUIET, check_kafka
from slsrec.settings import Settings

log = logging.getLogger(__name__)

GROUP_ID = "slsrec-history"  # the history's consumer group: its committed offsets mark what is on disk
COLUMNS = ("event_id", "user_id", "item_id", "timestamp", "event_type")
_SCHEMA = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
                     ("timestamp", pa.int64()), ("event_type", pa.string())])
_LOGGED_BAD = 20  # bad records logged one by one; the rest are counted


def event_ids(frame: pd.DataFrame) -> np.ndarray:
    """Content-derived ids of events: BLAKE2b (8 bytes, hex) of ``user_id, item_id, timestamp``.

    A plain hash of the text, so the ids in files stay valid across library versions.

    >>> event_ids(pd.DataFrame({"user_id": ["u1"], "item_id": ["a"], "timestamp": [1000]})).tolist()
    ['f2cc5e60fb1a6f87']
    """
    keys = zip(frame["user_id"].astype(str), frame["item_id"].astype(str), frame["timestamp"].astype(np.int64))
    return np.array([hashlib.blake2b(f"{u}\x1f{i}\x1f{t}".encode(), digest_size=8).hexdigest() for u, i, t in keys],
                    dtype=object)


def write_events(events: pd.DataFrame, history_dir: str | Path) -> Path:
    """Durably append events (``user_id, item_id, timestamp, event_type``) as one new Parquet file.

    The file is written under a temporary name, flushed to disk, then renamed: a reader sees all of
    it or nothing, and after a crash no half file remains under a ``.parquet`` name.
    """
    now = datetime.now(timezone.utc)
    part = Path(history_dir) / f"date={now:%Y-%m-%d}"
    part.mkdir(parents=True, exist_ok=True)
    path = part / f"sessions-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:6]}.parquet"
    frame = events.assign(event_id=event_ids(events))[list(COLUMNS)]
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(frame, schema=_SCHEMA, preserve_index=False), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def session_rows(s: SessionClosed) -> list[tuple[str, str, int, str]]:
    """One ``(user_id, item_id, timestamp, event_type)`` row per item of a closed session."""
    return [(s.user_id, it.item_id, it.ts, it.event_type) for it in s.items]


@dataclass
class IngestStats:
    """What one :func:`ingest_sessions` call did."""

    records: int = 0  # Kafka records read
    sessions: int = 0  # valid SessionClosed records
    events: int = 0  # rows written
    bad: Counter = field(default_factory=Counter)  # reason -> count of records that could not be used
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        bad = sum(self.bad.values())
        why = f" ({', '.join(f'{r}: {n}' for r, n in self.bad.most_common(3))})" if bad else ""
        return (f"ingested {self.sessions} sessions ({self.events} events) in {len(self.files)} files, "
                f"{bad} bad records{why}, {self.seconds:.1f} s")


def _bad_reason(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def ingest_sessions(settings: Settings, history_dir: str | Path | None = None, *, group_id: str = GROUP_ID,
                    chunk_events: int = 200_000, timeout_s: float = 120.0) -> IngestStats:
    """Append every ``SessionClosed`` not yet ingested by ``group_id`` to the history, then commit.

    Reads each partition of ``settings.topic_sessions`` from the group's committed offset up to the
    end the topic had when the call started (records arriving meanwhile may be included), writes a
    Parquet file every ``chunk_events`` events and at the end, and commits the offsets of what each
    file holds right after it is on disk. Records that are not valid ``SessionClosed`` JSON are
    skipped, counted by reason in the result and logged.

    Raises
    ------
    ServiceError
        Kafka unreachable, the topic missing, or the end not reached within ``timeout_s``.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    history_dir = Path(history_dir if history_dir is not None else settings.history_dir)
    topic, t0, stats = settings.topic_sessions, time.perf_counter(), IngestStats()
    check_kafka(settings)  # a refused password or certificate: one clear line, not a timeout later
    consumer = Consumer(settings.kafka_config() | {"group.id": group_id, "enable.auto.commit": False,
                                                   "auto.offset.reset": "earliest", "logger": QUIET})
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise ServiceError(f"topic {topic!r} does not exist on Kafka at {settings.kafka_bootstrap} "
                                   "(create it with `slsrec local topics`, or start the flow)")
            committed = consumer.committed([TopicPartition(topic, p) for p in sorted(meta.partitions)], timeout=10)
            ends, start = {}, []
            for tp in committed:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
                begin = max(tp.offset, low) if tp.offset >= 0 else low  # retention may have deleted some
                if begin < high:
                    ends[tp.partition] = high
                    start.append(TopicPartition(topic, tp.partition, begin))
        except KafkaException as e:
            raise ServiceError(f"Kafka at {settings.kafka_bootstrap}: {e.args[0].str()}") from None
        if not start:
            stats.seconds = time.perf_counter() - t0
            return stats

        consumer.assign(start)
        rows: list[tuple[str, str, int, str]] = []
        done: dict[int, int] = {}  # partition -> next offset, for what `rows` (or a written file) holds

        def flush() -> None:
            if rows:
                stats.files.append(write_events(pd.DataFrame(rows, columns=list(COLUMNS[1:])), history_dir))
                stats.events += len(rows)
                rows.clear()
            if done:  # also past bad records, so they are not read again
                consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in done.items()], asynchronous=False)

        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise ServiceError(f"topic {topic!r}: end not reached within {timeout_s:.0f} s "
                                   f"(partitions left: {sorted(ends)}); what was read so far is saved")
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                if msg.error() is not None:
                    if msg.error().fatal():
                        raise ServiceError(f"Kafka at {settings.kafka_bootstrap}: {msg.error().str()}")
                    log.warning("topic %s: %s", topic, msg.error().str())
                    continue
                p, offset = msg.partition(), msg.offset()
                stats.records += 1
                done[p] = offset + 1
                if offset + 1 >= ends.get(p, offset + 2):
                    del ends[p]
                try:
                    session = SessionClosed.model_validate_json(msg.value() or b"")
                except ValidationError as e:
                    reason = _bad_reason(e)
                    stats.bad[reason] += 1
                    if sum(stats.bad.values()) <= _LOGGED_BAD:
                        log.warning("topic %s partition %d offset %d: not a SessionClosed (%s); skipped",
                                    topic, p, offset, reason)
                    continue
                stats.sessions += 1
                rows.extend(session_rows(session))
            if len(rows) >= chunk_events:
                flush()
        flush()
    finally:
        consumer.close()
    if stats.bad:
        log.warning("topic %s: skipped %d bad records: %s", topic, sum(stats.bad.values()), dict(stats.bad))
    stats.seconds = time.perf_counter() - t0
    log.info("%s", stats.describe())
    return stats


def read_history(history_dir: str | Path) -> pd.DataFrame:
    """Every recorded event, each ``event_id`` once, in file order (files sort by write time).

    A missing directory is an empty history."""
    files = sorted(Path(history_dir).glob("**/*.parquet"))
    frames = []
    for f in files:
        try:
            frame = pq.read_table(f).to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable Parquet file ({e})") from None
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(f"{f}: missing column {missing[0]!r}; expected {', '.join(COLUMNS)} "
                            "(is this a history file written by slsrec?)")
        frames.append(frame[list(COLUMNS)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "timestamp" else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True).drop_duplicates("event_id", ignore_index=True)


def load_history(history_dir: str | Path, base: Interactions | None = None) -> Interactions:
    """The base training data plus every recorded event, de-duplicated by ``event_id``.

    Ids of ``base`` keep their indices; ids first seen in the recorded sessions follow, in order of
    appearance. A missing directory is an empty history.

    Raises
    ------
    DataError
        Nothing to load (no base and no recorded event), or an unreadable history file.
    """
    recorded = read_history(history_dir)
    if base is None:
        if recorded.empty:
            raise DataError(f"{history_dir}: no recorded sessions (*.parquet); run `slsrec retrain` "
                            "while the flow writes to the sessions topic, or give base data")
        return Interactions.from_frame(recorded)
    base_frame = pd.DataFrame({"user_id": np.array(base.users.raw, dtype=object)[base.user],
                               "item_id": np.array([""] + base.items.raw, dtype=object)[base.item],
                               "timestamp": base.ts})
    recorded = recorded[~recorded["event_id"].isin(set(event_ids(base_frame)))]
    merged = Interactions.from_frame(pd.concat([base_frame, recorded[["user_id", "item_id", "timestamp"]]],
                                               ignore_index=True))
    return reindex(merged, base.users, base.items)


def extend_vocab(vocab: Vocab, raw: Sequence[str]) -> Vocab:
    """``vocab`` followed by the ids of ``raw`` it lacks, in order of appearance.

    >>> extend_vocab(Vocab(["a", "b"], padding=True), ["c", "a", "d", "c"]).raw
    ['a', 'b', 'c', 'd']
    """
    return Vocab(vocab.raw + [r for r in pd.unique(pd.Series(list(raw), dtype=object)) if vocab.index(r) is None],
                 vocab.padding)


def reindex(inter: Interactions, users: Vocab, items: Vocab) -> Interactions:
    """The same events with vocabularies that start with ``users`` / ``items`` (a model's), so the
    model's indices stay valid and new ids get the indices after them."""
    u, i = extend_vocab(users, inter.users.raw), extend_vocab(items, inter.items.raw)
    user_map = np.array([u.index(r) for r in inter.users.raw], dtype=np.int64)
    item_map = np.array([0] + [i.index(r) for r in inter.items.raw], dtype=np.int64)
    return Interactions(user_map[inter.user], item_map[inter.item], inter.ts, u, i)

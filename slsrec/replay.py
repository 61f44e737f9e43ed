"""Replay a recorded clickstream into Kafka: ``slsrec replay FILE --topic clicks``.

Rows become :class:`~schemas.events.ClickEvent` messages, keyed by ``user_id`` and sent in time order
(a stable sort, so equal timestamps keep file order, as in training). Per-user order survives the trip:
one key always lands on one partition, and the idempotent producer never reorders retried batches.

Each row's ``event_id`` is derived from the file name and row number, so replaying a file twice sends
the same ids (consumers can de-duplicate). By default the timestamps are shifted so that the last event
is "now": relative timing, and so session gaps, are kept, and every event passes the flow's check that
``ts`` is not in the future.

>>> import tempfile, pathlib
>>> f = pathlib.Path(tempfile.mkdtemp()) / "clicks.csv"
>>> _ = f.write_text("user_id,item_id,timestamp\\nu1,i1,1700000000000\\nu2,i7,1700000000500\\n")
>>> events = load_events(f, now_ms=1750000000000)
>>> [(e.user_id, e.item_id, e.ts, e.event_type) for e in events]
[('u1', 'i1', 1749999999500, 'click'), ('u2', 'i7', 1750000000000, 'click')]
>>> events[0].event_id == load_events(f)[0].event_id  # same file row, same id
True
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from schemas.events import ClickEvent
from slsrec.data import read_clickstream
from slsrec.errors import DataError, ServiceError, UserError
from slsrec.kafka_check import QUIET, check_kafka
from slsrec.settings import Settings

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "slsrec:replay")
DEFAULT_EVENT_TYPE = "click"  # for files without an event_type column (MovieLens ratings, say)


@dataclass(frozen=True)
class ReplayStats:
    topic: str
    events: int
    seconds: float


def event_id(path: Path, row: int) -> str:
    """Deterministic id of data row ``row`` (1-based) of ``path``, from the file name and the row.

    >>> event_id(Path("data/clicks.csv"), 1) == event_id(Path("/elsewhere/clicks.csv"), 1)
    True
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"{path.name}:{row}"))


def load_events(path: str | Path, *, shift_to_now: bool = True, now_ms: int | None = None,
                limit: int | None = None) -> list[ClickEvent]:
    """Read ``path`` (CSV, Parquet or JSON Lines) as ClickEvents, in replay (time) order.

    ``shift_to_now`` moves every timestamp by one offset so that the last event is at ``now_ms``
    (default: the current time). ``limit`` keeps the first N events in replay order. Bad files and rows
    raise :class:`DataError` naming the file and row.
    """
    path = Path(path)
    df = read_clickstream(path)
    ts = df["timestamp"].to_numpy(np.int64)
    order = np.argsort(ts, kind="stable")[:limit]  # (N,) replay order; per-user order = (ts, file row)
    if shift_to_now:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ts = ts + (now_ms - int(ts.max()))
    users, items = df["user_id"].to_numpy(), df["item_id"].to_numpy()
    kinds = df["event_type"].to_numpy() if "event_type" in df.columns else None
    events = []
    for i in order.tolist():
        try:
            events.append(ClickEvent(event_id=event_id(path, i + 1), user_id=users[i], item_id=items[i],
                                     ts=int(ts[i]), event_type=kinds[i] if kinds is not None else DEFAULT_EVENT_TYPE))
        except ValidationError as e:
            err = e.errors()[0]
            raise DataError(f"{path}: row {i + 1}, column {'.'.join(map(str, err['loc']))!r}: {err['msg']}"
                            f" (value {err['input']!r})") from None
    return events


def replay(path: str | Path, topic: str | None = None, settings: Settings | None = None, *, speed: float | None = 1.0,
           limit: int | None = None, shift_to_now: bool = True, progress: bool = True) -> ReplayStats:
    """Produce the clickstream in ``path`` to ``topic`` (default: the clicks topic), keyed by user_id.

    ``speed`` scales the recorded gaps between events (1.0 = real time, 10 = ten times faster);
    ``None`` sends as fast as possible. Raises :class:`DataError` for a bad file and
    :class:`ServiceError` when Kafka is unreachable, the topic is missing, or a send fails.
    """
    from confluent_kafka import Producer
    from tqdm import tqdm

    if speed is not None and not speed > 0:
        raise UserError(f"--speed must be positive, got {speed}")
    settings = settings or Settings()
    topic = topic or settings.topic_clicks
    events = load_events(path, shift_to_now=shift_to_now, limit=limit)
    if topic not in check_kafka(settings).topics:
        raise ServiceError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap} "
                           "(create it with `slsrec local up` or `slsrec local topics`)")
    producer = Producer({
        **settings.kafka_config(),
        "logger": QUIET,  # a failed send is reported once, below
        "enable.idempotence": True,  # retries never reorder or duplicate within a partition
        "partitioner": "murmur2_random",  # the Java clients' partitioner: same key, same partition
        "linger.ms": 5,
        "message.timeout.ms": 30000,  # surface a dead broker in seconds, not the default 5 minutes
    })
    failures: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            failures.append(err.str())

    t0 = time.monotonic()
    first_ts = events[0].ts if events else 0
    for e in tqdm(events, unit="ev", desc=f"replay -> {topic}", disable=not progress):
        if speed is not None:  # wait for this event's time, serving delivery reports meanwhile
            due = t0 + (e.ts - first_ts) / 1000 / speed
            while (wait := due - time.monotonic()) > 0:
                producer.poll(wait)
        while True:
            try:
                producer.produce(topic, key=e.user_id.encode(), value=e.model_dump_json().encode(),
                                 on_delivery=delivered)
                break
            except BufferError:  # local queue full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if failures or left:
        raise ServiceError(f"{len(failures) + left} of {len(events)} events were not delivered to {topic!r}"
                           + (f": {failures[0]}" if failures else ""))
    return ReplayStats(topic, len(events), time.monotonic() - t0)

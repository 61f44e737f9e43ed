"""The flow's Kafka source: every partition of ``clicks``, one poll per dataflow item.

Built on Bytewax's public source API: a :class:`FixedPartitionedSource` with one
:class:`StatefulSourcePartition` per Kafka partition, each owning a confluent-kafka consumer assigned
to it. The resume state is the next offset to read, snapshotted with the shards' sessions, so a
restart reads again what the last snapshot had not covered (at least once).

Why not Bytewax's ``KafkaSource``: it hands downstream one item per message, and its
``consume(n, 1 ms)`` waits out the whole timeout unless ``n`` messages are ready (librdkafka), so under
a live stream every poll blocked 1-2 ms. Here ``next_batch`` returns at once what is already fetched,
as ONE item (the list of a poll's records); Bytewax waits 1 ms after an empty poll by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from slsrec.errors import ServiceError

POLL_MAX = 1000  # records per poll at most: one item of the dataflow


class Record(NamedTuple):
    """One Kafka message as the flow reads it; ``error`` is the consumer's error, if any."""

    value: bytes | None
    topic: str
    partition: int | None
    offset: int | None
    error: str | None = None


class KafkaPartition(StatefulSourcePartition[list[Record], int]):
    """One Kafka partition: each ``next_batch`` is one non-blocking poll, as one item."""

    def __init__(self, config: dict, topic: str, partition: int, offset: int, tail: bool,
                 on_poll: Callable[[], None] | None = None):
        self._on_poll = on_poll
        self._consumer = Consumer({**config, "enable.partition.eof": not tail})
        self._consumer.assign([TopicPartition(topic, partition, offset)])
        self._offset = offset
        self._eof = False

    def next_batch(self) -> list[list[Record]]:
        if self._eof:
            raise StopIteration
        if self._on_poll is not None:
            self._on_poll()
        batch = []
        for m in self._consumer.consume(POLL_MAX, 0):
            err = m.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                self._eof = True  # the end of a bounded run: emit this poll, stop at the next
                break
            # An error without a message has no real position (librdkafka's negative sentinels).
            part, offset = m.partition(), m.offset()
            part, offset = (part if part is not None and part >= 0 else None), (
                offset if offset is not None and offset >= 0 else None)
            batch.append(Record(m.value(), m.topic() or "", part, offset, None if err is None else f"kafka: {err.str()}"))
            if offset is not None:
                self._offset = offset + 1  # resume after it
        return [batch] if batch else []

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class KafkaBatchSource(FixedPartitionedSource[list[Record], int]):
    """Every partition of ``topics``, read from the start (or the resume offsets).

    ``tail=False`` stops at the end of each partition (a backfill, a benchmark, a bounded test).
    ``on_poll`` is called at every poll: the worker's heartbeat. Bytewax polls its inputs whenever the
    worker is free, so the calls stop exactly when the worker is stuck. (A second, timer-driven input
    for the heartbeat made the worker run the Kafka input in 1-3 s bursts.)
    """

    def __init__(self, config: dict, topics: list[str], tail: bool = True, on_poll: Callable[[], None] | None = None):
        self.on_poll = on_poll
        self.config = {**config, "group.id": "slsrec-flow", "enable.auto.commit": False}  # offsets: in snapshots
        self.topics = topics
        self.tail = tail

    def list_parts(self) -> list[str]:
        parts = []
        admin = AdminClient({k: v for k, v in self.config.items() if k not in ("group.id", "enable.auto.commit")})
        for topic in self.topics:  # one by one: a broker with auto-create creates each
            meta = admin.list_topics(topic, timeout=30).topics[topic]
            if meta.error is not None:
                raise ServiceError(f"cannot list the partitions of topic {topic!r}: {meta.error.str()}")
            parts += [f"{p}-{topic}" for p in meta.partitions]
        return parts

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> KafkaPartition:
        partition, topic = for_part.split("-", 1)
        if topic not in self.topics:
            raise ServiceError(f"the recovery snapshots read topic {topic!r}, not {self.topics}: "
                               "give this flow its own recovery directory")
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        return KafkaPartition(self.config, topic, int(partition), offset, self.tail, self.on_poll)

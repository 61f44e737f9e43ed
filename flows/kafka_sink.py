"""The flow's Kafka sink: one dataflow item is a batch of messages, for any of the output topics."""

from __future__ import annotations

from typing import NamedTuple

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer


class Message(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes


class _ProducerPartition(StatelessSinkPartition[list[Message]]):
    def __init__(self, config: dict):
        self._producer = Producer(config)

    def write_batch(self, items: list[list[Message]]) -> None:
        produce, poll = self._producer.produce, self._producer.poll
        for batch in items:
            for m in batch:
                produce(m.topic, m.value, m.key)
            poll(0)
        # Delivered before the epoch may close: a resume never skips an output (at least once).
        self._producer.flush()

    def close(self) -> None:
        self._producer.flush()


class KafkaBatchSink(DynamicSink[list[Message]]):
    """One producer per worker; each item is a list of :class:`Message` (topic, key, value)."""

    def __init__(self, config: dict):
        self.config = config

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducerPartition:
        return _ProducerPartition(self.config)

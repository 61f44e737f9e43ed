"""The flow's Kafka sink: one dataflow item is a batch of messages, for any of the output topics.

Every message carries the header ``slsrec-worker``: the index of the Bytewax worker that wrote it,
which is the worker whose shard made it (outputs never leave their worker), so a consumer sees which
worker served a user.
"""

from __future__ import annotations

from typing import NamedTuple

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer


WORKER_HEADER = "slsrec-worker"


class Message(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes


class _ProducerPartition(StatelessSinkPartition[list[Message]]):
    def __init__(self, config: dict, worker_index: int):
        self._producer = Producer(config)
        self._headers = [(WORKER_HEADER, str(worker_index).encode())]

    def write_batch(self, items: list[list[Message]]) -> None:
        produce, poll, headers = self._producer.produce, self._producer.poll, self._headers
        for batch in items:
            for m in batch:
                while True:
                    try:
                        produce(m.topic, m.value, m.key, headers=headers)
                        break
                    except BufferError:  # the local queue is full (a broker away): wait, never drop
                        poll(1)
            poll(0)
        # Delivered before the epoch may close: a resume never skips an output (at least once).
        self._producer.flush()

    def close(self) -> None:
        self._producer.flush()


class KafkaBatchSink(DynamicSink[list[Message]]):
    """One producer per worker; each item is a list of :class:`Message` (topic, key, value)."""

    def __init__(self, config: dict):
        # A broker away for longer than librdkafka's default message timeout (5 min) would drop outputs
        # silently: wait for it instead (0 = no limit; the write blocks the worker meanwhile).
        # Idempotence: a batch retried after a broker restart is not written twice.
        self.config = {**config, "message.timeout.ms": "0", "enable.idempotence": "true"}

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducerPartition:
        return _ProducerPartition(self.config, worker_index)

"""The flow's Kafka sink: one dataflow item is a batch of messages, for any of the output topics.

One partition of the sink per worker, named by the worker's shard key, so that a shard's outputs are
written by the worker that made them (no exchange). Every message carries the header
``slsrec-worker``: the index of that worker, so a consumer sees which worker served a user.

Writes do not wait for the broker. The producer is flushed once per epoch instead, in
:meth:`_ProducerPartition.snapshot`, which Bytewax calls at the end of every epoch in which the
partition wrote, before that epoch's recovery snapshot can commit: a resume never skips an output
(at least once), and the worker no longer idles for a broker round trip after every batch.
"""

from __future__ import annotations

from typing import NamedTuple

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import Producer


WORKER_HEADER = "slsrec-worker"


class Message(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes


class _ProducerPartition(StatefulSinkPartition[list[Message], None]):
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

    def snapshot(self) -> None:
        # The end of an epoch: everything written in it is delivered before its snapshot commits.
        self._producer.flush()

    def close(self) -> None:
        self._producer.flush()


class KafkaBatchSink(FixedPartitionedSink[list[Message], None]):
    """One producer per worker; items are ``(shard key, [Message(topic, key, value), ...])``.

    ``keys``: the shard key of every worker of the cluster (:func:`flows.shards.shard_keys`);
    ``worker``: this process's worker (one worker per process, as :mod:`flows.cluster` runs them).
    """

    def __init__(self, config: dict, keys: list[str], worker: int):
        # A broker away for longer than librdkafka's default message timeout (5 min) would drop outputs
        # silently: wait for it instead (0 = no limit; the write blocks the worker meanwhile).
        # Idempotence: a batch retried after a broker restart is not written twice.
        # linger.ms 1 (librdkafka's default is 5): writes no longer flush, so linger is latency.
        self.config = {**config, "message.timeout.ms": "0", "enable.idempotence": "true", "linger.ms": "1"}
        self.keys, self.worker = keys, worker
        self._order = sorted(keys)  # Bytewax indexes `part_fn` into the sorted partitions of all workers

    def list_parts(self) -> list[str]:
        return [self.keys[self.worker]]

    def part_fn(self, item_key: str) -> int:
        return self._order.index(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _ProducerPartition:
        return _ProducerPartition(self.config, self.keys.index(for_part))

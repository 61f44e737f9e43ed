"""The flow's Kafka source: every partition of ``clicks``, and what its errors become."""

from __future__ import annotations

from collections.abc import Callable

from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.inputs import StatefulSourcePartition

from schemas.events import DeadLetter
from slsrec.serving.recommender import Origin, dead_letter


def origin_of(msg: KafkaSourceMessage) -> Origin:
    return Origin(msg.value or b"", msg.topic or "", msg.partition, msg.offset)


class _NoWait:
    """A consumer whose ``consume`` returns what is already fetched instead of blocking.

    librdkafka's ``consume(n, timeout)`` waits out the whole timeout unless ``n`` messages are
    ready, and Bytewax's Kafka partition asks for 1,000 with a 1 ms timeout: under a live stream
    every poll blocked 1-2 ms and the worker polled several times before each micro-batch
    (bench-stream: about 15 ms of every 40 ms cycle). Bytewax itself waits 1 ms after an empty batch.
    """

    def __init__(self, consumer, on_poll: Callable[[], None] | None = None):
        self._consumer = consumer
        self._on_poll = on_poll

    def consume(self, num_messages: int, timeout: float):
        if self._on_poll is not None:
            self._on_poll()
        return self._consumer.consume(num_messages, 0)

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)


class NoWaitKafkaSource(KafkaSource):
    """Bytewax's ``KafkaSource`` whose partitions poll without blocking (see :class:`_NoWait`).

    ``on_poll`` is called at every poll: the worker's heartbeat. Bytewax polls its inputs whenever the
    worker is free, so the calls stop exactly when the worker is stuck. (A second, timer-driven input
    for the heartbeat, a ``SimplePollingSource``, made the worker run the Kafka input in 1-3 s bursts.)
    """

    def __init__(self, *args, on_poll: Callable[[], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_poll = on_poll

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> StatefulSourcePartition:
        part = super().build_part(step_id, for_part, resume_state)
        part._consumer = _NoWait(part._consumer, self.on_poll)  # bytewax 0.21's partition keeps its consumer here
        return part


def is_message(item: KafkaSourceMessage | KafkaError) -> bool:
    return isinstance(item, KafkaSourceMessage)


def consumer_error(err: KafkaError) -> DeadLetter:
    """A Kafka consumer error (its message attached) as a dead letter."""
    return dead_letter(origin_of(err.msg), f"kafka: {err.err.str()}")

"""The recommendation dataflow: Kafka ``clicks`` -> sessions + model -> ``recommendations``.

Wiring only; the logic lives in :mod:`slsrec.serving`. Run it with ``slsrec serve``
(:mod:`flows.cluster`); the source is :mod:`flows.kafka_source`, the stateful step :mod:`flows.shards`.

Steps: ``clicks`` (every partition) -> decode and validate (bad input -> ``clicks.dlq``) -> key by
a hash of the user id into shards -> one stateful step per shard holding its users' sessions, fed in
micro-batches (one batched model call per wave, see :class:`slsrec.serving.recommender.Recommender`), with a
sweep that closes idle sessions -> ``recommendations`` (key user_id), ``sessions``, ``clicks.dlq``,
and ``drift`` (a :class:`schemas.drift.DriftAlert` when a worker's River detector fires, a
:class:`schemas.drift.HealthEvent` when it enters or leaves degraded mode; key worker id).

**Versions.** Without ``--run`` the flow follows the published versions: when ``slsrec:current``
moves to a newer version, its model loads in the background and then replaces the served one
between two micro-batches, together with the long-term vectors; the open sessions are re-encoded by
the new model from the item ids they hold, each at its user's next event
(:meth:`slsrec.serving.recommender.Recommender.reencode`).

**Delivery is at-least-once.** With recovery on (``slsrec serve`` default), Bytewax snapshots the
input offsets and every shard's sessions to SQLite under ``settings.recovery_dir`` every
``settings.snapshot_interval_s``. A restart resumes from the last snapshot, so the events after it
are processed again: their recommendations (and a session closed in that window) may be produced
twice. Every recommendation names its causing ``event_id``; consumers de-duplicate on it.

**Scaling**: see :mod:`flows.cluster`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import partial

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.kafka_source import NoWaitKafkaSource, consumer_error, is_message, origin_of
from flows.shards import Decoded, Output, ShardLogic, shard_keys, shard_of
from schemas.drift import DriftAlert, HealthEvent
from schemas.events import DeadLetter, InvalidEvent, Recommendation, SessionClosed, decode_click
from slsrec.serving.recommender import Recommender, dead_letter
from slsrec.health import Heartbeat
from slsrec.settings import Settings
from slsrec.telemetry import Telemetry


def decode(msg: KafkaSourceMessage) -> Decoded | DeadLetter:
    """Validate one record against the ``ClickEvent`` contract; anything invalid is a dead letter."""
    origin = origin_of(msg)
    try:
        return decode_click(msg.value), origin
    except InvalidEvent as e:
        return dead_letter(origin, e.reason)


def count_event(telemetry: Telemetry, step_id: str, item: KafkaSourceMessage) -> None:
    telemetry.events_in.add(1)


def count_dead_letter(telemetry: Telemetry, step_id: str, item: DeadLetter) -> None:
    # The reason's kind ("missing field", "payload too large") keeps the metric's cardinality bounded.
    telemetry.dead_letters.add(1, {"reason": re.split(r"[:(]", item.reason)[0].strip()})


def is_click(item: Decoded | DeadLetter) -> bool:
    return not isinstance(item, DeadLetter)


def is_recommendation(item: Output) -> bool:
    return isinstance(item, Recommendation)


def is_session(item: Output) -> bool:
    return isinstance(item, SessionClosed)


def is_drift_alert(item: DeadLetter | DriftAlert | HealthEvent) -> bool:
    return isinstance(item, (DriftAlert, HealthEvent))


def to_kafka(item: Recommendation | SessionClosed | DeadLetter | DriftAlert) -> KafkaSinkMessage:
    """JSON value; keyed by user_id, a drift alert by worker id (a dead letter keeps no key: its
    user may be unreadable)."""
    if isinstance(item, (DriftAlert, HealthEvent)):
        return KafkaSinkMessage(item.worker_id.encode(), item.model_dump_json().encode())
    key = None if isinstance(item, DeadLetter) else item.user_id.encode()
    return KafkaSinkMessage(key, item.model_dump_json().encode())


def get_flow(
    settings: Settings,
    recommender: Recommender,
    source: Source | None = None,
    sink: Sink | None = None,
    dlq_sink: Sink | None = None,
    sessions_sink: Sink | None = None,
    drift_sink: Sink | None = None,
    sweep: timedelta = timedelta(seconds=1),
    tail: bool = True,
    workers: int = 1,
    telemetry: Telemetry | None = None,
    heartbeat: Heartbeat | None = None,
) -> Dataflow:
    """Build the flow. Tests inject Bytewax testing sources/sinks; by default all ends are Kafka.

    An injected source yields ``KafkaSourceMessage`` (or ``KafkaError``) items like Kafka's; an
    injected sink receives the pydantic records (``Recommendation``, ``DeadLetter``,
    ``SessionClosed``, ``DriftAlert``) instead of serialized Kafka messages. ``tail=False`` stops at the end of
    the topic (a backfill, a benchmark, a bounded test) instead of waiting for new events.
    ``workers`` (of the whole cluster) sets the shards: one per worker, holding the sessions of its
    users; changing it between runs splits the sessions open at the restart (their old shards close
    them when idle).
    ``heartbeat``: beaten at every poll of the Kafka source (at most once a second), so that it stops
    when the worker is stuck (e.g. waiting on a blocked sink), not only when the process dies.
    """
    brokers, conf = [settings.kafka_bootstrap], settings.kafka_config()
    flow = Dataflow("slsrec_recommend")
    source = source or NoWaitKafkaSource(brokers, [settings.topic_clicks], tail=tail, add_config=conf,
                                         raise_on_errors=False,
                                         on_poll=None if heartbeat is None else partial(beat, heartbeat, recommender))
    raw = op.input("clicks_in", flow, source)
    # KafkaSourceMessage | KafkaError
    split = op.branch("split_consumer_errors", raw, is_message)
    # trues: KafkaSourceMessage; falses: KafkaError
    consumer_dlq = op.map("consumer_error_to_dead_letter", split.falses, consumer_error)
    # DeadLetter
    if telemetry is not None:
        op.inspect("count_events_in", split.trues, partial(count_event, telemetry))
    decoded = op.branch("valid", op.map("decode", split.trues, decode), is_click)
    # trues: (ClickEvent, Origin); falses: DeadLetter
    if telemetry is not None:
        op.inspect("count_invalid", op.merge("input_dead_letters", consumer_dlq, decoded.falses),
                   partial(count_dead_letter, telemetry))
    keyed = op.key_on("key_by_shard", decoded.trues, partial(shard_of, shard_keys(workers)))
    # (shard, (ClickEvent, Origin))
    timeout = timedelta(milliseconds=settings.batch_timeout_ms)
    logic = partial(ShardLogic, recommender, settings.batch_size, timeout, sweep)
    shards = op.stateful_batch("sessions_and_recommend", keyed, logic)
    # (shard, Recommendation | DeadLetter | SessionClosed)
    results = op.key_rm("unkey", shards)
    # Recommendation | DeadLetter | SessionClosed | DriftAlert
    recs = op.branch("recommendations", results, is_recommendation)
    # trues: Recommendation; falses: DeadLetter | SessionClosed | DriftAlert
    rest = op.branch("sessions", recs.falses, is_session)
    # trues: SessionClosed; falses: DeadLetter (duplicates) | DriftAlert
    alerts = op.branch("drift_alerts", rest.falses, is_drift_alert)
    # trues: DriftAlert | HealthEvent; falses: DeadLetter (duplicates)
    dlq = op.merge("dead_letters", consumer_dlq, decoded.falses, alerts.falses)
    # DeadLetter
    for name, stream, given, topic in (
        ("recommendations_out", recs.trues, sink, settings.topic_recommendations),
        ("sessions_out", rest.trues, sessions_sink, settings.topic_sessions),
        ("dlq_out", dlq, dlq_sink, settings.topic_dlq),
        ("drift_out", alerts.trues, drift_sink, settings.topic_drift),
    ):
        if given is not None:
            op.output(name, stream, given)
        else:
            # A broker away for longer than librdkafka's default message timeout (5 min) would drop
            # outputs silently: wait for it instead (0 = no limit; the write blocks the worker meanwhile).
            # Idempotence: a batch retried after a broker restart is not written twice.
            sink_conf = {**conf, "message.timeout.ms": "0", "enable.idempotence": "true"}
            op.output(name, op.map(f"{name}_serialize", stream, to_kafka), KafkaSink(brokers, topic, sink_conf))
            # KafkaSinkMessage(user_id, JSON)
    return flow


def beat(heartbeat: Heartbeat, rec: Recommender) -> None:
    heartbeat.beat("degraded" if rec.degraded else "serving")

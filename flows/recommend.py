"""The recommendation dataflow: Kafka ``clicks`` -> sessions + model -> ``recommendations``.

Wiring only; the logic lives in :mod:`slsrec.serving`. Run it with ``slsrec serve``
(:mod:`flows.cluster`); the source is :mod:`flows.kafka_source`, the stateful step :mod:`flows.shards`.

Batches are the unit of work: an item is everything one poll of a partition returned. Steps:
``clicks`` (every partition, one item per poll) -> decode and validate the batch (bad input ->
``clicks.dlq``) -> split it into one sub-batch per shard (a hash of the user id) -> one stateful step
per shard holding its users' sessions, processed in micro-batches (one batched model call per wave,
see :class:`slsrec.serving.recommender.Recommender`), with a sweep that closes idle sessions ->
serialised once per batch -> ``recommendations`` (key user_id), ``sessions``, ``clicks.dlq`` and
``drift`` (a :class:`schemas.drift.DriftAlert` when a worker's River detector fires, a
:class:`schemas.drift.HealthEvent` when it enters or leaves degraded mode; key worker id),
one producer for all four.

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
from typing import NamedTuple

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from flows.kafka_sink import KafkaBatchSink, Message
from flows.kafka_source import KafkaBatchSource, Record
from flows.shards import Decoded, ShardLogic, shard_keys, split_by_shard
from schemas.drift import DriftAlert, HealthEvent
from schemas.events import DeadLetter, SessionClosed
from slsrec.codec import Recommendation, decode_clicks, encode_many
from slsrec.health import Heartbeat
from slsrec.serving.recommender import Origin, Output, Recommender, dead_letter
from slsrec.settings import Settings
from slsrec.telemetry import Telemetry


class DecodedPoll(NamedTuple):
    """One poll, decoded: the valid clicks with their origins, and the dead letters."""

    clicks: list[Decoded]
    dead: list[DeadLetter]


def decode(records: list[Record]) -> DecodedPoll:
    """Validate a poll's records against the ``ClickEvent`` contract; anything invalid (consumer
    errors included) is a dead letter with the contract's reason."""
    origins = [Origin(r.value or b"", r.topic, r.partition, r.offset) for r in records]
    ok = [n for n, r in enumerate(records) if r.error is None]
    clicks, bad = decode_clicks([records[n].value for n in ok])
    dead = {n: dead_letter(origins[n], r.error) for n, r in enumerate(records) if r.error is not None}
    dead.update((ok[k], dead_letter(origins[ok[k]], reason)) for k, reason in bad)
    return DecodedPoll([(c, origins[ok[k]]) for k, c in clicks], [dead[n] for n in sorted(dead)])


def clicks_of(batch: DecodedPoll) -> list[Decoded]:
    return batch.clicks


def dead_letters_of(batch: DecodedPoll) -> list[DeadLetter] | None:
    return batch.dead or None


def count_events(telemetry: Telemetry, step_id: str, records: list[Record]) -> None:
    telemetry.events_in.add(len(records))


def count_dead_letters(telemetry: Telemetry, step_id: str, dead: list[DeadLetter]) -> None:
    for d in dead:  # the reason's kind ("missing field", "payload too large") keeps the cardinality bounded
        telemetry.dead_letters.add(1, {"reason": re.split(r"[:(]", d.reason)[0].strip()})


def to_messages(settings: Settings, outputs: list[Output]) -> list[Message]:
    """Serialise a batch of outputs: JSON values, keyed by user_id; a drift alert by worker id, a dead
    letter without a key (its user may be unreadable). The recommendations, nearly every output, are
    encoded in one call."""
    values = iter(encode_many([o for o in outputs if type(o) is Recommendation]))
    out = []
    for o in outputs:
        if type(o) is Recommendation:
            out.append(Message(settings.topic_recommendations, o.user_id.encode(), next(values)))
        elif isinstance(o, DeadLetter):
            out.append(Message(settings.topic_dlq, None, o.model_dump_json().encode()))
        elif isinstance(o, SessionClosed):
            out.append(Message(settings.topic_sessions, o.user_id.encode(), o.model_dump_json().encode()))
        elif isinstance(o, (DriftAlert, HealthEvent)):
            out.append(Message(settings.topic_drift, o.worker_id.encode(), o.model_dump_json().encode()))
    return out


def get_flow(
    settings: Settings,
    recommender: Recommender,
    source: Source | None = None,
    sink: Sink | None = None,
    sweep: timedelta = timedelta(seconds=1),
    tail: bool = True,
    workers: int = 1,
    telemetry: Telemetry | None = None,
    heartbeat: Heartbeat | None = None,
) -> Dataflow:
    """Build the flow. Tests inject Bytewax testing sources/sinks; by default both ends are Kafka.

    An injected source yields lists of :class:`flows.kafka_source.Record` (one poll each); an
    injected sink receives lists of :class:`flows.kafka_sink.Message` (topic, key, JSON value), as the
    Kafka producer would. ``tail=False`` stops at the end of the topic (a backfill, a benchmark, a
    bounded test) instead of waiting for new events. ``workers`` (of the whole cluster) sets the
    shards: one per worker, holding the sessions of its users; changing it between runs splits the
    sessions open at the restart (their old shards close them when idle).
    ``heartbeat``: beaten at every poll of the Kafka source (at most once a second), so that it stops
    when the worker is stuck (e.g. waiting on a blocked sink), not only when the process dies.
    """
    flow = Dataflow("slsrec_recommend")
    on_poll = None if heartbeat is None else partial(beat, heartbeat, recommender)
    source = source or KafkaBatchSource(settings.kafka_config(), [settings.topic_clicks], tail=tail, on_poll=on_poll)
    polls = op.input("clicks_in", flow, source)
    # list[Record]: one poll of one partition
    if telemetry is not None:
        op.inspect("count_events_in", polls, partial(count_events, telemetry))
    decoded = op.map("decode", polls, decode)
    # DecodedPoll(clicks=[(Click, Origin)], dead=[DeadLetter])
    dead_in = op.filter_map("input_dead_letters", decoded, dead_letters_of)
    # list[DeadLetter]
    if telemetry is not None:
        op.inspect("count_invalid", dead_in, partial(count_dead_letters, telemetry))
    keyed = op.flat_map("split_by_shard", op.map("clicks", decoded, clicks_of),
                        partial(split_by_shard, shard_keys(workers)))
    # (shard, [(Click, Origin)])
    timeout = timedelta(milliseconds=settings.batch_timeout_ms)
    logic = partial(ShardLogic, recommender, settings.batch_size, timeout, sweep, settings.recovery_dir / "sessions")
    shards = op.stateful_batch("sessions_and_recommend", keyed, logic)
    # (shard, [Recommendation | DeadLetter | SessionClosed | DriftAlert])
    outputs = op.merge("outputs", op.key_rm("unkey", shards), dead_in)
    # [Recommendation | DeadLetter | SessionClosed | DriftAlert]
    messages = op.map("serialize", outputs, partial(to_messages, settings))
    # [Message(topic, key, JSON)]
    op.output("kafka_out", messages, sink or KafkaBatchSink(settings.kafka_config()))
    return flow


def beat(heartbeat: Heartbeat, rec: Recommender) -> None:
    heartbeat.beat("degraded" if rec.degraded else "serving")

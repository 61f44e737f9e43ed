"""The recommendation dataflow: Kafka ``clicks`` -> sessions + model -> ``recommendations``.

Wiring only; the logic lives in :mod:`slsrec.serving`. Run it with ``slsrec serve``.

Steps: ``clicks`` (every partition) -> decode and validate (bad input -> ``clicks.dlq``) -> key by
a hash of the user id into shards -> one stateful step per shard holding its users' sessions, fed in
micro-batches (one batched model call per wave, see :class:`slsrec.serving.Recommender`), with a
sweep that closes idle sessions -> ``recommendations`` (key user_id), ``sessions``, ``clicks.dlq``,
and ``drift`` (a :class:`schemas.drift.DriftAlert` when a worker's River detector fires, key worker id).

**Versions.** Without ``--run`` the flow follows the published versions: when ``slsrec:current``
moves to a newer version, its model loads in the background and then replaces the served one
between two micro-batches, together with the long-term vectors; the open sessions are re-encoded by
the new model from the item ids they hold, each at its user's next event
(:meth:`slsrec.serving.Recommender.reencode`).

**Delivery is at-least-once.** With recovery on (``slsrec serve`` default), Bytewax snapshots the
input offsets and every shard's sessions to SQLite under ``settings.recovery_dir`` every
``settings.snapshot_interval_s``. A restart resumes from the last snapshot, so the events after it
are processed again: their recommendations (and a session closed in that window) may be produced
twice. Every recommendation names its causing ``event_id``; consumers de-duplicate on it.

**Scaling.** Kafka partitions of ``clicks`` are the unit of parallelism; workers split them. On one
machine ``slsrec serve --processes N`` starts N worker processes (Bytewax's ``-i/-a`` cluster mode on
127.0.0.1:2101...). Across machines run one process per machine with the same address list, e.g.
``slsrec serve --process-id 0 --addresses "hostA:2101;hostB:2101"`` on hostA and ``--process-id 1``
on hostB. Every process needs Kafka and Redis, the run directory (or nothing: the published version's
model files come from Redis), and the same ``recovery_dir`` (shared storage; its SQLite partitions,
one per process, are created on the first start). Give ``clicks`` at least as many partitions as
workers in total; users are sharded over the workers by a hash of their id. Restart all
processes together; changing the worker count re-shards users (their open sessions split once).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import re
import subprocess
import sys
import time
import zlib
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage
from bytewax.inputs import StatefulSourcePartition
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from bytewax.testing import TestingSource  # the source of the shard-key probe

from schemas.drift import DriftAlert
from schemas.events import ClickEvent, DeadLetter, InvalidEvent, Recommendation, SessionClosed, decode_click
from slsrec.errors import CheckpointError, ServiceError
from slsrec.serving import Origin, Recommender, SessionTable, dead_letter, open_recommender
from slsrec.settings import Settings
from slsrec.telemetry import Telemetry, setup_telemetry

log = logging.getLogger(__name__)

Decoded = tuple[ClickEvent, Origin]
Output = Recommendation | DeadLetter | SessionClosed | DriftAlert


def origin_of(msg: KafkaSourceMessage) -> Origin:
    return Origin(msg.value or b"", msg.topic or "", msg.partition, msg.offset)


class _NoWait:
    """A consumer whose ``consume`` returns what is already fetched instead of blocking.

    librdkafka's ``consume(n, timeout)`` waits out the whole timeout unless ``n`` messages are
    ready, and Bytewax's Kafka partition asks for 1,000 with a 1 ms timeout: under a live stream
    every poll blocked 1-2 ms and the worker polled several times before each micro-batch
    (bench-stream: about 15 ms of every 40 ms cycle). Bytewax itself waits 1 ms after an empty batch.
    """

    def __init__(self, consumer):
        self._consumer = consumer

    def consume(self, num_messages: int, timeout: float):
        return self._consumer.consume(num_messages, 0)

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)


class NoWaitKafkaSource(KafkaSource):
    """Bytewax's ``KafkaSource`` whose partitions poll without blocking (see :class:`_NoWait`)."""

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> StatefulSourcePartition:
        part = super().build_part(step_id, for_part, resume_state)
        part._consumer = _NoWait(part._consumer)  # bytewax 0.21's partition keeps its consumer here
        return part


def is_message(item: KafkaSourceMessage | KafkaError) -> bool:
    return isinstance(item, KafkaSourceMessage)


def consumer_error(err: KafkaError) -> DeadLetter:
    """A Kafka consumer error (its message attached) as a dead letter."""
    return dead_letter(origin_of(err.msg), f"kafka: {err.err.str()}")


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


def shard_keys(workers: int) -> list[str]:
    """One key per worker, such that Bytewax routes key ``i`` to worker ``i``.

    Bytewax sends a key to the worker its hash picks; with a few arbitrary keys some workers get
    none (keys "0".."3" all land on one of 2 workers). A tiny local flow with the same worker count
    shows where candidate keys go (milliseconds), so that each worker owns exactly one shard and
    batches across all of its users.
    """
    if workers == 1:
        return ["0"]
    owner: dict[int, str] = {}

    def record(step_id: str, item: tuple[str, str], epoch: int, worker: int) -> None:
        owner.setdefault(worker, item[0])

    probe = Dataflow("shard_probe")
    keys = op.key_on("key", op.input("candidates", probe, TestingSource([str(i) for i in range(64 * workers)])), str)
    op.inspect_debug("owner", op.stateful_map("route", keys, keep_state), record)
    cli_main(probe, workers_per_process=workers)
    if len(owner) < workers:
        raise ServiceError(f"could not find a shard key for each of {workers} workers")
    return [owner[w] for w in range(workers)]


def keep_state(state: None, value: str) -> tuple[None, str]:
    return state, value


def shard_of(keys: list[str], item: Decoded) -> str:
    """The shard of the event's user, by a stable hash: all of a user's events, in order."""
    return keys[zlib.crc32(item[0].user_id.encode()) % len(keys)]


class ShardLogic(StatefulBatchLogic):
    """The open sessions of one shard, fed in micro-batches of up to ``batch_size`` events.

    A batch starts at least ``batch_timeout_ms`` after the previous one ended, so that a batch
    gathers what arrived meanwhile; events that arrived while the shard was busy have already waited,
    and events after a quiet spell go at once (timing the wait from an event's arrival instead added
    the whole timeout to every cycle: p50 20-25 -> 12 ms at 5,000 events/s). A sweep every ``sweep`` closes
    idle sessions. The snapshot holds the sessions *and* the unprocessed events, because the input
    offsets in the same snapshot are already past them.
    """

    def __init__(self, rec: Recommender, batch_size: int, timeout: timedelta, sweep: timedelta, resume=None):
        self.rec, self.batch_size, self.timeout, self.sweep = rec, batch_size, timeout, sweep
        self.table, self.pending = pickle.loads(resume) if resume is not None else (SessionTable(), [])
        now = datetime.now(timezone.utc)
        self.flushed_at = now - timeout  # when the last batch ended
        self.flush_at = now if self.pending else None
        self.sweep_at = now + sweep

    def on_batch(self, values: list[Decoded]) -> tuple[list[Output], bool]:
        now = datetime.now(timezone.utc)
        if not self.pending:
            self.flush_at = max(now, self.flushed_at + self.timeout)
        if values:
            self.rec.observe([ev for ev, _ in values])  # time moves on arrival, for every shard
        self.pending.extend(values)
        out: list[Output] = []
        while len(self.pending) >= self.batch_size:
            out += self._flush(self.batch_size)
        if self.pending and now >= self.flush_at:
            out += self._flush(len(self.pending))
        return out, self.RETAIN

    def on_notify(self) -> tuple[list[Output], bool]:
        now = datetime.now(timezone.utc)
        if now >= self.sweep_at:
            self.sweep_at = now + self.sweep
            return self._flush_and_sweep(), self.RETAIN
        if self.flush_at is not None and now >= self.flush_at:
            return self._flush(len(self.pending)), self.RETAIN
        return [], self.RETAIN

    def on_eof(self) -> tuple[list[Output], bool]:
        return self._flush_and_sweep(), self.RETAIN

    def _flush_and_sweep(self) -> list[Output]:
        # Pending events first: a session must not close while its next event waits here.
        out = self._flush(len(self.pending))
        self.rec.follow()  # a new version is adopted while the stream is quiet, too
        return out + self.rec.close_idle(self.table)

    def notify_at(self) -> datetime:
        return min(self.sweep_at, self.flush_at) if self.flush_at is not None else self.sweep_at

    def snapshot(self) -> bytes:
        # A frozen copy of the live (mutable) sessions; pickling is much faster than deepcopy.
        t0 = time.perf_counter()
        frozen = pickle.dumps((self.table, self.pending), protocol=pickle.HIGHEST_PROTOCOL)
        self.rec.telemetry.snapshot_duration.record((time.perf_counter() - t0) * 1000)
        self.rec.telemetry.snapshot_size.record(len(frozen))
        return frozen

    def _flush(self, n: int) -> list[Output]:
        batch, self.pending = self.pending[:n], self.pending[n:]
        out = self.rec.process(self.table, batch) if batch else []
        self.flushed_at = datetime.now(timezone.utc)
        self.flush_at = self.flushed_at + self.timeout if self.pending else None
        return out


def is_recommendation(item: Output) -> bool:
    return isinstance(item, Recommendation)


def is_session(item: Output) -> bool:
    return isinstance(item, SessionClosed)


def is_drift_alert(item: DeadLetter | DriftAlert) -> bool:
    return isinstance(item, DriftAlert)


def to_kafka(item: Recommendation | SessionClosed | DeadLetter | DriftAlert) -> KafkaSinkMessage:
    """JSON value; keyed by user_id, a drift alert by worker id (a dead letter keeps no key: its
    user may be unreadable)."""
    if isinstance(item, DriftAlert):
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
) -> Dataflow:
    """Build the flow. Tests inject Bytewax testing sources/sinks; by default all ends are Kafka.

    An injected source yields ``KafkaSourceMessage`` (or ``KafkaError``) items like Kafka's; an
    injected sink receives the pydantic records (``Recommendation``, ``DeadLetter``,
    ``SessionClosed``, ``DriftAlert``) instead of serialized Kafka messages. ``tail=False`` stops at the end of
    the topic (a backfill, a benchmark, a bounded test) instead of waiting for new events.
    ``workers`` (of the whole cluster) sets the shards: one per worker, holding the sessions of its
    users; changing it between runs splits the sessions open at the restart (their old shards close
    them when idle).
    """
    brokers, conf = [settings.kafka_bootstrap], settings.kafka_config()
    flow = Dataflow("slsrec_recommend")
    source = source or NoWaitKafkaSource(brokers, [settings.topic_clicks], tail=tail, add_config=conf,
                                         raise_on_errors=False)
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
    # trues: DriftAlert; falses: DeadLetter (duplicates)
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
            op.output(name, op.map(f"{name}_serialize", stream, to_kafka), KafkaSink(brokers, topic, conf))
            # KafkaSinkMessage(user_id, JSON)
    return flow


def serve(settings: Settings, run: str | Path | None = None, *, processes: int = 1, process_id: int | None = None,
          addresses: list[str] | None = None, recovery: bool = True, tail: bool = True) -> None:
    """Run the flow until stopped: ``processes`` local workers, or one process of a wider cluster.

    Partitions of ``clicks`` are spread over all workers of the cluster. With ``process_id`` and
    ``addresses`` (``host:port`` of every process, the same list everywhere) this process is one
    member of a cluster that may span machines. Recovery snapshots go to ``settings.recovery_dir``.
    """
    if process_id is None and processes > 1:
        addresses = [f"127.0.0.1:{CLUSTER_PORT + i}" for i in range(processes)]
        _run_local_cluster(settings, run, addresses, recovery, tail)
        return
    recovery_config = _recovery(settings, len(addresses or [None])) if recovery else None
    telemetry = setup_telemetry(settings, "slsrec-flow")
    flow = get_flow(settings, open_recommender(settings, run, telemetry, worker_id=str(process_id or 0)), tail=tail,
                    workers=len(addresses or [None]), telemetry=telemetry)
    # The hot path allocates many short-lived objects next to a large, long-lived heap (the model,
    # the sessions): freeze what exists and collect young objects less often. Measured: about 2x
    # events per CPU second (docs/benchmarks.md).
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("serving %s: %s -> %s (process %s of %s)", run or "the published version", settings.topic_clicks,
             settings.topic_recommendations, process_id or 0, len(addresses or [None]))
    try:
        cli_main(flow, process_id=process_id, addresses=addresses, recovery_config=recovery_config,
                 epoch_interval=timedelta(seconds=settings.snapshot_interval_s))
    finally:
        telemetry.shutdown()
        gc.unfreeze()  # serve() may run inside a longer-lived process (tests, the demo)
        gc.set_threshold(*thresholds)


CLUSTER_PORT = 2101  # first port of the local cluster's processes (Bytewax's own default)


def _recovery(settings: Settings, processes: int) -> RecoveryConfig:
    """The recovery config; its SQLite partitions (one per process) are created on the first start.

    The directory belongs to one flow on one set of topics: Bytewax refuses to resume from another.
    A marker file names the session format of its snapshots; snapshots of another format (an older
    slsrec) are refused with a clear error instead of failing inside the flow.
    """
    marker = settings.recovery_dir / "session-format"
    if not any(settings.recovery_dir.glob("*.sqlite3")):
        settings.recovery_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(settings.recovery_dir, processes)
        marker.write_text(f"{SessionTable.FORMAT}\n")
    found = marker.read_text().strip() if marker.exists() else "1 (no marker)"
    if found != str(SessionTable.FORMAT):
        raise CheckpointError(f"{settings.recovery_dir} holds snapshots of session format {found}; this slsrec "
                              f"reads format {SessionTable.FORMAT}. Move the directory away to start without them.")
    return RecoveryConfig(str(settings.recovery_dir))


def _run_local_cluster(settings: Settings, run, addresses: list[str], recovery: bool, tail: bool) -> None:
    """One child process per address, each `slsrec serve --process-id I --addresses ...`."""
    if recovery:
        _recovery(settings, len(addresses))  # before the children start, so that they agree on it
    base = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--addresses", ";".join(addresses)]
    base += (["--run", str(run)] if run else []) + ([] if recovery else ["--no-recovery"])
    base += [] if tail else ["--exit-at-end"]
    env = {**os.environ, **settings.to_env()}
    children = [subprocess.Popen(base + ["--process-id", str(i)], env=env) for i in range(len(addresses))]
    try:
        codes = [c.wait() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
                c.wait(30)
    if any(codes):
        raise ServiceError(f"flow processes exited with {codes}")

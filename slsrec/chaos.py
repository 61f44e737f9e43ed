"""``slsrec chaos``: break the services under a running flow, and count what reached the user.

Each fault runs against a **private** Kafka and Redis (:class:`slsrec.local.PrivatePair`, ports
19092 and 16379 by default, data under ``var/chaos/``): freezing or emptying the shared pair would
break every other test and flow using it. Per fault, on fresh topics and a fresh recovery folder:

1. ``slsrec serve --run R`` starts under the :class:`slsrec.supervise.Supervisor` (the restart
   policy of the systemd unit) and is waited for until ``slsrec health --ready`` would pass;
2. valid click events stream in at ``rate`` per second for ``duration_s``, each with a unique id,
   while the fault is applied in the middle of the stream;
3. the recommendations topic is read until every event has its recommendation or ``drain_s`` passes.

One row per fault: valid events sent (acknowledged by Kafka; those it did not acknowledge within
``drain_s`` of the stream's end are counted apart, as not sent), recommended (distinct event ids), lost,
duplicates (at-least-once after a restart), recommendations made in degraded mode (flagged
``long_term: cached | unavailable``), the longest gap between two recommendations while events were
streaming (by the flow's ``emit_ts``), and whether the flow was up and live at the end.

The run serves a small random SLSRec (it is about availability, not quality), published to the private
Redis; ``redis-empty`` restores it with the same publish call that ``slsrec publish`` makes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slsrec import health, local
from slsrec.settings import Settings
from slsrec.supervise import Supervisor

FAULTS: dict[str, str] = {
    "kill-flow": "kill -9 of the flow every {kill_every_s:g} s (the supervisor restarts it)",
    "redis-frozen": "Redis frozen (SIGSTOP) for {outage_s:g} s",
    "redis-empty": "Redis restarted empty; republished {outage_s:g} s later",
    "kafka-frozen": "Kafka broker frozen (SIGSTOP) for {outage_s:g} s",
    "kafka-restart": "Kafka broker restarted",
    "malformed": "1 malformed message after every 10 valid ones",
}
N_USERS, N_ITEMS = 2_000, 3_000  # the random run's vocabulary; events draw from it
READY_TIMEOUT_S = 180.0  # a cold flow start (torch, the model) on a busy 2-core machine
JUNK = [b"", b"not json", b"{\"event_id\": 1}", b"\xff\xfe\x00", b"[1, 2, 3]", b"{\"user_id\": \"u\x00\"}"]


@dataclass
class Outcome:
    """One row of the chaos table."""

    fault: str
    sent: int = 0  # valid events delivered to Kafka
    unacked: int = 0  # valid events Kafka never acknowledged to the harness (not sent, so not lost)
    recommended: int = 0  # of them, with at least one recommendation
    duplicates: int = 0  # recommendations beyond the first per event
    degraded: int = 0  # recommendations flagged long_term cached or unavailable
    longest_gap_s: float = 0.0
    gap_in_fault_s: float | None = None  # the longest gap while the service was frozen or gone
    flow_up: bool = False
    restarts: int = 0  # of the flow, by the supervisor
    health: list[str] = field(default_factory=list)  # HealthEvent states on the drift topic, in order
    dead_letters: int = 0  # malformed input dead-lettered (Kafka's own errors not counted)
    junk_sent: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - self.recommended


@dataclass
class _Stream:
    """What the producer sent and the consumers saw, filled in by threads."""

    sent: set[str] = field(default_factory=set)  # delivered valid event ids
    unacked: int = 0  # valid events Kafka never acknowledged (not sent, so never counted as lost)
    unacked_why: str = ""  # what the broker's metadata said about the topic then
    junk_sent: int = 0
    recs: dict[str, int] = field(default_factory=dict)  # event id -> recommendations
    emits: list[int] = field(default_factory=list)  # emit_ts of every recommendation
    degraded: int = 0
    dead_letters: int = 0
    health: list[str] = field(default_factory=list)  # HealthEvent states in order
    t0_ms: int = 0
    t1_ms: int = 0  # the streaming window
    fault_ms: tuple[int, int] | None = None  # while the service was frozen or gone


class Chaos:
    """The chaos run: its private services, its model, and one :meth:`run` per fault.

    Parameters
    ----------
    pair
        The private services (never the shared ones).
    duration_s
        How long events stream per fault.
    outage_s
        How long Redis / Kafka stay frozen (and Redis empty).
    rate
        Valid events per second.
    kill_every_s
        The period of ``kill -9`` in ``kill-flow``.
    drain_s
        How long to wait after the stream for the last recommendations.
    """

    def __init__(self, pair: local.PrivatePair, *, duration_s: float = 120.0, outage_s: float = 60.0,
                 rate: float = 500.0, kill_every_s: float = 30.0, drain_s: float = 90.0, base: Settings | None = None):
        self.pair = pair
        self.duration_s = duration_s
        self.outage_s = outage_s
        self.rate = rate
        self.kill_every_s = kill_every_s
        self.drain_s = drain_s
        self.settings = pair.settings(base)
        self.folder = pair.folder
        self.run_dir = self.folder / "run"

    def describe(self, fault: str) -> str:
        return FAULTS[fault].format(kill_every_s=self.kill_every_s, outage_s=self.outage_s)

    def setup(self) -> None:
        """Start the private services and publish a small random run to their Redis."""
        self.pair.up(self.settings)
        if not (self.run_dir / "model.safetensors").exists():
            _random_run(self.run_dir, self.folder / "history.csv")
        self.publish()

    def publish(self) -> str:
        """What ``slsrec publish --run R`` does; returns the version id."""
        from slsrec.publish import publish_run
        from slsrec.store import LongTermStore

        store = LongTermStore(self.settings.redis_url)
        try:
            return publish_run(self.run_dir, store).result.version
        finally:
            store.close()

    def run(self, fault: str) -> Outcome:
        """Stream through one fault; the flow is stopped at the end either way."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: expected one of {', '.join(FAULTS)}")
        out = Outcome(fault)
        stream = _Stream()
        prefix = f"chaos-{fault}-{uuid.uuid4().hex[:6]}."
        stop = threading.Event()  # ends the producer and the readers, also when a fault fails
        with (local.scratch_topics(self.settings, prefix) as topics, self._flow(topics, fault) as (sup, settings),
              _log_to(self.folder / fault / "producer.log") as log):
            producer = threading.Thread(target=self._produce, args=(settings, stream, fault == "malformed", stop, log))
            threads = [producer, *(threading.Thread(target=_read, args=(settings, topic, stream, stop))
                                   for topic in (settings.topic_recommendations, settings.topic_dlq,
                                                 settings.topic_drift))]
            for t in threads:
                t.start()
            try:
                self._apply(fault, sup, producer, out, stream)
                deadline = time.monotonic() + self.drain_s
                while time.monotonic() < deadline and len(stream.recs.keys() & stream.sent) < len(stream.sent):
                    sup.poll()
                    time.sleep(0.2)
                sup.poll()
                ok, line = health.probe(settings.health_dir, settings.health_max_age_s, ready=False)
                out.flow_up = sup.pid is not None and ok
                if not out.flow_up:
                    out.notes.append(f"flow: {line}")
            finally:
                stop.set()
                for t in threads:
                    t.join()
        out.sent, out.unacked = len(stream.sent), stream.unacked
        out.recommended = len(stream.recs.keys() & stream.sent)
        out.duplicates = sum(n - 1 for n in stream.recs.values())
        out.degraded, out.restarts, out.health = stream.degraded, sup.restarts, stream.health
        out.dead_letters, out.junk_sent = stream.dead_letters, stream.junk_sent
        if out.unacked:
            out.notes.append(f"not acknowledged by Kafka {self.drain_s:g} s after the stream: {stream.unacked_why}")
        out.longest_gap_s, at = _longest_gap_s(stream.emits, stream.t0_ms, stream.t1_ms)
        if stream.fault_ms is not None:
            out.gap_in_fault_s = _longest_gap_s(stream.emits, *stream.fault_ms)[0]
        out.notes.append(f"longest gap from t={at:.1f} s")
        if out.restarts:
            out.notes.append(f"{out.restarts} restart(s)")
        if fault == "malformed":
            out.notes.append(f"{out.dead_letters} of {out.junk_sent} malformed dead-lettered")
        if out.health:
            out.notes.append("health: " + " -> ".join(out.health))
        return out

    @contextmanager
    def _flow(self, settings: Settings, fault: str) -> Iterator[tuple[Supervisor, Settings]]:
        """The flow on ``settings``' topics, under a supervisor, ready; and its settings."""
        work = self.folder / fault
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        settings = settings.model_copy(update={"recovery_dir": work / "recovery", "health_dir": work / "health",
                                                "snapshot_interval_s": 2.0})
        env = {**os.environ, **settings.to_env()}
        argv = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--run", str(self.run_dir)]
        sup = Supervisor(argv, env=env, log_path=work / "flow.log", restart_s=0.5, stop_timeout_s=20.0)
        sup.start()
        try:
            _wait_ready(sup, settings, work / "flow.log")
            yield sup, settings
        finally:
            sup.stop()

    def _produce(self, settings: Settings, stream: _Stream, malformed: bool, stop: threading.Event,
                 log: logging.Logger) -> None:
        from confluent_kafka import Producer

        # Patient and idempotent, like the flow's sink: it waits for a broker that is away instead of
        # giving up (librdkafka's default: 5 minutes), and its retries after a lost connection never
        # write a click twice (a duplicate click would show up as the flow's duplicate).
        p = Producer({**settings.kafka_config(), "linger.ms": 5, "message.timeout.ms": 900_000,
                      "enable.idempotence": True, "logger": log})
        rng = np.random.default_rng(0)

        def delivered(err, msg) -> None:
            if msg.value() in JUNK:
                return
            if err is None:
                stream.sent.add(json.loads(msg.value())["event_id"])
            else:
                stream.unacked += 1

        stream.t0_ms = int(time.time() * 1000)
        t0, n = time.monotonic(), 0
        while (elapsed := time.monotonic() - t0) < self.duration_s and not stop.is_set():
            for _ in range(int(elapsed * self.rate) + 1 - n):
                user, item = f"u{rng.integers(N_USERS)}", f"i{rng.integers(N_ITEMS)}"
                event_id = f"{settings.topic_clicks}-{n}"
                value = json.dumps({"event_id": event_id, "user_id": user, "item_id": item,
                                    "ts": int(time.time() * 1000), "event_type": "view"}).encode()
                p.produce(settings.topic_clicks, value, key=user.encode(), on_delivery=delivered)
                n += 1
                if malformed and n % 10 == 0:
                    p.produce(settings.topic_clicks, JUNK[n // 10 % len(JUNK)], key=user.encode(),
                              on_delivery=delivered)
                    stream.junk_sent += 1
            p.poll(0)
            time.sleep(0.005)
        stream.t1_ms = int(time.time() * 1000)
        # Bounded: what the broker has not acknowledged by then was never sent (the table says how many);
        # it must neither hang the run nor count as lost by the flow.
        deadline = time.monotonic() + self.drain_s
        while p.flush(1.0) and time.monotonic() < deadline and not stop.is_set():
            pass
        if len(p):
            stream.unacked_why = _why_unacked(p, settings.topic_clicks)
        p.purge()
        p.flush(5.0)  # serves the purged messages' delivery reports: each one counted as unacknowledged

    def _apply(self, fault: str, sup: Supervisor, producer: threading.Thread, out: Outcome, stream: _Stream) -> None:
        """Apply ``fault`` while the producer streams; keep the supervisor polled meanwhile."""
        start = self.duration_s * 0.2
        t0 = time.monotonic()

        def wait_until(t: float) -> None:
            while time.monotonic() - t0 < t:
                sup.poll()
                time.sleep(0.05)

        redis, kafka = self.pair.redis, self.pair.kafka
        if fault == "kill-flow":
            t = self.kill_every_s
            while t < self.duration_s:
                wait_until(t)
                if sup.pid is not None:
                    os.kill(sup.pid, signal.SIGKILL)
                t += self.kill_every_s
        elif fault in ("redis-frozen", "kafka-frozen"):
            svc = redis if fault == "redis-frozen" else kafka
            wait_until(start)
            began = _now_ms()
            self.pair.freeze(svc)
            try:
                wait_until(start + self.outage_s)
            finally:
                self.pair.thaw(svc)
            stream.fault_ms = (began, _now_ms())
        elif fault == "redis-empty":
            wait_until(start)
            began = _now_ms()
            self.pair.restart(redis)
            wait_until(start + self.outage_s)
            out.notes.append(f"republished {self.publish()}")
            stream.fault_ms = (began, _now_ms())
        elif fault == "kafka-restart":
            wait_until(start)
            began = _now_ms()
            self.pair.restart(kafka)
            stream.fault_ms = (began, _now_ms())
        while producer.is_alive():
            sup.poll()
            producer.join(0.1)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _wait_ready(sup: Supervisor, settings: Settings, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if sup.poll() is not None:
            raise RuntimeError(f"the flow exited at start; see {log}")
        if health.probe(settings.health_dir, settings.health_max_age_s, ready=True)[0]:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the flow was not ready within {READY_TIMEOUT_S:.0f} s; see {log}")


def _read(settings: Settings, topic: str, stream: _Stream, stop: threading.Event) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    # Every partition assigned from the start, no consumer group: a broker restart cannot leave this
    # reader waiting on a rebalance, so what it misses the flow really did not write.
    c = Consumer({**settings.kafka_config(), "group.id": f"chaos-{uuid.uuid4().hex[:8]}", "logger": local.QUIET,
                  "enable.auto.commit": False})
    partitions = c.list_topics(topic, timeout=30).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    try:
        while not stop.is_set():
            for m in c.consume(1000, 0.2):
                if m.error() is not None or m.value() is None:
                    continue
                record = json.loads(m.value())
                if topic == settings.topic_recommendations:
                    stream.recs[record["event_id"]] = stream.recs.get(record["event_id"], 0) + 1
                    stream.emits.append(record["emit_ts"])
                    stream.degraded += record.get("long_term", "fresh") != "fresh"
                elif topic == settings.topic_dlq:
                    stream.dead_letters += not record["reason"].startswith("kafka:")
                elif "state" in record:  # a HealthEvent (the drift topic carries DriftAlerts too)
                    stream.health.append(record["state"])
    finally:
        c.close()


@contextmanager
def _log_to(path: Path) -> Iterator[logging.Logger]:
    """A logger that writes to ``path`` only: the load producer's librdkafka lines (broker down, retries),
    kept beside the fault's flow.log so that a producer that stalled can be read after the run."""
    log, handler = logging.getLogger("slsrec.chaos.producer"), logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.propagate = False
    log.addHandler(handler)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        handler.close()


def _why_unacked(p, topic: str) -> str:
    """What the broker says about ``topic`` while ``p`` still holds messages: partitions without a leader
    (the broker refuses writes), or all led (then the producer itself did not get through)."""
    from confluent_kafka import KafkaException

    try:
        partitions = p.list_topics(topic, timeout=5).topics[topic].partitions.values()
    except KafkaException as e:
        return f"no metadata from Kafka ({e.args[0].str()})"
    leaderless = sorted(q.id for q in partitions if q.leader < 0 or q.error is not None)
    return f"partitions without a leader: {leaderless}" if leaderless else "every partition has a leader"


def _longest_gap_s(emits: list[int], t0_ms: int, t1_ms: int) -> tuple[float, float]:
    """The longest time without a recommendation inside the streaming window, and when it began,
    both in seconds (the latter from the window's start).

    >>> _longest_gap_s([1500, 1600, 4000], 1000, 5000)
    (2.4, 0.6)
    """
    inside = sorted(e for e in emits if t0_ms <= e <= t1_ms)
    points = [t0_ms, *inside, t1_ms]
    gap, at = max((b - a, a) for a, b in zip(points, points[1:]))
    return gap / 1000, (at - t0_ms) / 1000


def _random_run(run_dir: Path, history_csv: Path) -> None:
    """A small random SLSRec and a history for its users, so that every user has a long-term vector."""
    import torch

    from slsrec.checkpoint import save_run
    from slsrec.data import Vocab
    from slsrec.model import SLSRec, SLSRecConfig

    rng = np.random.default_rng(0)
    t0 = int(time.time() * 1000) - 86_400_000
    rows = [f"u{u},i{rng.integers(N_ITEMS)},{t0 + 60_000 * k}" for u in range(N_USERS) for k in range(5)]
    history_csv.parent.mkdir(parents=True, exist_ok=True)
    history_csv.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    torch.manual_seed(0)
    model = SLSRec(SLSRecConfig(n_users=N_USERS, n_items=N_ITEMS))
    save_run(run_dir, model, name="slsrec", users=Vocab([f"u{u}" for u in range(N_USERS)], padding=False),
             items=Vocab([f"i{i}" for i in range(N_ITEMS)], padding=True), dataset=str(history_csv))


def table(rows: list[Outcome], describe: Callable[[str], str]) -> str:
    """The chaos table, one row per fault (Markdown, so it pastes into docs/benchmarks.md)."""
    head = ("| fault | valid sent | not acked by Kafka | recommended | lost | duplicates | degraded recs | longest gap "
            "(s) | ... during the fault (s) | flow up at end | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    lines = [f"| {describe(r.fault)} | {r.sent:,} | {r.unacked:,} | {r.recommended:,} | {r.lost:,} | {r.duplicates:,} | "
             f"{r.degraded:,} | {r.longest_gap_s:.2f} | {'-' if r.gap_in_fault_s is None else f'{r.gap_in_fault_s:.2f}'} | "
             f"{'yes' if r.flow_up else 'NO'} | {'; '.join(r.notes)} |" for r in rows]
    return "\n".join([head, *lines])

"""The dataflow with Bytewax's testing source and sinks: exact outputs for good and bad input."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
import torch
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka import KafkaError as ConfluentKafkaError

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from threadpoolctl import threadpool_info

from flows.cluster import _recovery
from flows.kafka_source import Record
from flows.recommend import get_flow
from schemas.events import DeadLetter, Recommendation, SessionClosed
from schemas.drift import DriftAlert
from slsrec.data import Vocab
from slsrec.drift import DriftMonitor
from slsrec.errors import CheckpointError
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.serving import Recommender, SessionTable, compute_threads
from slsrec.settings import Settings
from slsrec.store import LongTerm
from slsrec.telemetry import setup_telemetry

GAP_MS = 30 * 60 * 1000
T0 = 1_700_000_000_000
N_ITEMS = 30


@pytest.fixture(scope="module")
def model() -> SLSRec:
    torch.manual_seed(3)
    return SLSRec(SLSRecConfig(n_users=4, n_items=N_ITEMS, d=16, hidden=16, max_segment=5)).eval()


ITEMS = Vocab([f"i{k}" for k in range(1, N_ITEMS + 1)], padding=True)
VECTORS = {"warm": LongTerm(np.linspace(-1, 1, 16, dtype=np.float32), 0.5, 4)}


def lookup(users):
    return "v7", [VECTORS.get(u) for u in users]


class Topic:
    """Messages as the Kafka source yields them: offsets count per partition."""

    def __init__(self):
        self.messages: list = []
        self.offsets: dict[int, int] = {}

    def send(self, value: bytes | None, partition: int) -> Record:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        msg = Record(value, "clicks", partition, offset)
        self.messages.append(msg)
        return msg

    def click(self, event_id, user, item, ts, partition, **extra) -> Record:
        body = {"event_id": event_id, "user_id": user, "item_id": item, "ts": ts, "event_type": "click", **extra}
        return self.send(json.dumps(body).encode(), partition)


def polls(messages: list, size: int) -> list:
    """The records as the Kafka source hands them on: lists of up to ``size`` (one poll), aborts apart."""
    out, poll = [], []
    for m in messages:
        if isinstance(m, Record) and len(poll) < size:
            poll.append(m)
            continue
        out += [poll] if poll else []
        poll = [m] if isinstance(m, Record) else []
        out += [] if isinstance(m, Record) else [m]
    return out + ([poll] if poll else [])


def run(model, messages, batch_size=64, recovery=None, telemetry=None, drift=None, alerts=None,
        poll=7) -> tuple[list, list, list]:
    """Run the flow over ``messages``; the Kafka messages it writes, read back through the contract:
    (recommendations, dead letters, closed sessions); drift alerts go to ``alerts``."""
    batches: list[list] = []
    # Sessions are snapshotted next to Bytewax's recovery database, as `slsrec serve` does.
    settings = Settings(batch_size=batch_size, batch_timeout_ms=5,
                        **({} if recovery is None else {"recovery_dir": recovery.db_dir}))
    rec = Recommender(model, ITEMS, lookup, model_version="run-a", gap_ms=GAP_MS, max_segment=5, top_k=5,
                      telemetry=telemetry, drift=drift)
    flow = get_flow(settings, rec, source=TestingSource(polls(messages, poll)), sink=TestingSink(batches),
                    telemetry=telemetry)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    contract = {settings.topic_recommendations: Recommendation, settings.topic_dlq: DeadLetter,
                settings.topic_sessions: SessionClosed, settings.topic_drift: DriftAlert}
    read = {topic: [] for topic in contract}
    for m in (m for batch in batches for m in batch):
        record = contract[m.topic].model_validate_json(m.value)
        assert m.key == (None if m.topic == settings.topic_dlq else
                         record.worker_id.encode() if m.topic == settings.topic_drift else record.user_id.encode())
        read[m.topic].append(record)
    (alerts if alerts is not None else []).extend(read[settings.topic_drift])
    return read[settings.topic_recommendations], read[settings.topic_dlq], read[settings.topic_sessions]


def test_every_event_gets_a_recommendation_or_a_dead_letter(model):
    t = Topic()
    good = [t.click(f"e{n}", f"u{n % 3}", f"i{n + 1}", T0 + n * 1000, partition=n % 3) for n in range(9)]
    bad = [
        (t.send(b"{not json", 0), "not JSON"),
        (t.send(b"[1, 2]", 1), "wrong shape: expected a JSON object, got array"),
        (t.send(b'{"event_id": "x", "user_id": "u", "ts": 1700000000000, "event_type": "click"}', 2),
            "missing field: item_id"),
        (t.click("e-typed", "u0", 17, T0, partition=0), "wrong type for item_id: expected string, got number"),
        (t.click("e-type", "u0", "i1", T0, partition=0, event_type="hover"), "unknown event_type: 'hover'"),
        (t.send(b"", 1), "empty payload"),
        (t.send(None, 1), "empty payload"),
        (t.send(b" " * 70_000, 2), "payload too large (70000 bytes > 65536)"),
        (t.click("e-future", "u1", "i1", 4_000_000_000_000, partition=1), "ts in the future"),
        (t.click("e-old", "u1", "i1", 900_000_000_000, partition=1), "ts before 2000-01-01"),
        (t.click("e-ctl", "u\x07", "i1", T0, partition=2), "control characters in user_id"),
    ]
    err = Record(b"?", "clicks", 2, 99, f"kafka: {ConfluentKafkaError(ConfluentKafkaError._MSG_TIMED_OUT).str()}")
    dup = t.click("e4", "u1", "i5", T0 + 4000, partition=1)  # e4 again: the producer retried

    recs, dlq, sessions = run(model, t.messages + [err])

    assert len(recs) + len(dlq) == len(t.messages) + 1  # nothing dropped silently
    assert sorted(r.event_id for r in recs) == sorted(json.loads(m.value)["event_id"] for m in good)
    for user in ("u0", "u1", "u2"):  # per-user order is kept
        assert [r.event_ts for r in recs if r.user_id == user] == sorted(r.event_ts for r in recs if r.user_id == user)
    got = {(d.partition, d.offset): d for d in dlq}
    for msg, reason in bad:
        d = got[(msg.partition, msg.offset)]
        assert d.reason == reason and d.topic == "clicks" and d.raw == (msg.value or b"")
    assert got[(1, dup.offset)].reason == "duplicate" and got[(1, dup.offset)].raw == dup.value
    assert got[(2, 99)].reason.startswith("kafka: ")
    assert sessions == []  # nobody idled past the gap


def test_recommendations_name_their_versions_and_flags(model):
    t = Topic()
    t.click("w1", "warm", "i1", T0, partition=0)
    t.click("c1", "cold", "i2", T0, partition=1)
    t.click("c2", "cold", "sku-from-today", T0 + 10, partition=1)
    recs, dlq, _ = run(model, t.messages)
    by_id = {r.event_id: r for r in recs}
    assert (by_id["w1"].long_term_version, by_id["w1"].cold_start) == ("v7", False) and 0 < by_id["w1"].alpha < 1
    assert (by_id["c1"].long_term_version, by_id["c1"].cold_start, by_id["c1"].alpha) == (None, True, 0.0)
    assert by_id["c2"].unknown_item and not by_id["c1"].unknown_item and dlq == []
    assert all(r.model_version == "run-a" and len(r.items) == 5 for r in recs)
    assert "i2" not in [i.item_id for i in by_id["c2"].items]  # seen in the session


def test_session_gap_emits_session_closed_and_drops_state(model):
    t = Topic()
    t.click("a1", "alice", "i1", T0, partition=0)
    t.click("a2", "alice", "new-sku", T0 + 1000, partition=0)
    t.click("b1", "bob", "i2", T0 + 5000, partition=0)
    t.click("a3", "alice", "i3", T0 + 1000 + GAP_MS + 1, partition=0)  # alice is back: a new session
    t.click("c1", "carol", "i4", T0 + 5000 + GAP_MS + 60_000, partition=0)  # moves the clock past bob's gap
    recs, dlq, sessions = run(model, t.messages)
    closed = {(s.user_id, tuple(i.item_id for i in s.items)) for s in sessions}
    # alice's first session closes when she returns; bob's when the shard's clock passes his gap.
    assert closed == {("alice", ("i1", "new-sku")), ("bob", ("i2",))}
    assert all(s.reason == "gap" for s in sessions) and len(recs) == 5 and dlq == []
    # alice's new session starts from scratch: the same answer as for a first-ever click.
    a3 = next(r for r in recs if r.event_id == "a3")
    fresh = Topic()
    fresh.click("a3", "alice", "i3", T0 + 1000 + GAP_MS + 1, partition=0)
    (want,), _, _ = run(model, fresh.messages)
    assert [i.item_id for i in a3.items] == [i.item_id for i in want.items]


def test_micro_batched_flow_equals_event_by_event(model):
    rng = np.random.default_rng(0)
    t = Topic()
    now, last = T0, {}
    for n in range(200):
        u = int(rng.integers(12))
        now += int(rng.choice([1_000, 60_000, 300_000]))
        # Keep every pause clear of the gap by more than the wall time a run takes, so closing a
        # session cannot depend on when the sweep happens to run.
        while abs(now - last.get(u, -GAP_MS)) - GAP_MS in range(-60_000, 60_001):
            now += 120_000
        last[u] = now
        t.click(f"e{n}", "warm" if u == 0 else f"u{u}", f"i{rng.integers(1, N_ITEMS + 1)}", now, partition=u % 4)
    one, _, s1 = run(model, t.messages, batch_size=1)
    many, _, s2 = run(model, t.messages, batch_size=64)
    assert len(one) == len(many) == 200
    a, b = sorted(one, key=lambda r: r.event_id), sorted(many, key=lambda r: r.event_id)
    for x, y in zip(a, b):
        assert [i.item_id for i in x.items] == [i.item_id for i in y.items]
        np.testing.assert_allclose([i.score for i in x.items], [i.score for i in y.items], atol=1e-5)
    assert sorted((s.user_id, s.start_ts) for s in s1) == sorted((s.user_id, s.start_ts) for s in s2)
    assert len(s1) > 5  # the stream has sessions that closed


def test_resume_after_a_crash_keeps_the_sessions(model, tmp_path):
    """Recovery: a restart continues from the snapshot, with the sessions it had."""
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    t = Topic()
    before = [t.click(f"e{n}", "dana", f"i{n + 1}", T0 + n * 1000, partition=0) for n in range(3)]
    after = [t.click(f"e{n}", "dana", f"i{n + 1}", T0 + n * 1000, partition=0) for n in range(3, 5)]
    source = before + [TestingSource.ABORT()] + after
    first, _, _ = run(model, source, batch_size=1, recovery=recovery)
    second, _, _ = run(model, source, batch_size=1, recovery=recovery)
    assert [r.event_id for r in first] == ["e0", "e1", "e2"]
    assert [r.event_id for r in second] == ["e3", "e4"]
    # The resumed session still excludes what dana saw before the crash.
    uninterrupted, _, _ = run(model, before + after, batch_size=1)
    assert [i.item_id for i in second[-1].items] == [i.item_id for i in uninterrupted[-1].items]
    assert not {"i1", "i2", "i3"} & {i.item_id for i in second[-1].items}


def test_snapshots_are_measured(model, tmp_path):
    init_db_dir(tmp_path, 1)
    reader = InMemoryMetricReader()
    t = Topic()
    for n in range(6):
        t.click(f"e{n}", f"u{n % 2}", f"i{n + 1}", T0 + n * 1000, partition=0)
    run(model, t.messages, batch_size=2, recovery=RecoveryConfig(str(tmp_path)),
        telemetry=setup_telemetry(Settings(), "test-flow", reader=reader))
    points = {m.name: m.data.data_points[0] for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics}
    assert points["slsrec.snapshot.duration"].count == points["slsrec.snapshot.size"].count >= 1
    assert points["slsrec.snapshot.size"].min > 100  # two sessions with their events, not an empty table


def test_snapshots_of_another_session_format_are_refused_before_the_flow_starts(tmp_path):
    settings = Settings(recovery_dir=tmp_path / "recovery")
    _recovery(settings, 1)  # a fresh directory: partitions and the format marker
    _recovery(settings, 1)  # the same format resumes
    (settings.recovery_dir / "session-format").unlink()  # as an older slsrec left it
    with pytest.raises(CheckpointError, match=f"session format 1 .*reads format {SessionTable.FORMAT}"):
        _recovery(settings, 1)


def test_each_cluster_member_makes_only_its_own_recovery_partition(tmp_path):
    """Pods of a StatefulSet keep their partition on their own volume: Bytewax needs every partition
    once in the cluster, so process 1 of 3 makes part-1 (of 3) alone; a local cluster's parent makes all."""
    import sqlite3

    volume = Settings(recovery_dir=tmp_path / "pod-1")
    _recovery(volume, 3, process_id=1)
    _recovery(volume, 3, process_id=1)  # a restart finds it
    assert sorted(p.name for p in volume.recovery_dir.glob("*.sqlite3")) == ["part-1.sqlite3"]
    with sqlite3.connect(volume.recovery_dir / "part-1.sqlite3") as db:
        assert db.execute("SELECT part_index, part_count FROM parts").fetchall() == [(1, 3)]
    shared = Settings(recovery_dir=tmp_path / "shared")
    _recovery(shared, 3)
    assert sorted(p.name for p in shared.recovery_dir.glob("*.sqlite3")) == [f"part-{i}.sqlite3" for i in range(3)]


def new_products_stream(n_events: int, jump_at: int | None, seed: int = 0) -> Topic:
    """Users browsing known items; from ``jump_at`` on, 40% of the clicks are products the model has
    never seen (a catalogue change: the unknown-item rate jumps from 2%)."""
    rng = np.random.default_rng(seed)
    t = Topic()
    for n in range(n_events):
        p_new = 0.4 if jump_at is not None and n >= jump_at else 0.02
        item = f"new-{n}" if rng.random() < p_new else f"i{rng.integers(1, N_ITEMS + 1)}"
        t.click(f"e{n}", f"u{n % 50}", item, T0 + 1000 * n, partition=n % 4)
    return t


def test_drift_alerts_go_to_the_drift_sink_after_a_change_and_never_without_one(model):
    jump_at = 600
    alerts: list[DriftAlert] = []
    recs, _, _ = run(model, new_products_stream(1200, jump_at).messages, drift=DriftMonitor(worker_id="w0"),
                     alerts=alerts)
    assert len(recs) == 1200
    unknown = [a for a in alerts if a.signal == "unknown_item"]
    assert unknown, [a.signal for a in alerts]
    first = unknown[0]
    assert T0 + 1000 * jump_at <= first.ts <= T0 + 1000 * (jump_at + 200)  # within 200 events of the jump
    assert (first.detector, first.worker_id, first.model_version) == ("ADWIN", "w0", "run-a")
    assert first.mean_after > 0.2 > first.mean_before

    quiet: list[DriftAlert] = []
    run(model, new_products_stream(1200, None).messages, drift=DriftMonitor(worker_id="w0"), alerts=quiet)
    assert [a for a in quiet if a.signal == "unknown_item"] == []


def test_telemetry_counts_what_the_flow_did(model):
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(Settings(), "test-flow", reader=reader)
    t = Topic()
    for n in range(5):
        t.click(f"e{n}", "u", f"i{n + 1}", T0 + n, partition=0)
    t.send(b"{oops", 0)
    t.send(b" " * 70_000, 0)
    t.click("e1", "u", "i2", T0 + 1, partition=0)  # duplicate
    stream = new_products_stream(1000, 500, seed=1)  # another 1,000 events, whose items change midway
    alerts: list[DriftAlert] = []
    recs, dlq, _ = run(model, t.messages + stream.messages, telemetry=telemetry, drift=DriftMonitor(), alerts=alerts)
    points = {}
    for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
        for p in m.data.data_points:
            points[(m.name, tuple(sorted(p.attributes.items())))] = getattr(p, "value", getattr(p, "count", None))
    dead = {k[1]: v for k, v in points.items() if k[0] == "slsrec.dead_letters"}
    assert points[("slsrec.events.in", ())] == 1008 == points[("slsrec.recommendations.out", ())] + sum(dead.values())
    assert points[("slsrec.recommendations.out", ())] == len(recs) == 1005
    assert points[("slsrec.latency.e2e", ())] == 1005  # one latency per recommendation
    assert dead == {(("reason", "not JSON"),): 1, (("reason", "payload too large"),): 1, (("reason", "duplicate"),): 1}
    assert sum(dead.values()) == len(dlq)
    assert points[("slsrec.batch.size", ())] >= 1005 / 64  # one batch-size record per micro-batch
    assert points[("slsrec.sessions.active", ())] == 51  # u and the stream's 50 users: all within the gap
    assert alerts and sum(v for k, v in points.items() if k[0] == "slsrec.drift.alerts") == len(alerts)
    assert points[("slsrec.model.version", (("version", "run-a"),))] == 1


@pytest.mark.parametrize("workers", [2, 3])
def test_each_worker_owns_exactly_one_shard(workers):
    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.run import cli_main

    from flows.shards import keep_state, shard_keys

    keys = shard_keys(workers)
    seen: dict[str, int] = {}
    flow = Dataflow("check_routing")
    items = op.key_on("key", op.input("in", flow, TestingSource(keys)), str)
    op.inspect_debug("where", op.stateful_map("state", items, keep_state),
                     lambda step, item, epoch, worker: seen.setdefault(item[0], worker))
    cli_main(flow, workers_per_process=workers)
    assert [seen[k] for k in keys] == list(range(workers))


def test_a_worker_computes_on_the_threads_it_is_given_numpys_blas_included():
    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS is loaded
    before = torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()]
    with compute_threads(1):
        pools = threadpool_info()
        assert torch.get_num_threads() == 1
        assert any(p["internal_api"] == "openblas" for p in pools) and all(p["num_threads"] == 1 for p in pools)
    assert (torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()]) == before

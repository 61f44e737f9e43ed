"""End to end through the real local Kafka and Redis: the flow's answers equal the offline model's."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from confluent_kafka import Consumer

from conftest import assert_equals_offline, ordered_producer
from flows.cluster import serve
from schemas.events import DeadLetter, Recommendation
from slsrec.checkpoint import save_run
from slsrec.data import Interactions, Vocab
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.publish import publish_run
from slsrec.serving import recommend_offline
from slsrec.store import LongTerm, LongTermStore

pytestmark = pytest.mark.integration

N_ITEMS, DAY_MS = 60, 86_400_000
USERS = ["ann", "ben", "cid", "dee", "eve"]


def consume_all(settings, topic: str, n: int, timeout_s: float = 60.0, group: str = "check") -> list:
    c = Consumer({**settings.kafka_config(), "group.id": f"{group}-{topic}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            out.append(m)
    c.close()
    return out


def tiny_published_run(settings, tmp_path, seed: int):
    """A tiny SLSRec run with a published long-term state for every user."""
    torch.manual_seed(seed)
    model = SLSRec(SLSRecConfig(n_users=len(USERS), n_items=N_ITEMS, d=8, hidden=8))
    run = save_run(tmp_path / "tiny", model, name="slsrec", users=Vocab(USERS, padding=False),
                   items=Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True), dataset="in-test")
    LongTermStore(settings.redis_url).publish(None, {u: LongTerm(np.ones(8, np.float32), 0.0, 1) for u in USERS},
                                              meta={"run": str(run)})
    return run


@pytest.mark.redis_cluster
def test_replayed_sessions_equal_the_offline_model(live_settings, tmp_path):
    settings = live_settings.model_copy(update={"recovery_dir": tmp_path / "recovery", "top_k": 8})
    torch.manual_seed(11)
    rng = np.random.default_rng(11)
    model = SLSRec(SLSRecConfig(n_users=len(USERS), n_items=N_ITEMS, d=16, hidden=16, max_segment=6, long_len=10))
    items = Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True)
    run = save_run(tmp_path / "tiny", model, name="slsrec", users=Vocab(USERS, padding=False), items=items,
                   dataset="in-test")

    # History a few days ago for all users but eve (cold start); published like `slsrec publish`.
    now = int(time.time() * 1000)
    history = {u: [(f"sku{k}", now - 3 * DAY_MS + 60_000 * n) for n, k in enumerate(rng.integers(1, N_ITEMS + 1, 15))]
               for u in USERS[:-1]}
    frame = pd.DataFrame([(u, i, t) for u, h in history.items() for i, t in h],
                         columns=["user_id", "item_id", "timestamp"])
    store = LongTermStore(settings.redis_url)
    published = publish_run(run, store, history=Interactions.from_frame(frame)).result.version

    # Today's sessions, interleaved across users as a live stream would be.
    sessions = {u: [(f"sku{k}", now - 600_000 + 20_000 * n + j * 1000)
                    for n, k in enumerate(rng.choice(np.arange(1, N_ITEMS + 1), 6, replace=False))]
                for j, u in enumerate(USERS)}
    producer = ordered_producer(settings)
    n_good = 0
    for n in range(6):
        for u in USERS:
            item, ts = sessions[u][n]
            event = {"event_id": f"{u}-{n}", "user_id": u, "item_id": item, "ts": ts, "event_type": "view"}
            producer.produce(settings.topic_clicks, json.dumps(event).encode(), key=u.encode())
            n_good += 1
    bad = {
        b"not json at all": "not JSON",
        b'{"event_id": "z", "user_id": "ann"}': "missing field: item_id",
        json.dumps({"event_id": "z", "user_id": "ann", "item_id": "sku1", "ts": now,
                    "event_type": "teleport"}).encode(): "unknown event_type: 'teleport'",
        json.dumps({"event_id": "ann-2", "user_id": "ann", "item_id": sessions["ann"][2][0],
                    "ts": sessions["ann"][2][1], "event_type": "view"}).encode(): "duplicate",
    }
    for raw in bad:
        producer.produce(settings.topic_clicks, raw, key=b"ann")
    producer.flush(30)

    serve(settings, run, tail=False)  # bounded: stops at the end of every partition

    recs = [Recommendation.model_validate_json(m.value()) for m in
            consume_all(settings, settings.topic_recommendations, n_good)]
    dlq = [DeadLetter.model_validate_json(m.value()) for m in consume_all(settings, settings.topic_dlq, len(bad))]
    assert len(recs) == n_good and len(dlq) == len(bad)
    assert sorted((d.raw, d.reason) for d in dlq) == sorted(bad.items())
    assert all(d.topic == settings.topic_clicks and d.offset is not None for d in dlq)

    last = {r.user_id: r for r in recs if r.event_id.endswith("-5")}
    for uid in USERS:
        r = last[uid]
        assert_equals_offline(r, recommend_offline(  # ranking, gate and explanation
            model, items, USERS.index(uid), history.get(uid, []), sessions[uid], gap_ms=settings.session_gap_s * 1000,
            max_segment=6, top_k=8))
        assert r.cold_start == (uid == "eve") and r.long_term_version == (None if uid == "eve" else published)
        assert r.model_version == "tiny"


def test_serve_without_a_published_version_says_what_to_do(live_settings):
    from slsrec.errors import UserError

    with pytest.raises(UserError, match="nothing is published"):
        serve(live_settings, None, recovery=False, tail=False)


@pytest.mark.redis_cluster
def test_two_worker_processes_answer_every_event_once(live_settings, tmp_path):
    """`slsrec serve --processes 2`: the cluster shares the partitions; nothing lost or doubled."""
    settings = live_settings.model_copy(update={"recovery_dir": tmp_path / "recovery"})
    run = tiny_published_run(settings, tmp_path, seed=5)
    producer, now, sent = ordered_producer(settings), int(time.time() * 1000), []
    for n in range(200):
        u = f"user{n % 23}"
        event = {"event_id": f"e{n}", "user_id": u, "item_id": f"sku{n % N_ITEMS + 1}", "ts": now - 100_000 + n,
                 "event_type": "click"}
        producer.produce(settings.topic_clicks, json.dumps(event).encode(), key=u.encode())
        sent.append(event)
    producer.flush(30)

    serve(settings, run, processes=2, tail=False)

    recs = [Recommendation.model_validate_json(m.value())
            for m in consume_all(settings, settings.topic_recommendations, len(sent))]
    assert sorted(r.event_id for r in recs) == sorted(e["event_id"] for e in sent)
    assert sorted((tmp_path / "recovery").glob("*.sqlite3"))  # recovery partitions were created
    for u in {e["user_id"] for e in sent}:  # per-user order survives the exchange between workers
        ts = [r.event_ts for r in recs if r.user_id == u]
        assert ts == sorted(ts)


@pytest.mark.redis_cluster
def test_serve_defaults_to_the_published_run_even_where_its_directory_is_missing(redis_db, tmp_path):
    """Without --run the flow serves the published version; on a machine without the run directory, it
    rebuilds the model from the files the publisher stored in Redis."""
    import shutil

    from slsrec.serving import open_recommender
    from slsrec.settings import Settings

    settings = Settings(redis_url=redis_db, runs_dir=tmp_path / "runs")
    torch.manual_seed(2)
    model = SLSRec(SLSRecConfig(n_users=2, n_items=5, d=8, hidden=8))
    run = save_run(tmp_path / "elsewhere" / "demo", model, name="slsrec", users=Vocab(["a", "b"], padding=False),
                   items=Vocab(list("vwxyz"), padding=True), dataset="in-test")
    frame = pd.DataFrame({"user_id": ["a", "a"], "item_id": ["v", "w"], "timestamp": [1, 2]})
    version = publish_run(run, LongTermStore(redis_db), history=Interactions.from_frame(frame)).result.version
    shutil.rmtree(run)

    rec = open_recommender(settings)
    assert rec.model_version == version  # following the published versions, the model is named by its version
    assert torch.equal(rec.model.item_embeddings(), model.item_embeddings())
    assert rec.long_term(["a", "b"])[0] == version  # the reader accepts the version of its run
    assert rec.long_term(["a", "b"])[1][1] is None  # b had no history: cold start


def test_a_flow_killed_mid_stream_resumes_its_sessions_and_answers_every_event(live_settings, tmp_path):
    """kill -9 of `slsrec serve`, then a restart: every event is answered (at least once), and the
    sessions come back from the snapshots (the items seen before the crash stay excluded)."""
    import os
    import subprocess
    import sys

    settings = live_settings.model_copy(update={"recovery_dir": tmp_path / "recovery", "snapshot_interval_s": 0.3})
    run = tiny_published_run(settings, tmp_path, seed=6)
    producer, now = ordered_producer(settings), int(time.time() * 1000)
    events = [{"event_id": f"e{n}", "user_id": f"user{n % 23}", "item_id": f"sku{n % N_ITEMS + 1}",
               "ts": now - 100_000 + n, "event_type": "click"} for n in range(600)]

    def send(batch):
        for e in batch:
            producer.produce(settings.topic_clicks, json.dumps(e).encode(), key=e["user_id"].encode())
        producer.flush(30)

    send(events[:300])
    cmd = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--run", str(run)]
    with open(tmp_path / "flow.log", "w") as log:
        flow = subprocess.Popen(cmd, env={**os.environ, **settings.to_env()}, stdout=log, stderr=log)
        try:
            assert len(consume_all(settings, settings.topic_recommendations, 300, timeout_s=120, group="wait")) >= 300
            time.sleep(1.5)  # a few snapshots of the sessions
        finally:
            flow.kill()  # SIGKILL: no clean shutdown
            flow.wait(30)
    assert list((tmp_path / "recovery" / "sessions").glob("sessions-*.log"))
    send(events[300:])
    serve(settings, run, tail=False)

    recs = [Recommendation.model_validate_json(m.value())
            for m in consume_all(settings, settings.topic_recommendations, 10**6, timeout_s=15)]
    assert {r.event_id for r in recs} == {e["event_id"] for e in events}  # duplicates allowed, losses not
    before = {}
    for e in events[:300]:
        before.setdefault(e["user_id"], set()).add(e["item_id"])
    after = [r for r in recs if int(r.event_id[1:]) >= 300]
    assert after and all(not before[r.user_id] & {i.item_id for i in r.items} for r in after)


def test_a_users_events_are_answered_by_one_worker_in_order_across_a_restart(live_settings, tmp_path):
    """`slsrec serve --processes 3`, twice on the same recovery directory: every answer names its worker
    (header slsrec-worker); each user's answers come from one worker, in the order of the user's events."""
    from flows.kafka_sink import WORKER_HEADER

    settings = live_settings.model_copy(update={"recovery_dir": tmp_path / "recovery"})
    run = tiny_published_run(settings, tmp_path, seed=6)
    producer, now, users = ordered_producer(settings), int(time.time() * 1000), [f"user{u}" for u in range(24)]

    def send(first: int, last: int) -> None:  # events first..last-1 of every user, users interleaved
        for k in range(first, last):
            for u in users:
                event = {"event_id": f"{u}-{k}", "user_id": u, "item_id": f"sku{k % N_ITEMS + 1}",
                         "ts": now - 100_000 + k, "event_type": "click"}
                producer.produce(settings.topic_clicks, json.dumps(event).encode(), key=u.encode())
        producer.flush(30)

    send(0, 4)
    serve(settings, run, processes=3, tail=False)
    send(4, 8)
    serve(settings, run, processes=3, tail=False)  # resumes after the first run's events

    answers = consume_all(settings, settings.topic_recommendations, 8 * len(users))
    assert len(answers) == 8 * len(users)
    by_user: dict[str, list[tuple[str, int]]] = {}
    for m in answers:  # a user's answers share a partition (key user_id), read in the order written
        rec = Recommendation.model_validate_json(m.value())
        by_user.setdefault(rec.user_id, []).append((dict(m.headers())[WORKER_HEADER].decode(),
                                                    int(rec.event_id.rsplit("-", 1)[1])))
    for u in users:
        assert len({w for w, _ in by_user[u]}) == 1, f"{u} was served by several workers: {by_user[u]}"
        assert [k for _, k in by_user[u]] == list(range(8)), u
    assert {w for answers in by_user.values() for w, _ in answers} == {"0", "1", "2"}  # all three took users

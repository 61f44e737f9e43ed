"""The long-term loop through the real local Kafka and Redis: a new version published while the flow
serves live traffic is adopted without a restart, one version per recommendation, sessions kept."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from conftest import assert_equals_offline, ordered_producer

from schemas.events import Recommendation
from slsrec.checkpoint import save_run
from slsrec.data import Interactions, Vocab
from slsrec.demo import stop_flow
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.publish import publish_run
from slsrec.serving import recommend_offline
from slsrec.store import LongTerm, LongTermStore, parse_seq

pytestmark = pytest.mark.integration

N_ITEMS, DAY_MS = 50, 86_400_000
TRACKED = ["ann", "ben", "cid", "dee"]  # their sessions span the switch
# One segment per session (S = 8 > 7 events), so the offline reference's long-term input is the history alone.
CONFIG = dict(n_users=len(TRACKED), n_items=N_ITEMS, d=16, hidden=16, max_segment=8, long_len=10)


class Reader:
    """Reads a topic from the start, in a thread, keeping each record with its partition."""

    def __init__(self, settings, topic: str):
        self.got: list[tuple[int, Recommendation]] = []
        self._c = Consumer({**settings.kafka_config(), "group.id": f"check-{topic}", "enable.auto.commit": False})
        parts = self._c.list_topics(topic, timeout=10).topics[topic].partitions
        self._c.assign([TopicPartition(topic, p, 0) for p in parts])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self._c.poll(0.2)
            if m is not None and m.error() is None:
                self.got.append((m.partition(), Recommendation.model_validate_json(m.value())))

    def wait(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition([r for _, r in self.got]):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._c.close()


@pytest.mark.redis_cluster
def test_a_version_published_under_live_traffic_is_adopted_without_losing_sessions(live_settings, tmp_path):
    settings = live_settings.model_copy(update={"recovery_dir": tmp_path / "recovery", "runs_dir": tmp_path / "runs",
                                                "redis_cache_ttl_s": 0.2, "top_k": 8})
    items = Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True)
    users = Vocab(TRACKED, padding=False)
    runs = {}
    for name, seed in (("v1-run", 1), ("v2-run", 2)):  # v2: a different model, as a retrain makes
        torch.manual_seed(seed)
        runs[name] = save_run(tmp_path / name, SLSRec(SLSRecConfig(**CONFIG)), name="slsrec", users=users,
                              items=items, dataset="in-test")
    rng = np.random.default_rng(4)
    now = int(time.time() * 1000)
    history = {u: [(f"sku{k}", now - 3 * DAY_MS + 60_000 * n) for n, k in enumerate(rng.integers(1, N_ITEMS + 1, 12))]
               for u in TRACKED[:-1]}  # dee is cold
    frame = pd.DataFrame([(u, i, t) for u, h in history.items() for i, t in h], columns=["user_id", "item_id", "timestamp"])
    store = LongTermStore(settings.redis_url)
    v1 = publish_run(runs["v1-run"], store, history=Interactions.from_frame(frame)).result.version
    sessions = {u: [(f"sku{k}", now - 300_000 + 15_000 * n + j) for n, k in
                    enumerate(rng.choice(np.arange(1, N_ITEMS + 1), 7, replace=False))] for j, u in enumerate(TRACKED)}

    producer, sent = ordered_producer(settings), []

    def send(event_id: str, user: str, item: str, ts: int) -> None:
        event = {"event_id": event_id, "user_id": user, "item_id": item, "ts": ts, "event_type": "view"}
        producer.produce(settings.topic_clicks, json.dumps(event).encode(), key=user.encode())
        sent.append(event_id)

    for n in range(4):  # the first 4 events of every tracked session, before the switch
        for u in TRACKED:
            send(f"{u}-{n}", u, *sessions[u][n])
    producer.flush(30)

    log_path = tmp_path / "flow.log"
    env = {**os.environ, **settings.to_env()}
    flow = subprocess.Popen([sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--no-recovery"],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    reader = Reader(settings, settings.topic_recommendations)
    stop_filler = threading.Event()

    def filler() -> None:  # live traffic from other users throughout the switch, one event per 20 ms
        n = 0
        while not stop_filler.is_set():
            send(f"f{n}", f"filler{n % 17}", f"sku{n % N_ITEMS + 1}", int(time.time() * 1000))
            producer.poll(0)
            n += 1
            time.sleep(0.02)

    traffic = threading.Thread(target=filler, daemon=True)
    try:
        reader.wait(lambda rs: len({r.event_id for r in rs} & {f"{u}-3" for u in TRACKED}) == len(TRACKED), 120,
                    "the recommendations of the first events")
        traffic.start()
        time.sleep(1.0)
        v2 = publish_run(runs["v2-run"], store, history=Interactions.from_frame(frame)).result.version
        reader.wait(lambda rs: any(r.model_version == v2 for r in rs), 60, "a recommendation of the new version")
        for n in range(4, 7):  # the rest of the tracked sessions, after the switch
            for u in TRACKED:
                send(f"{u}-{n}", u, *sessions[u][n])
        time.sleep(1.0)
        stop_filler.set()
        traffic.join(10)
        producer.flush(30)
        reader.wait(lambda rs: len({r.event_id for r in rs}) >= len(sent), 60, "every event's recommendation")
    finally:
        stop_filler.set()
        stop_flow(flow)
        reader.close()

    recs = [r for _, r in reader.got]
    assert sorted(r.event_id for r in recs) == sorted(sent)  # nothing lost, nothing doubled
    # Exactly one version per recommendation: the model's, and the vectors' (unless cold) the same.
    assert {r.model_version for r in recs} == {v1, v2}
    assert all(r.long_term_version in (None, r.model_version) for r in recs)
    # Versions only move forward, per partition and per user.
    for key in ({p for p, _ in reader.got}, {r.user_id for r in recs}):
        for k in key:
            seqs = [parse_seq(r.model_version) for p, r in reader.got if k in (p, r.user_id)]
            assert seqs == sorted(seqs), k
    # The sessions in flight survived: after the switch, each tracked user's answer is v2's offline one
    # for the whole session (its first 4 events were encoded by v1, then re-encoded by v2).
    torch.manual_seed(2)
    model2 = SLSRec(SLSRecConfig(**CONFIG)).eval()
    last = {r.user_id: r for r in recs if r.event_id.endswith("-6")}
    for u in TRACKED:
        assert last[u].model_version == v2
        assert_equals_offline(last[u], recommend_offline(  # the re-encoded session explains itself too
            model2, items, TRACKED.index(u), history.get(u, []), sessions[u], gap_ms=settings.session_gap_s * 1000,
            max_segment=CONFIG["max_segment"], top_k=8))
    logged = log_path.read_text()
    assert re.search(rf"model {v2}: re-encoded \d+ open sessions in [\d.]+ ms", logged), logged[-3000:]
    # The stream's longest silence around the switch (filler events arrive every 20 ms), for the benchmarks.
    emits = sorted(r.emit_ts for r in recs if r.event_id.startswith("f"))
    print("switch:", *re.findall(r"(version \S+: model loaded in \d+ ms|re-encoded .* ms)", logged),
          f"longest gap between recommendations {max(np.diff(emits))} ms")


def until(poll, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while (got := poll()) is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


def test_the_reader_adopts_a_newer_version_once_its_model_is_loaded_and_skips_a_broken_one(redis_prefix, tmp_path, caplog):
    from functools import partial

    from slsrec.serving import LongTermReader, load_version
    from slsrec.settings import Settings

    store = LongTermStore(Settings().redis_url, prefix=redis_prefix)
    items, users = Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True), Vocab(TRACKED, padding=False)
    frame = pd.DataFrame({"user_id": ["ann", "ann"], "item_id": ["sku1", "sku2"], "timestamp": [1, 2]})
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(save_run(tmp_path / f"run{seed}", SLSRec(SLSRecConfig(**CONFIG)), name="slsrec", users=users,
                             items=items, dataset="in-test"))
    v1 = publish_run(runs[0], store, history=Interactions.from_frame(frame)).result.version
    reader = LongTermReader(store, 0.0, load=partial(load_version, store, tmp_path / "runs"), version=v1)
    assert reader.poll() is None and reader(["ann"])[0] == v1

    # A version without a model (its run is not here and Redis holds no files): the stream stays on v1.
    entry = {"ann": LongTerm(np.ones(16, np.float32), 0.0, 1)}
    broken = store.publish(None, entry, meta={"run": str(tmp_path / "gone")}).version
    assert reader.poll() is None  # starts loading it in the background
    time.sleep(0.5)
    with caplog.at_level("WARNING", logger="slsrec.serving"):
        assert reader.poll() is None and reader(["ann"])[0] == v1
    assert f"cannot load version {broken}" in caplog.text

    v3 = publish_run(runs[1], store, history=Interactions.from_frame(frame)).result.version
    published = until(reader.poll)
    assert published.version == v3 and reader(["ann"])[0] == v3
    assert torch.equal(published.model.item_embeddings(), load_run_model(runs[1]).item_embeddings())
    assert parse_seq(broken) < parse_seq(v3)

    # A reader pinned to a run (`serve --run`) switches the vectors of its run only.
    pinned = LongTermReader(store, 0.0, run=str(runs[0]))
    assert pinned(["ann"])[0] is None  # the current version belongs to run2
    v4 = publish_run(runs[0], store, history=Interactions.from_frame(frame)).result.version
    assert pinned(["ann"])[0] == v4


def load_run_model(path):
    from slsrec.checkpoint import load_run

    return load_run(path).model


def test_serve_exports_spans_and_metrics_to_the_console_when_asked(live_settings, tmp_path):
    """`slsrec serve --otel-console`: one span per micro-batch naming its events, and the flow's counters."""
    settings = live_settings.model_copy(update={"runs_dir": tmp_path / "runs"})
    torch.manual_seed(1)
    run = save_run(tmp_path / "tiny", SLSRec(SLSRecConfig(**CONFIG)), name="slsrec", users=Vocab(TRACKED, padding=False),
                   items=Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True), dataset="in-test")
    store = LongTermStore(settings.redis_url)
    version = store.publish(None, {"ann": LongTerm(np.ones(16, np.float32), 0.0, 1)}, meta={"run": str(run)})
    version = version.version
    producer, now = ordered_producer(settings), int(time.time() * 1000)
    for n in range(5):
        event = {"event_id": f"e{n}", "user_id": "ann", "item_id": f"sku{n + 1}", "ts": now - 1000 + n, "event_type": "view"}
        producer.produce(settings.topic_clicks, json.dumps(event).encode(), key=b"ann")
    producer.produce(settings.topic_clicks, b"not json", key=b"ann")
    producer.flush(30)
    env = {**os.environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--no-recovery",
                           "--exit-at-end", "--otel-console"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    spans = re.findall(r'"name": "slsrec.batch"', done.stdout)
    assert spans and '"e0"' in done.stdout  # the causing event ids are on the span
    for name in ("slsrec.events.in", "slsrec.recommendations.out", "slsrec.dead_letters", "slsrec.latency.e2e",
                 "slsrec.batch.size", "slsrec.model.version", "slsrec.longterm.version", "slsrec.sessions.active"):
        assert f'"name": "{name}"' in done.stdout, name
    assert f'"version": "{version}"' in done.stdout

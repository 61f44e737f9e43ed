"""Retrain cycles on a tiny synthetic world through the real Kafka and Redis."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from typer.testing import CliRunner

from schemas.drift import DriftAlert
from schemas.events import SessionClosed, SessionItem
from slsrec.checkpoint import load_run
from slsrec.cli import app
from slsrec.publish import publish_run
from slsrec.retrain import RetrainConfig, Retrainer, latest_run
from slsrec.serving import version_run_dir
from slsrec.store import LongTermStore, connect, parse_seq
from slsrec.synthetic import WorldConfig, generate
from slsrec.telemetry import setup_telemetry
from slsrec.train import TrainConfig, train
from conftest import ordered_producer

FAST = dict(epochs=1, threads=1, device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def world():
    return generate(WorldConfig(n_users=60, n_items=50, n_clusters=4, mean_sessions=6, seed=3)).events


@pytest.fixture
def env(live_settings, topic_prefix, tmp_path, world):
    """Settings on fresh topics / Redis db, a base run trained on the first 80% of the world, and the
    rest recorded as sessions on the topic (plus one new user and one new item)."""
    cut = world["timestamp"].quantile(0.8)
    base_file = tmp_path / "base.csv"
    world[world["timestamp"] < cut].to_csv(base_file, index=False)
    runs = tmp_path / "runs"
    train(TrainConfig(dataset=str(base_file), model="slsrec", epochs=1, threads=1, device="cpu",
                      model_options={"d": 8, "hidden": 8, "max_len": 30, "long_len": 30}),
          runs / "base", progress=False)
    later = world[world["timestamp"] >= cut]
    records = [session(u, list(zip(g["item_id"], g["timestamp"]))) for u, g in later.groupby("user_id", sort=False)]
    last = int(world["timestamp"].max())
    records.append(session("brand-new-user", [("i001", last + 1000), ("brand-new-item", last + 2000)]))
    producer = ordered_producer(live_settings)
    for r in records:
        producer.produce(live_settings.topic_sessions, r.model_dump_json().encode(), key=r.user_id.encode())
    assert producer.flush(30) == 0
    settings = live_settings.model_copy(update={"runs_dir": runs, "history_dir": tmp_path / "history"})
    # Each test consumes the sessions with its own consumer group (the topic is fresh anyway).
    store = LongTermStore(settings.redis_url, prefix=topic_prefix.rstrip("."))
    yield settings, store, runs / "base"
    store.close()


def session(user: str, items: list[tuple[str, int]]) -> SessionClosed:
    its = [SessionItem(item_id=str(i), ts=int(t), event_type="view") for i, t in items]
    return SessionClosed(user_id=user, items=its, start_ts=its[0].ts, end_ts=its[-1].ts, reason="gap")


@pytest.mark.integration
@pytest.mark.redis_cluster
def test_a_cycle_publishes_a_newer_version_with_readable_vectors_and_model(env, world):
    settings, store, base_run = env
    first = publish_run(base_run, store, grace_s=600).result.version

    result = Retrainer(settings, RetrainConfig(margin=1.0, grace_s=600, **FAST), store=store).cycle()

    assert result.outcome == "published", result.reason
    assert store.current_version() == result.version and parse_seq(result.version) > parse_seq(first)
    assert result.ingest["sessions"] > 0 and result.warm_start == str(base_run)
    # Vectors of every user with history, the new user included.
    vectors = store.get_many(result.version, ["brand-new-user", "u01"])
    assert all(v is not None and v.vector.shape == (8,) for v in vectors)
    assert int(store.meta(result.version)["n_users"]) == result.vectors == world["user_id"].nunique() + 1
    # The flow's model is in Redis: rebuilt from the model files alone, it knows the new ids.
    files = store.model_files(result.version)
    assert {"model.safetensors", "config.json", "ids.json", "metrics.json"} <= set(files)
    assert json.loads(files["metrics.json"])["retrain"]["outcome"] == "published"
    published = load_run(version_run_dir(store, result.version, settings.runs_dir / "elsewhere"))
    assert published.items.index("brand-new-item") is not None and published.users.index("brand-new-user") is not None
    # The replaced version expires after the grace period; the new one does not expire.
    r = connect(settings.redis_url.get_secret_value())

    def ttls(version: str) -> list[int]:  # of the version's vector shards
        return [r.pttl(k) for k in r.scan_iter(match=f"{store.prefix}:v:{version}:lt:*")]

    assert ttls(first) and all(0 < t <= 600_000 for t in ttls(first))
    assert ttls(result.version) and all(t == -1 for t in ttls(result.version))


@pytest.mark.integration
def test_a_worse_candidate_is_refused_and_the_current_version_stays(env):
    settings, store, base_run = env
    current = publish_run(base_run, store).result.version
    # A negative margin demands a candidate better by more than 1.0 NDCG@10: impossible.
    result = Retrainer(settings, RetrainConfig(margin=-1.0, **FAST), store=store).cycle()

    assert result.outcome == "refused" and "margin -1" in result.reason
    assert store.current_version() == current and store.versions() == [current]
    recorded = json.loads((Path(result.candidate) / "metrics.json").read_text())
    assert recorded["retrain"]["outcome"] == "refused" and recorded["retrain"]["reason"] == result.reason


@pytest.mark.integration
@pytest.mark.redis_cluster
def test_cli_once_without_a_published_version_starts_from_the_latest_run_and_never_a_refused_one(env, monkeypatch):
    settings, store, base_run = env
    for name, value in {"REDIS_URL": settings.redis_url.get_secret_value(), "TOPIC_SESSIONS": settings.topic_sessions,
                        "HISTORY_DIR": str(settings.history_dir)}.items():
        monkeypatch.setenv(f"SLSREC_{name}", value)
    args = ["retrain", "--once", "--run-dir", str(settings.runs_dir), "--epochs", "1", "--threads", "1",
            "--device", "cpu"]

    refused = CliRunner().invoke(app, [*args, "--margin", "-1"])
    assert refused.exit_code == 0, refused.output
    assert "retrain REFUSED" in refused.output and "nothing published stays current" in refused.output
    assert latest_run(settings.runs_dir) == base_run

    published = CliRunner().invoke(app, [*args, "--margin", "1"])
    assert published.exit_code == 0, published.output
    assert "retrain published v000001-" in published.output and f"warm start from {base_run}" in published.output


@pytest.mark.integration
def test_a_request_runs_the_next_cycle_now_and_cycles_are_counted_by_outcome(env, request):
    settings, store, base_run = env
    reader = InMemoryMetricReader()
    retrainer = Retrainer(settings, RetrainConfig(margin=1.0, **FAST), store=store,
                          telemetry=setup_telemetry(settings, "test-retrain", reader=reader))
    stop = threading.Event()  # ends the loop if the test fails
    loop = threading.Thread(target=retrainer.run, args=(3600.0,), kwargs={"max_cycles": 3, "stop": stop})
    loop.start()
    request.addfinalizer(stop.set)
    t0 = time.monotonic()
    while not store.current_version():
        time.sleep(0.2)
        assert time.monotonic() - t0 < 120, "first cycle did not publish"
    retrainer.request("drift alert: ADWIN on hit")  # as a drift alert would
    time.sleep(1.5)
    retrainer.request("second request")
    loop.join(timeout=180)
    assert not loop.is_alive(), "requests did not cut the 1 h wait short"
    points = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
    runs = next(m for m in points if m.name == "slsrec.retrain.runs").data.data_points
    # Every cycle here trains and publishes: the first (scheduled, at start) and two requested ones.
    assert {p.attributes["outcome"]: p.value for p in runs} == {"published": 3}
    assert len(store.versions()) == 3


@pytest.mark.integration
def test_warm_start_copies_the_current_weights_and_both_are_scored_alike(env):
    settings, store, base_run = env
    # lr 0: the candidate stays the warm start, so it must score exactly as the current model.
    result = Retrainer(settings, RetrainConfig(margin=0.0, lr=0.0, **FAST), store=store).cycle()
    assert result.candidate_metrics == result.current_metrics and result.outcome == "published"
    base, candidate = load_run(base_run), load_run(result.candidate)
    n = base.model.item_embeddings().shape[0]
    assert torch.equal(candidate.model.item_embeddings()[:n], base.model.item_embeddings())
    assert candidate.items.index("brand-new-item") >= n  # new items got rows after the old ones


@pytest.mark.integration
def test_a_drift_alert_on_the_drift_topic_triggers_a_cycle(env, request):
    settings, store, base_run = env
    retrainer = Retrainer(settings, RetrainConfig(margin=1.0, **FAST), store=store)
    stop = threading.Event()  # ends the loop if the test fails
    loop = threading.Thread(target=retrainer.run, args=(3600.0,),
                            kwargs={"max_cycles": 2, "watch_drift": True, "stop": stop})
    loop.start()
    request.addfinalizer(stop.set)
    alert = DriftAlert(signal="hit", detector="ADWIN", worker_id="0", ts=1_700_000_000_000, n_seen=500, window=100,
                       mean_before=0.3, mean_after=0.1, params={"delta": 0.002})
    producer = ordered_producer(settings)
    t0 = time.monotonic()
    while loop.is_alive() and time.monotonic() - t0 < 120:
        # Alerts before the watcher's subscription is assigned are not seen (it reads new alerts only).
        producer.produce(settings.topic_drift, alert.model_dump_json().encode())
        producer.flush(10)
        loop.join(timeout=2)
    assert not loop.is_alive(), "a drift alert did not cut the 1 h wait short"
    assert len(store.versions()) == 2

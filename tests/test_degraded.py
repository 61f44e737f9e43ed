"""Degraded mode in the serving code: the flags a recommendation carries, and a lost version noticed
by the reader through a real Redis (its own key prefix on the shared one; nothing is frozen here:
freezing and restarting Redis is tests/test_faults_integration.py's, on a private Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis
import torch

from schemas.drift import HealthEvent
from schemas.events import Recommendation
from slsrec import local
from slsrec.codec import to_model
from slsrec.data import Vocab
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.serving import Recommender, SessionTable, click
from slsrec.serving.versions import LongTermReader
from slsrec.store import LongTerm, LongTermStore

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def model() -> SLSRec:
    torch.manual_seed(3)
    return SLSRec(SLSRecConfig(n_users=4, n_items=20, d=8, hidden=8, max_segment=5, long_len=8)).eval()


def entry(seed: int) -> LongTerm:
    return LongTerm(np.random.default_rng(seed).normal(size=8).astype(np.float32), 0.5, 3)


def test_degraded_answers_are_flagged_and_never_cold_starts(model):
    answers = iter([("v1", [entry(1), None]), ("v1", [entry(1), None], True)])
    rec = Recommender(model, Vocab([f"i{k}" for k in range(20)], padding=True), lambda users: next(answers),
                      model_version="m", gap_ms=60_000, max_segment=5)
    table = SessionTable()
    normal = rec.process(table, [click("e1", "warm", "i1", T0), click("e2", "cold", "i2", T0)])
    degraded = rec.process(table, [click("e3", "warm", "i3", T0 + 1), click("e4", "cold", "i4", T0 + 1)])
    flags = [(r.long_term, r.cold_start, r.long_term_version) for r in normal + degraded]
    assert flags == [("fresh", False, "v1"), ("fresh", True, None),
                     ("cached", False, "v1"), ("unavailable", False, None)]
    assert all(isinstance(to_model(r), Recommendation) for r in degraded)  # the contract holds


@pytest.fixture
def store(redis_prefix) -> Iterator[LongTermStore]:
    s = LongTermStore(f"redis://{local.REDIS.host}:{local.REDIS.port}/0", prefix=redis_prefix, timeout_s=0.5)
    yield s
    s.close()


@pytest.mark.integration
def test_a_version_gone_from_redis_degrades_and_the_next_publish_restores(store):
    v = store.publish("v5", {"u1": entry(1), "u2": entry(2)}).version
    reader = LongTermReader(store, ttl_s=0.0, version=v, worker_id="w0")
    assert reader(["u1", "u2", "u3"])[1][2] is None and len(reader(["u1"])) == 2  # normal: two fields

    plain = redis.Redis(local.REDIS.host, local.REDIS.port)  # what a Redis restarted empty looks like:
    plain.delete(*plain.scan_iter(f"{store.prefix}:*"))  # every key of this deployment gone
    version, entries, degraded = reader(["u1", "u3"])
    assert (version, degraded) == (v, True)
    assert entries[0] is not None and entries[1] is None  # u1 from the cache; u3 was never read
    [event] = reader.take_events()
    assert (event.state, event.worker_id, event.long_term_version) == ("degraded", "w0", v)
    assert "gone from Redis" in event.reason

    # The empty Redis numbers versions from 1 again; the reader takes it even so, and recovers.
    restored = store.publish("v1", {"u1": entry(1), "u3": entry(3)}).version
    version, entries = reader(["u1", "u3"])
    assert version == restored and entries[1] is not None
    assert [(type(e), e.state) for e in reader.take_events()] == [(HealthEvent, "recovered")]
    assert reader.degraded_reason is None


@pytest.mark.integration
def test_a_version_republished_under_the_same_id_serves_its_new_vectors(store):
    v = store.publish("v5", {"u1": entry(1)}).version
    reader = LongTermReader(store, ttl_s=0.0, version=v, worker_id="w0")
    assert np.array_equal(reader(["u1"])[1][0].vector, entry(1).vector)  # cached from now on
    plain = redis.Redis(local.REDIS.host, local.REDIS.port)
    plain.delete(*plain.scan_iter(f"{store.prefix}:*"))  # Redis restarted empty ...
    assert reader(["u1"])[2] is True
    store.publish("v5", {"u1": entry(9)})  # ... and the same id published again, with other vectors
    assert np.array_equal(reader(["u1"])[1][0].vector, entry(9).vector)

"""Shared fixtures: the real local Kafka and Redis, and per-test isolation on them.

Integration tests are marked ``@pytest.mark.integration`` and take ``services`` (directly or through
``fresh_topics``, ``redis_db``, ``redis_prefix`` or ``live_settings``). A test also marked
``@pytest.mark.redis_cluster`` runs twice: on the single Redis and on the local Redis Cluster
(``redis_db`` is parametrized ``single`` / ``cluster``). The services come from the same
code as ``slsrec local up``; when they cannot start, every test that needs them
fails with the reason. An integration test that skips counts as failed: CI must not go green without
the services.

Several test runs may share the services at once (teammates, CI): each holds a session; services that
a test run started are stopped by the last one to finish, and services started by ``slsrec local up``
or anyone else are never stopped.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from slsrec import local
from slsrec.settings import Settings

if TYPE_CHECKING:
    from schemas.events import Recommendation
    from slsrec.serving import Offline



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("integration") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"integration test skipped, which counts as a failure: {reason}"


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("redis_cluster") and "redis_db" in metafunc.fixturenames:
        metafunc.parametrize("redis_db", ["single", "cluster"], indirect=True)


def _hold(what: str, **group) -> Iterator[list[local.ServiceStatus]]:
    """A :func:`slsrec.local.session` of one group of services, or the test fails saying why."""
    stack = contextlib.ExitStack()
    try:
        statuses = stack.enter_context(local.session(**group))
    except Exception as e:  # a ServiceError names the service and shows its log tail
        pytest.fail(f"{what} could not start: {e}", pytrace=False)
    with stack:
        yield statuses


@pytest.fixture(scope="session")
def services() -> Iterator[list[local.ServiceStatus]]:
    """Kafka and Redis, up and answering, with the project's topics (a :func:`slsrec.local.session`)."""
    yield from _hold("local Kafka/Redis")


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test (in any session) uses, for topic and consumer-group names."""
    return f"test-{uuid.uuid4().hex[:12]}."


@pytest.fixture
def fresh_topics(services, topic_prefix) -> Iterator[Settings]:
    """Settings whose five topics are new and empty (clicks with 4 partitions); deleted afterwards."""
    with local.scratch_topics(Settings(), topic_prefix) as settings:
        yield settings


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[local.ServiceStatus]]:
    """The local Redis Cluster (`slsrec local up --redis-cluster`), with leases of its own: started
    here when it is not running, and stopped by the last test session that started it."""
    yield from _hold("local Redis Cluster", redis_cluster=True)


@pytest.fixture
def redis_db(request, services) -> Iterator[str]:
    """URL of a Redis database that no other running test uses, empty at the start and at the end.

    Parametrized ``cluster`` (``@pytest.mark.redis_cluster``): the local Redis Cluster, held alone.
    """
    if getattr(request, "param", "single") == "cluster":
        request.getfixturevalue("redis_cluster")
        with local.scratch_redis_cluster() as url:
            yield url
    else:
        with local.scratch_redis_db() as url:
            yield url


@pytest.fixture
def redis_prefix(services) -> Iterator[str]:
    """A key prefix no other test uses, on the default Redis database; its keys are deleted after."""
    import redis

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis(local.REDIS.host, local.REDIS.port)
    for key in client.scan_iter(f"{prefix}*", count=1000):
        client.delete(key)


@pytest.fixture
def live_settings(fresh_topics, redis_db) -> Settings:
    """Settings on fresh topics and an isolated Redis database: what an end-to-end test runs with."""
    return fresh_topics.model_copy(update={"redis_url": SecretStr(redis_db)})


@pytest.fixture(scope="session")
def secure_services() -> Iterator[list[local.ServiceStatus]]:
    """The secure pair (`slsrec local up --secure`): Kafka with SASL/SCRAM over TLS, Redis with an ACL
    user over TLS. Separate from the plain services, with leases of their own."""
    yield from _hold("secure local Kafka/Redis", secure=True)


@pytest.fixture
def secure_live_settings(secure_services, topic_prefix, tmp_path) -> Iterator[Settings]:
    """Secure settings on fresh topics and an isolated database of the secure Redis; local state in tmp_path."""
    base = local.secure_settings().model_copy(update={"recovery_dir": tmp_path / "recovery", "runs_dir": tmp_path / "runs",
                                                      "history_dir": tmp_path / "history"})
    with local.scratch_topics(base, topic_prefix) as settings, local.scratch_redis_db(secure=True) as url:
        yield settings.model_copy(update={"redis_url": SecretStr(url)})


def assert_equals_offline(got: Recommendation, want: Offline) -> None:
    """The stream's record equals the offline model's answer (slsrec.serving.recommend_offline): the
    ranking, the gate and the explanation. Shared by the unit and the end-to-end tests."""
    assert [i.item_id for i in got.items] == want.items
    np.testing.assert_allclose([i.score for i in got.items], want.scores, atol=1e-4)
    assert got.alpha == pytest.approx(want.alpha, abs=1e-4)
    np.testing.assert_allclose([i.long_score for i in got.items], want.long_scores, atol=1e-4)
    np.testing.assert_allclose([i.short_score for i in got.items], want.short_scores, atol=1e-4)
    np.testing.assert_allclose([i.long_score + i.short_score for i in got.items], want.scores, atol=1e-4)  # the split
    assert got.short_term_items == want.short_term_items


def ordered_producer(settings: Settings) -> Producer:
    """A producer that keeps each partition's order: without idempotence, a batch retried under load
    (a fresh topic's leader not elected yet, a request timeout) can land after the batches sent behind
    it, and a user's clicks then reach the flow out of order (what `slsrec replay` never does)."""
    return Producer({**settings.kafka_config(), "enable.idempotence": True})


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process, from /proc; zombies are left out, as
    they still count for ``killpg`` and ``waitpid`` but no longer run."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return found


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s`` (polled every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False

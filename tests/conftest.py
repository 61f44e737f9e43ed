"""Shared fixtures: the real local Kafka and Redis, and per-test isolation on them.

Integration tests are marked ``@pytest.mark.integration`` and take ``services`` (directly or through
``fresh_topics``, ``redis_db``, ``redis_prefix`` or ``live_settings``). The services come from the same
:func:`slsrec.local.up` as ``slsrec local up``; when they cannot start, every test that needs them
fails with the reason. An integration test that skips counts as failed: CI must not go green without
the services.

Several test sessions may run at once in this checkout (teammates, CI). Each holds a lease
(``var/run/test-leases/PID``); services that a test session started are stopped by the last test
session to finish, and services started by ``slsrec local up`` or anyone else are never stopped.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from slsrec import local
from slsrec.settings import Settings

LEASES = local.RUN / "test-leases"
TEST_OWNED = local.RUN / "test-owned"  # names of the services that a test session started
TOPIC_FIELDS = [f for f in Settings.model_fields if f.startswith("topic_")]
REDIS_TEST_DBS = range(1, 16)  # db 0 is left to the demo and to people


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("integration") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"integration test skipped, which counts as a failure: {reason}"


@pytest.fixture(scope="session")
def services() -> Iterator[list[local.ServiceStatus]]:
    """Kafka and Redis, up and answering, with the project's topics (``slsrec local up``)."""
    lease = LEASES / str(os.getpid())
    with local.lock():
        LEASES.mkdir(parents=True, exist_ok=True)
        lease.touch()
        try:
            statuses = local.up()
        except Exception as e:  # a ServiceError names the service and shows its log tail
            lease.unlink(missing_ok=True)
            pytest.fail(f"local Kafka/Redis could not start: {e}", pytrace=False)
        started = {s.name for s in statuses if s.started}
        if started:
            owned = set(TEST_OWNED.read_text().split()) if TEST_OWNED.exists() else set()
            TEST_OWNED.write_text(" ".join(sorted(owned | started)))
    yield statuses
    with local.lock():
        lease.unlink(missing_ok=True)
        if TEST_OWNED.exists() and not _other_live_leases():
            local.down(TEST_OWNED.read_text().split())
            TEST_OWNED.unlink()


def _other_live_leases() -> list[int]:
    live = []
    for lease in LEASES.iterdir():
        pid = int(lease.name)
        try:
            os.kill(pid, 0)
            live.append(pid)
        except ProcessLookupError:  # a test session that crashed
            lease.unlink(missing_ok=True)
    return live


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test (in any session) uses, for topic and consumer-group names."""
    return f"test-{uuid.uuid4().hex[:12]}."


@pytest.fixture
def fresh_topics(services, topic_prefix) -> Iterator[Settings]:
    """Settings whose five topics are new and empty (clicks with 4 partitions); deleted afterwards."""
    defaults = Settings()
    settings = defaults.model_copy(update={f: topic_prefix + getattr(defaults, f) for f in TOPIC_FIELDS})
    local.create_topics(settings)
    yield settings
    admin = local.admin_client(settings)  # kept alive until the futures resolve
    for fut in admin.delete_topics(list(local.topic_specs(settings))).values():
        fut.result(timeout=30)


@pytest.fixture
def redis_db(services) -> Iterator[str]:
    """URL of a Redis database that no other running test uses, empty at the start and at the end."""
    import redis

    local.RUN.mkdir(parents=True, exist_ok=True)
    for db in REDIS_TEST_DBS:
        with open(local.RUN / f"redis-db-{db}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            url = f"redis://{local.REDIS.host}:{local.REDIS.port}/{db}"
            client = redis.Redis.from_url(url)
            client.flushdb()
            yield url
            client.flushdb()
            return
    pytest.fail(f"all {len(REDIS_TEST_DBS)} Redis test databases are in use")


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

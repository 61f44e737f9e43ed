"""`slsrec local up|down|status|topics` on the real local Kafka and Redis.

The shared services (the ``services`` fixture) are only read here; starting and stopping is exercised on
a private redis-server on a spare port, with var/ moved to a temporary folder, so parallel test
sessions never lose their services.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time

import pytest
import redis
from typer.testing import CliRunner

from slsrec import local
from slsrec.cli import app
from slsrec.errors import ServiceError
from slsrec.settings import Settings

pytestmark = pytest.mark.integration
runner = CliRunner()


def _partitions(settings: Settings) -> dict[str, int]:
    meta = local.admin_client(settings).list_topics(timeout=10)
    return {t: len(m.partitions) for t, m in meta.topics.items()}


def test_up_twice_starts_nothing_twice(services):
    before = {s.name: s.pid for s in local.status()}
    again = local.up()
    assert [s.name for s in again] == ["kafka", "redis"]
    assert all(s.answering and not s.started for s in again)
    assert {s.name: s.pid for s in again} == before == {s.name: s.pid for s in local.status()}


def test_up_creates_the_topics_with_their_partition_counts(services):
    settings = Settings()
    found = _partitions(settings)
    assert {t: found.get(t) for t in local.topic_specs(settings)} == {
        "clicks": 4, "recommendations": 4, "sessions": 4, "clicks.dlq": 1, "drift": 1}


def test_create_topics_is_idempotent_and_follows_the_partition_setting(services, topic_prefix, capsys):
    defaults = Settings(partitions=3)
    settings = defaults.model_copy(update={f: topic_prefix + getattr(defaults, f)
                                           for f in Settings.model_fields if f.startswith("topic_")})
    try:
        assert sorted(local.create_topics(settings)) == sorted(local.topic_specs(settings))
        assert local.create_topics(settings) == []
        assert local.create_topics(settings.model_copy(update={"partitions": 5})) == []  # left as it is
        assert f"topic '{settings.topic_clicks}' exists with 3 partitions, not 5" in capsys.readouterr().err
        found = _partitions(settings)
        assert found[settings.topic_clicks] == 3 and found[settings.topic_dlq] == 1
    finally:
        admin = local.admin_client(settings)
        for fut in admin.delete_topics(list(local.topic_specs(settings))).values():
            fut.result(timeout=30)


def test_cli_status_reports_each_service_and_its_pid(services):
    pids = {s.name: s.pid for s in local.status()}
    result = runner.invoke(app, ["local", "status"])
    assert result.exit_code == 0, result.output
    for name, addr in (("kafka", "127.0.0.1:9092"), ("redis", "127.0.0.1:6379")):
        line = next(x for x in result.output.splitlines() if x.startswith(name))
        assert addr in line and "NOT" not in line
        assert (f"pid {pids[name]}" if pids[name] else "external") in line


def test_redis_cluster_up_twice_starts_nothing_twice_and_env_points_at_it(redis_cluster):
    before = {s.name: s.pid for s in redis_cluster}
    again = local.up(redis_cluster=True)  # not the CLI: its up adopts, and the cluster would outlive the tests
    assert all(s.answering and not s.started for s in again) and {s.name: s.pid for s in again} == before
    status = runner.invoke(app, ["local", "status", "--redis-cluster"])
    assert status.exit_code == 0 and status.output.count("answering") == 3, status.output
    env = runner.invoke(app, ["local", "env", "--redis-cluster"])
    assert "export SLSREC_REDIS_URL=redis+cluster://127.0.0.1:7001" in env.output
    from slsrec.store import connect

    client = connect(local.REDIS_CLUSTER_URL)
    assert sorted(n.port for n in client.get_primaries()) == [7001, 7002, 7003]
    assert client.cluster_info()["cluster_state"] == "ok"


def test_services_bind_loopback_only(services):
    ss = local.ensure_command("ss", "iproute2")
    listening = subprocess.run([ss, "-Hltn"], capture_output=True, text=True, check=True).stdout
    for port in (9092, 9093, 6379):  # Kafka's broker and controller, Redis
        hosts = {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in listening.splitlines()
                 if line.split()[3].endswith(f":{port}")}
        assert hosts, f"nothing listens on {port}"
        for host in hosts:  # the JVM reports 127.0.0.1 as ::ffff:127.0.0.1
            ip = ipaddress.ip_address(host)
            assert (getattr(ip, "ipv4_mapped", None) or ip).is_loopback, (port, host)


# --- lifecycle on a private Redis (var/ in tmp_path, a spare port) ---------------------------------


def _spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ping(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis("127.0.0.1", port).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def private_redis(tmp_path, monkeypatch) -> local.Service:
    """local.up/down/status see only a Redis on a spare port, with var/ under tmp_path."""
    svc = local.Service("redis", "127.0.0.1", _spare_port(), "redis-server")
    for name, path in (("VAR", tmp_path), ("RUN", tmp_path / "run"), ("LOG", tmp_path / "log")):
        monkeypatch.setattr(local, name, path)
    monkeypatch.setattr(local, "SERVICES", (svc,))
    yield svc
    local.down()


def test_up_status_down_lifecycle(services, private_redis):
    first = local.up()
    assert [(s.name, s.started, s.answering) for s in first] == [("redis", True, True)]
    pid = first[0].pid
    assert local.up()[0].pid == pid and not local.up()[0].started
    assert [(s.pid, s.answering) for s in local.status()] == [(pid, True)]
    assert redis.Redis("127.0.0.1", private_redis.port).ping()

    assert local.down() == ["redis"]
    assert [(s.pid, s.answering) for s in local.status()] == [(None, False)]
    assert not private_redis.pid_file.exists()
    assert local.down() == []


def test_down_leaves_services_it_did_not_start(services, private_redis):
    other = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(private_redis.port),
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        _wait_for_ping(private_redis.port)
        up = local.up()  # reuses the answering server, does not own it
        assert [(s.started, s.pid, s.answering) for s in up] == [(False, None, True)]
        assert local.down() == []
        assert other.poll() is None and redis.Redis("127.0.0.1", private_redis.port).ping()
    finally:
        other.terminate()
        other.wait()


def test_a_stale_pid_file_is_never_killed(services, private_redis):
    bystander = subprocess.Popen(["sleep", "60"])  # the pid was reused by an unrelated program
    try:
        private_redis.pid_file.parent.mkdir(parents=True)
        private_redis.pid_file.write_text(f"{bystander.pid}\n")
        assert local.down() == []
        assert bystander.poll() is None
        assert not private_redis.pid_file.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_service_that_cannot_start_fails_with_its_log(services, private_redis, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot bind to the port' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    with pytest.raises(ServiceError, match="(?s)redis exited while starting.*FATAL: cannot bind"):
        local.up(timeout_s=10)
    assert local.status()[0].pid is None


def test_a_session_stops_what_it_started_when_it_is_the_last(services, private_redis):
    with local.session() as statuses:
        assert [(s.started, s.answering) for s in statuses] == [(True, True)]
    assert [(s.pid, s.answering) for s in local.status()] == [(None, False)]


def test_services_in_use_by_another_session_keep_running(services, private_redis):
    other = subprocess.Popen(["sleep", "60"])  # stands for a teammate's test run holding a session
    try:
        with local.session() as statuses:
            (local.RUN / "sessions" / str(other.pid)).touch()
        pid = statuses[0].pid
        assert [(s.pid, s.answering) for s in local.status()] == [(pid, True)]  # the other still uses it
        with pytest.raises(ServiceError, match=f"in use by 1 running session.*pid {other.pid}"):
            local.down()
    finally:
        other.kill()
        other.wait()
    assert local.down() == ["redis"]  # its user is gone


def test_cli_up_twice_then_down(services, private_redis):
    first = runner.invoke(app, ["local", "up"])
    assert first.exit_code == 0, first.output
    pid = local.status()[0].pid
    assert f"pid {pid}" in first.output and "started" in first.output
    again = runner.invoke(app, ["local", "up"])
    assert f"pid {pid}" in again.output and "answering" in again.output and "started" not in again.output
    assert runner.invoke(app, ["local", "down"]).output.strip() == "stopped: redis"
    status = runner.invoke(app, ["local", "status"])
    assert isinstance(status.exception, ServiceError) and "not answering: redis" in str(status.exception)


def test_cli_up_keeps_what_a_running_session_started(services, private_redis):
    with local.session():
        assert runner.invoke(app, ["local", "up"]).exit_code == 0  # a person asks while tests run
        pid = local.status()[0].pid
    assert [(s.pid, s.answering) for s in local.status()] == [(pid, True)]

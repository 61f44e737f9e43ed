"""The secure local services (`slsrec local up --secure`), used as a user would: every command a
subprocess configured by SLSREC_* variables only. Replay, publish, the flow and retrain go through
SASL/SCRAM over TLS to Kafka and an ACL user over TLS to Redis; a wrong password, a wrong CA or a
plaintext client gets one `error:` line, exit code 2, and never sees a secret echoed back."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from typer.testing import CliRunner

from schemas.events import Recommendation
from slsrec import local
from slsrec.checkpoint import save_run
from slsrec.cli import app
from slsrec.data import Vocab
from slsrec.kafka_check import check_kafka
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.settings import Settings
from slsrec.store import LongTermStore, parse_seq
from slsrec.synthetic import WorldConfig, generate
from slsrec.train import TrainConfig, train
from test_flow_integration import consume_all

pytestmark = pytest.mark.integration

SLSREC = [sys.executable, "-c", "from slsrec.cli import main; main()"]
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"  # real CAs, none of which signed our servers


def slsrec(settings: Settings, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([*SLSREC, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def test_the_secure_services_refuse_what_the_plain_ones_accept(secure_services):
    settings = local.secure_settings()
    # Redis: no plaintext port, no default user, and the app's user is kept to its keys and off @dangerous.
    assert settings.redis_url.get_secret_value().startswith("rediss://")
    ca = settings.kafka_ssl_ca_location
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"rediss://{local.SECURE_REDIS.host}:{local.SECURE_REDIS.port}/0?ssl_ca_certs={ca}").ping()
    app = redis.Redis.from_url(settings.redis_url.get_secret_value())
    assert app.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.set("elsewhere:key", 1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.flushall()
    # Files: the secrets are readable by this user only.
    for path in (local.VAR / "secure" / "credentials.json", local.VAR / "secure" / "tls" / "server.key",
                 local.VAR / "secure" / "tls" / "server.p12", local.VAR / "kafka-secure" / "server.properties"):
        assert path.stat().st_mode & 0o077 == 0, path
    # No password on any command line of the services.
    creds = (local.VAR / "secure" / "credentials.json").read_text()
    secret = settings.kafka_sasl_password.get_secret_value()
    assert secret in creds
    for s in secure_services:
        if s.pid is not None:
            assert secret.encode() not in Path(f"/proc/{s.pid}/cmdline").read_bytes()


def test_up_status_and_env_of_the_secure_pair(secure_services, monkeypatch):
    pids = {s.name: s.pid for s in local.status(secure=True)}
    again = local.up(secure=True)  # idempotent, and never touches the plain pair
    assert [(s.name, s.address, s.started, s.answering) for s in again] == [
        ("kafka-secure", "127.0.0.1:9094", False, True), ("redis-secure", "127.0.0.1:6380", False, True)]
    assert {s.name: s.pid for s in again} == pids

    status = CliRunner().invoke(app, ["local", "status", "--secure"])
    assert status.exit_code == 0, status.output
    assert [line.split()[:2] for line in status.output.splitlines()] == [
        ["kafka-secure", "127.0.0.1:9094"], ["redis-secure", "127.0.0.1:6380"]]

    # `eval "$(slsrec local env --secure)"` gives a shell the settings that reach the secure pair.
    env = CliRunner().invoke(app, ["local", "env", "--secure"])
    assert env.exit_code == 0, env.output
    for line in env.output.splitlines():
        name, value = shlex.split(line.removeprefix("export "))[0].split("=", 1)
        monkeypatch.setenv(name, value)
    from_shell, expected = Settings(), local.secure_settings()
    assert from_shell.kafka_config() == expected.kafka_config()
    assert from_shell.redis_url == expected.redis_url and from_shell.recovery_dir == expected.recovery_dir
    assert redis.Redis.from_url(from_shell.redis_url.get_secret_value()).ping()  # TLS and the ACL user
    assert check_kafka(from_shell).brokers  # TLS and SCRAM


def test_replay_publish_serve_and_retrain_through_the_secure_services(secure_live_settings, tmp_path):
    settings = secure_live_settings
    world = generate(WorldConfig(n_users=40, n_items=40, n_clusters=4, mean_sessions=5, seed=7)).events
    cut = world["timestamp"].quantile(0.8)
    base_file, live_file = tmp_path / "base.csv", tmp_path / "live.csv"
    world[world["timestamp"] < cut].to_csv(base_file, index=False)
    live = world[world["timestamp"] >= cut]
    live.to_csv(live_file, index=False)
    train(TrainConfig(dataset=str(base_file), model="slsrec", epochs=1, threads=1, device="cpu",
                      model_options={"d": 8, "hidden": 8, "max_len": 30, "long_len": 30}),
          settings.runs_dir / "base", progress=False)

    published = slsrec(settings, "publish", "--run", str(settings.runs_dir / "base"))
    assert published.returncode == 0, published.stderr[-2000:]
    first = LongTermStore(settings.redis_url).current_version()
    assert first is not None and f"published {first} to Redis 127.0.0.1:6380" in published.stdout

    replayed = slsrec(settings, "replay", str(live_file), "--as-fast-as-possible")
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert f"replayed {len(live)} events to {settings.topic_clicks!r}" in replayed.stdout

    served = slsrec(settings, "serve", "--no-recovery", "--exit-at-end")
    assert served.returncode == 0, served.stderr[-3000:]
    recs = [Recommendation.model_validate_json(m.value())
            for m in consume_all(settings, settings.topic_recommendations, len(live))]
    assert len({r.event_id for r in recs}) == len(live)  # every replayed event answered, over TLS
    assert {r.model_version for r in recs} == {first}
    assert consume_all(settings, settings.topic_sessions, 1), "the flow closed no session"

    retrained = slsrec(settings, "retrain", "--once", "--run-dir", str(settings.runs_dir), "--epochs", "1",
                       "--threads", "1", "--device", "cpu", "--margin", "1")
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    second = LongTermStore(settings.redis_url).current_version()
    assert f"retrain published {second}" in retrained.stdout and parse_seq(second) > parse_seq(first)


def _wrong(settings: Settings, change: str) -> tuple[Settings, list[str]]:
    """Settings with one thing wrong, and the secrets that must never be shown."""
    kafka_pw = settings.kafka_sasl_password.get_secret_value()
    url = settings.redis_url.get_secret_value()
    redis_pw = url.split(":", 2)[2].split("@")[0]
    wrong_pw = "wrong-" + kafka_pw[::-1]
    update = {
        "kafka password": {"kafka_sasl_password": SecretStr(wrong_pw)},
        "kafka CA": {"kafka_ssl_ca_location": SYSTEM_CA},
        "kafka plaintext": {"kafka_security_protocol": "PLAINTEXT"},
        "redis password": {"redis_url": SecretStr(url.replace(redis_pw, wrong_pw))},
        "redis CA": {"redis_url": SecretStr(url.replace(settings.kafka_ssl_ca_location, SYSTEM_CA))},
        "redis plaintext": {"redis_url": SecretStr(url.replace("rediss://", "redis://").split("?")[0])},
    }[change]
    return settings.model_copy(update=update), [kafka_pw, redis_pw, wrong_pw]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random SLSRec and a history file to publish it with."""
    folder = tmp_path_factory.mktemp("run")
    config = SLSRecConfig(n_users=2, n_items=5, d=8, hidden=8, max_segment=4, long_len=4)
    run = save_run(folder / "tiny", SLSRec(config), name="slsrec", users=Vocab(["ann", "ben"], padding=False),
                   items=Vocab([f"i{k}" for k in range(5)], padding=True), dataset="in-test")
    (folder / "history.csv").write_text("user_id,item_id,timestamp\nann,i1,1000\nben,i2,2000\n")
    return run, folder / "history.csv"


@pytest.mark.parametrize("command, change, expected", [
    ("replay", "kafka password", "Kafka at 127.0.0.1:9094 refused the credentials of user 'slsrec' (SCRAM-SHA-512)"),
    ("replay", "kafka CA", "Kafka at 127.0.0.1:9094: TLS handshake failed"),
    ("replay", "kafka plaintext", "Kafka at 127.0.0.1:9094 did not answer within 10 s"),
    ("publish", "redis password", "Redis at 127.0.0.1:6380 refused the credentials"),
    ("publish", "redis CA", "Redis at 127.0.0.1:6380: TLS handshake failed"),
    ("publish", "redis plaintext", "(if that port serves TLS, use a rediss:// URL)"),
    ("serve", "kafka password", "Kafka at 127.0.0.1:9094 refused the credentials"),
    ("serve", "redis password", "Redis at 127.0.0.1:6380 refused the credentials"),
    ("retrain", "kafka CA", "Kafka at 127.0.0.1:9094: TLS handshake failed"),
])
def test_wrong_credentials_give_one_error_line_without_secrets(secure_services, tiny_run, tmp_path, command, change,
                                                               expected):
    settings, secrets = _wrong(local.secure_settings().model_copy(update={"runs_dir": tmp_path}), change)
    args = {"replay": ["replay", "data/clicks.sample.jsonl", "--limit", "5"],
            "publish": ["publish", "--run", str(tiny_run[0]), "--data", str(tiny_run[1])],
            "serve": ["serve", "--run", str(tiny_run[0])],
            "retrain": ["retrain", "--once", "--run-dir", str(tmp_path)]}[command]
    done = slsrec(settings, *args, timeout_s=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    for secret in secrets:
        assert secret not in done.stdout + done.stderr

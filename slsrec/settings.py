"""The one settings object: environment variables ``SLSREC_*``, overridden by CLI flags.

Every process (flow, replay, publish, retrain, benchmarks) reads its configuration from here, so a
deployment is configured in one place.

>>> s = Settings(kafka_bootstrap="broker:9092", kafka_sasl_password="hunter2")
>>> s.kafka_config()["bootstrap.servers"]
'broker:9092'
>>> "hunter2" in repr(s)
False
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLSREC_", extra="forbid", frozen=True)

    # Kafka. Security settings pass through unchanged to librdkafka.
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None  # e.g. PLAIN, SCRAM-SHA-512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    topic_clicks: str = "clicks"
    topic_recommendations: str = "recommendations"
    topic_dlq: str = "clicks.dlq"
    topic_sessions: str = "sessions"
    topic_drift: str = "drift"
    partitions: int = Field(4, ge=1, le=1024)  # of `clicks`; the unit of parallelism

    # Redis: the URL may carry a password (redis://:pw@host) or TLS (rediss://), so it is secret.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_cache_ttl_s: float = Field(5.0, ge=0)  # how stale the current version id and a cached absence may be
    # The flow's deadline per Redis call: past it the batch is served without Redis (degraded, flagged)
    # rather than waiting; a healthy local round trip is well under 1 ms.
    redis_timeout_ms: int = Field(50, ge=1)
    # Consecutive failed calls that open the circuit breaker (calls then skip Redis entirely) ...
    redis_breaker_failures: int = Field(3, ge=1)
    # ... and how long it stays open before one probe call; doubles while probes fail, up to the max.
    redis_breaker_reset_s: float = Field(1.0, gt=0)
    redis_breaker_max_reset_s: float = Field(5.0, gt=0)  # a probe costs at most one deadline

    # Sessions and serving.
    session_gap_s: int = Field(1800, ge=1)  # inactivity that closes a session (30 min)
    top_k: int = Field(10, ge=1, le=1000)
    exclude_seen: bool = True  # drop items already in the session from the ranking
    batch_size: int = Field(512, ge=1)  # micro-batch cap for the batched encoder step
    batch_timeout_ms: int = Field(1, ge=1)  # min pause between micro-batches; 5 ms doubled p50 and p99 (bench-stream)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Compute threads per worker (torch and numpy's BLAS): a worker is one Python thread, and workers
    # scale out by processes. More threads than cores made the serving core ~2x slower (bench-stream).
    serve_threads: int = Field(1, ge=1)
    # Bounded memory, per worker: past the first, the least recently active sessions close early; a
    # session holding the second closes before its next event. Both emit SessionClosed(reason="evicted").
    max_open_sessions: int = Field(1_000_000, ge=1)  # about 1 kB each (slsrec bench-sessions)
    max_session_events: int = Field(1_000, ge=1)

    # Local state.
    runs_dir: Path = Path("runs")
    recovery_dir: Path = Path("var/recovery")
    # How often the flow snapshots offsets and sessions: the most a restart replays, and a pause of the
    # stream while the sessions that changed are written (slsrec bench-sessions, docs/benchmarks.md).
    snapshot_interval_s: float = Field(10.0, gt=0)
    history_dir: Path = Path("var/history")
    # Liveness / readiness files of `slsrec serve` (one per process), probed by `slsrec health`.
    health_dir: Path = Path("var/health")
    health_max_age_s: float = Field(30.0, gt=0)  # a heartbeat older than this means the flow is stuck

    # The HTTP API (`slsrec api`): each user's latest recommendation, read from `recommendations`.
    api_host: str = "127.0.0.1"  # loopback by default, as every local service; 0.0.0.0 in a container
    api_port: int = Field(8000, ge=1, le=65535)
    api_group: str = "slsrec-api"  # its consumer group: replicas of the API share the partitions
    api_ttl_s: int = Field(7 * 24 * 3600, ge=1)  # a user's latest recommendation is served this long after it was made
    # Origins (scheme://host[:port]) whose pages may call the API, e.g. '["https://shop.example"]'; none by default.
    api_cors_origins: list[str] = []

    # Telemetry: OTLP when an endpoint is set; `console` prints spans and metrics instead.
    otel_endpoint: str | None = None
    otel_console: bool = False

    def kafka_config(self) -> dict[str, str]:
        """The librdkafka config dict for confluent-kafka clients (and Bytewax's Kafka connector)."""
        conf = {"bootstrap.servers": self.kafka_bootstrap, "security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = self.kafka_ssl_ca_location
        return conf

    def to_env(self) -> dict[str, str]:
        """``SLSREC_*`` variables that recreate these settings in a child process (secrets included,
        so pass them only to processes you start, never to logs)."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                env[f"SLSREC_{name.upper()}"] = (value.get_secret_value() if isinstance(value, SecretStr)
                                                 else json.dumps(value) if isinstance(value, list) else str(value))
        return env

    def torch_device(self) -> str:
        """Resolve ``auto`` to ``cuda`` when a GPU is present, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

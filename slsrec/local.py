"""Local Kafka and Redis: what ``slsrec local up|down|status``, the demo and the tests start.

Kafka is Apache Kafka from Maven Central (``deploy/pom.xml`` resolves it into the git-ignored
``deploy/lib/``), run on the installed JVM as one KRaft node (broker and controller) on 127.0.0.1:9092.
Redis is Debian's ``redis-server`` on 127.0.0.1:6379, installed with apt-get when missing. Both bind
loopback only, keep their files under ``var/`` and run in the background with their pid in
``var/run/``, so that ``down`` stops exactly what ``up`` started. A service that already answers on its
port without such a pid file was started by someone else: ``up`` reuses it and ``down`` leaves it alone.

``--secure`` (``secure=True`` below) is a second, separate pair with the same discipline: Kafka with
SASL/SCRAM-SHA-512 over TLS on 127.0.0.1:9094 (its controller on 9095, mutual TLS) and Redis with an
ACL user over TLS on 127.0.0.1:6380 (no plaintext port, the default user disabled). Certificates
come from :mod:`slsrec.certs`; passwords are random, made once per ``var/`` and kept in
``var/secure/credentials.json`` (mode 0600). :func:`secure_settings` is how clients use them.

``--redis-cluster`` (``redis_cluster=True``) is a third group: a Redis Cluster of three primaries
(no replicas) on 127.0.0.1:7001-7003, made with ``redis-cli --cluster create`` on first start; clients
reach it with ``SLSREC_REDIS_URL=redis+cluster://127.0.0.1:7001`` (:data:`REDIS_CLUSTER_URL`).

The app services' command lines are defined once, in :data:`APP_COMMANDS`; ``docker-compose.yml`` runs
the same ones (a test compares them).

>>> APP_COMMANDS["flow"]
('slsrec', 'serve')
>>> [s.name for s in SERVICES], [s.name for s in SECURE_SERVICES]
(['kafka', 'redis'], ['kafka-secure', 'redis-secure'])
>>> [s.port for s in REDIS_CLUSTER]
[7001, 7002, 7003]
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import SecretStr

from slsrec import certs
from slsrec.errors import ServiceError
from slsrec.kafka_check import QUIET
from slsrec.settings import Settings

ROOT = Path(__file__).resolve().parents[1]  # the repo root: deploy/ and var/ live here
DEPLOY = ROOT / "deploy"
LIB = DEPLOY / "lib"
VAR = ROOT / "var"
RUN, LOG = VAR / "run", VAR / "log"
KAFKA_DIR = VAR / "kafka"
KAFKA_HEAP = "-Xmx512m"
START_TIMEOUT_S = 90.0  # a cold JVM on a busy 2-core machine
STOP_TIMEOUT_S = 30.0  # Kafka's controlled shutdown takes a few seconds

SAMPLE_CLICKS = "data/clicks.sample.jsonl"
DEMO_RUN = "runs/demo"
# The app services, as the demo runs them locally and docker-compose.yml runs them in containers.
APP_COMMANDS: dict[str, tuple[str, ...]] = {
    "topics": ("slsrec", "local", "topics"),
    "publisher": ("slsrec", "publish", "--run", DEMO_RUN),
    "flow": ("slsrec", "serve"),
    "replay": ("slsrec", "replay", SAMPLE_CLICKS, "--as-fast-as-possible"),  # topic from settings
    "api": ("slsrec", "api"),
}


@dataclass(frozen=True)
class Service:
    name: str
    host: str
    port: int
    marker: str  # must appear in the process's command line, so a recycled pid is not mistaken for it

    @property
    def pid_file(self) -> Path:
        return RUN / f"{self.name}.pid"

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]  # kafka or redis

    @property
    def secure(self) -> bool:
        return self.name.endswith("-secure")


KAFKA = Service("kafka", "127.0.0.1", 9092, "kafka.Kafka")
REDIS = Service("redis", "127.0.0.1", 6379, "redis-server")
SERVICES = (KAFKA, REDIS)
SECURE_KAFKA = Service("kafka-secure", "127.0.0.1", 9094, "kafka-secure")  # its properties path names it
SECURE_REDIS = Service("redis-secure", "127.0.0.1", 6380, "redis-server")
SECURE_SERVICES = (SECURE_KAFKA, SECURE_REDIS)
REDIS_CLUSTER = tuple(Service(f"redis-cluster-{i}", "127.0.0.1", 7000 + i, "redis-server") for i in (1, 2, 3))
REDIS_CLUSTER_URL = f"redis+cluster://{REDIS_CLUSTER[0].host}:{REDIS_CLUSTER[0].port}"
SECURE_CONTROLLER_PORT = 9095
KAFKA_USER = REDIS_USER = "slsrec"  # the clients' user; the broker has its own, "broker"


@dataclass(frozen=True)
class ServiceStatus:
    """One service as ``up`` left it or ``status`` found it."""

    name: str
    address: str  # host:port
    pid: int | None  # our process (from var/run/NAME.pid); None when not running or not ours
    answering: bool
    started: bool = False  # started by this call of ``up``

    @property
    def owned(self) -> bool:
        """Started by ``slsrec local up`` (here or earlier), so ``down`` stops it."""
        return self.pid is not None

    def describe(self) -> str:
        who = f"pid {self.pid}" if self.owned else ("external (left alone by down)" if self.answering else "-")
        state = "started" if self.started else ("answering" if self.answering else "NOT answering")
        return f"{self.name:<6} {self.address:<16} {who:<32} {state}"


# --- public API --------------------------------------------------------------------------------------


def up(settings: Settings | None = None, timeout_s: float = START_TIMEOUT_S, adopt: bool = False,
       secure: bool = False, redis_cluster: bool = False) -> list[ServiceStatus]:
    """Start Kafka and Redis unless they already answer, wait for them, and create the topics.

    Idempotent: a service started by an earlier ``up`` is reused (same pid), one started by someone
    else is reused and not owned. With ``adopt`` (``slsrec local up``), services that a running
    :func:`session` started keep running after it ends. Raises :class:`ServiceError`, with the
    service's log tail, when a service cannot be installed, started or reached within ``timeout_s``.
    ``secure`` starts the secure pair instead (``settings`` default to :func:`secure_settings`);
    ``redis_cluster`` the Redis Cluster instead (``settings`` unused: it has no topics).
    """
    group = _group(secure, redis_cluster)
    with _lock():
        result = _up(settings or _default_settings(group), timeout_s, group)
        if adopt:
            _session_owned(group).unlink(missing_ok=True)
        return result


def down(names: list[str] | None = None, force: bool = False, secure: bool = False,
         redis_cluster: bool = False) -> list[str]:
    """Stop the services that ``up`` started (SIGTERM, then SIGKILL after a grace period).

    ``names`` limits it to some services. Services that were not started by ``up`` are left running,
    and nothing is stopped while a :func:`session` (a test run, the demo) uses them, unless ``force``.
    Returns the names of the services stopped. ``secure``: the secure pair, and only it;
    ``redis_cluster``: the Redis Cluster, and only it.
    """
    group = _group(secure, redis_cluster)
    with _lock():
        users = _live_sessions(group)
        if users and not force:
            raise ServiceError(f"in use by {len(users)} running session(s) (pid {', '.join(map(str, users))}): "
                               "not stopping (`slsrec local down --force` stops anyway)")
        return _down(names, group)


@contextmanager
def session(settings: Settings | None = None, timeout_s: float = START_TIMEOUT_S,
            secure: bool = False, redis_cluster: bool = False) -> Iterator[list[ServiceStatus]]:
    """Use the services for a while (a test run, the demo): ``up`` on entry, and on exit the last
    session still running stops what sessions started. Services started by ``up`` or by someone else
    are never stopped here. Several processes may hold sessions at once. The plain pair, the secure
    pair and the Redis Cluster keep separate leases.
    """
    group = _group(secure, redis_cluster)
    lease = _leases(group) / str(os.getpid())
    with _lock():
        _leases(group).mkdir(parents=True, exist_ok=True)
        lease.touch()
        try:
            statuses = _up(settings or _default_settings(group), timeout_s, group)
        except BaseException:
            lease.unlink(missing_ok=True)
            raise
        started = {s.name for s in statuses if s.started}
        owned = _session_owned(group)
        if started:
            owned.write_text(" ".join(sorted(started | set(owned.read_text().split() if owned.exists() else ()))))
    try:
        yield statuses
    finally:
        with _lock():
            lease.unlink(missing_ok=True)
            if owned.exists() and not _live_sessions(group):
                names = owned.read_text().split()
                owned.unlink()
                _down(names, group)


def status(secure: bool = False, redis_cluster: bool = False) -> list[ServiceStatus]:
    """Each service: our pid (if ``up`` started it and it runs) and whether it answers."""
    return [ServiceStatus(s.name, _addr(s), own_pid(s), _answers(s, timeout_s=2.0))
            for s in _services(_group(secure, redis_cluster))]


def secure_settings() -> Settings:
    """Settings that reach the secure pair: SCRAM over TLS to Kafka, the ACL user over TLS to Redis.

    Makes the credentials and certificates on first use. Its own recovery and history folders, since
    snapshots hold offsets of one Kafka. Other fields come from ``SLSREC_*`` as usual.
    """
    return Settings(**secure_fields())


def secure_fields() -> dict[str, object]:
    """The settings fields that :func:`secure_settings` sets (what ``slsrec local env --secure`` prints)."""
    creds = _credentials()
    tls = _tls(creds)
    ca = str(tls.ca_cert)
    return {
        "kafka_bootstrap": _addr(SECURE_KAFKA),
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": KAFKA_USER,
        "kafka_sasl_password": SecretStr(creds["kafka"]),
        "kafka_ssl_ca_location": ca,
        # redis-py takes TLS options from the URL's query, so every client built from the URL trusts the CA
        "redis_url": SecretStr(f"rediss://{REDIS_USER}:{creds['redis']}@{_addr(SECURE_REDIS)}/0"
                               f"?ssl_ca_certs={quote(ca)}"),
        "recovery_dir": VAR / "recovery-secure",
        "history_dir": VAR / "history-secure",
    }


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count. Keyed topics get ``settings.partitions``; low-volume ones 1.

    >>> topic_specs(Settings(partitions=2))
    {'clicks': 2, 'recommendations': 2, 'sessions': 2, 'clicks.dlq': 1, 'drift': 1}
    """
    keyed = (settings.topic_clicks, settings.topic_recommendations, settings.topic_sessions)
    return {**{t: settings.partitions for t in keyed}, settings.topic_dlq: 1, settings.topic_drift: 1}


def create_topics(settings: Settings, timeout_s: float = 30.0, replication_factor: int = 1) -> list[str]:
    """Create the project's topics where missing (one replica unless said otherwise). Returns the
    names created.

    Existing topics are left as they are; a partition count other than the settings' is reported on
    stderr (adding partitions would move keys, and so users, to other partitions).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = admin_client(settings)
    specs = topic_specs(settings)
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=n, replication_factor=replication_factor) for t, n in specs.items()],
        operation_timeout=timeout_s, request_timeout=timeout_s,
    )
    created = []
    for topic, fut in futures.items():
        try:
            fut.result(timeout=timeout_s)
            created.append(topic)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ServiceError(f"cannot create topic {topic!r} on {settings.kafka_bootstrap}: {e.args[0].str()}") from None
    # The controller confirms before every broker knows the topic: wait until clients can use it.
    deadline = time.monotonic() + timeout_s
    while not (found := _ready_partitions(admin, specs)):
        if time.monotonic() > deadline:
            raise ServiceError(f"topics {', '.join(specs)} were created but are not ready after {timeout_s:.0f} s")
        time.sleep(0.1)
    for topic, n in specs.items():
        if found[topic] != n:
            print(f"note: topic {topic!r} exists with {found[topic]} partitions, not {n}; left as it is",
                  file=sys.stderr)
    return created


def _ready_partitions(admin, specs: dict[str, int]) -> dict[str, int] | None:
    """Partition count of each topic once every partition has a leader; None before that."""
    topics = admin.list_topics(timeout=5).topics
    ready = all(t in topics and topics[t].error is None and topics[t].partitions
                and all(p.leader >= 0 for p in topics[t].partitions.values()) for t in specs)
    return {t: len(topics[t].partitions) for t in specs} if ready else None


@contextmanager
def scratch_topics(settings: Settings, prefix: str) -> Iterator[Settings]:
    """Settings whose topics are new and empty (named ``prefix`` + the usual name); deleted after.

    For tests and benchmarks that share the local broker with other runs.
    """
    fields = [f for f in Settings.model_fields if f.startswith("topic_")]
    scratch = settings.model_copy(update={f: prefix + getattr(settings, f) for f in fields})
    create_topics(scratch)
    try:
        yield scratch
    finally:
        admin = admin_client(scratch)  # kept alive until the futures resolve
        for fut in admin.delete_topics(list(topic_specs(scratch))).values():
            fut.result(timeout=30)


SCRATCH_REDIS_DBS = range(1, 16)  # db 0 is left to the demo and to people
# Machine-wide, not under var/: every checkout on this machine shares the services on the same ports
# (two worktrees that locked "db 1" each in their own var/ emptied each other's keys).
SCRATCH_LOCKS = Path(tempfile.gettempdir()) / "slsrec-scratch-locks"


@contextmanager
def scratch_redis_db(secure: bool = False) -> Iterator[str]:
    """URL of a local Redis database no other test or benchmark holds now, empty at start and end.

    Holders coordinate through lock files in :data:`SCRATCH_LOCKS`, so parallel test sessions never
    share one, from any checkout. ``secure``: a database of the secure Redis (the URL then carries
    the ACL user's password).
    """
    import redis

    base = secure_settings().redis_url.get_secret_value() if secure else f"redis://{REDIS.host}:{REDIS.port}/0"
    SCRATCH_LOCKS.mkdir(parents=True, exist_ok=True)
    for db in SCRATCH_REDIS_DBS:
        with open(SCRATCH_LOCKS / f"{_addr(SECURE_REDIS if secure else REDIS)}-db-{db}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            url = urlunsplit(urlsplit(base)._replace(path=f"/{db}"))
            client = redis.Redis.from_url(url)
            _empty(client)
            try:
                yield url
            finally:
                _empty(client)
            return
    raise ServiceError(f"all {len(SCRATCH_REDIS_DBS)} scratch Redis databases are in use; try again later")


@contextmanager
def scratch_redis_cluster() -> Iterator[str]:
    """URL of the local Redis Cluster, held by this caller alone (a cluster has one database: holders
    wait for each other through a lock file in :data:`SCRATCH_LOCKS`), empty at start and end."""
    from slsrec.store import connect

    SCRATCH_LOCKS.mkdir(parents=True, exist_ok=True)
    with open(SCRATCH_LOCKS / f"{_addr(REDIS_CLUSTER[0])}-cluster.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        client = connect(REDIS_CLUSTER_URL)
        _empty(client)
        try:
            yield REDIS_CLUSTER_URL
        finally:
            _empty(client)
            client.close()


def _empty(client) -> None:
    # Key by key, not FLUSHDB: the secure Redis's ACL user may not run @dangerous commands. A scratch
    # database holds a few keys (a version is a few hashes), so one list is small. A cluster client
    # scans every primary and splits the UNLINK by slot.
    if keys := list(client.scan_iter(count=1000)):
        client.unlink(*keys)


def admin_client(settings: Settings):
    """A confluent-kafka AdminClient for ``settings``, whose connection noise goes nowhere."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({**settings.kafka_config(), "logger": QUIET})


def ensure_command(command: str, package: str) -> str:
    """Path of ``command``; installs Debian ``package`` with apt-get first when it is missing."""
    found = shutil.which(command)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise ServiceError(f"{command!r} not found and apt-get is not available: install {package!r}")
    print(f"{command} not found: installing Debian package {package} (apt-get install -y {package})",
          file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another install may hold the dpkg lock
    install = [apt, *wait, "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        print("running apt-get update first", file=sys.stderr, flush=True)
        subprocess.run([apt, *wait, "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"apt-get install {package} failed: {_tail(done.stderr + done.stdout)}")
    found = shutil.which(command)
    if found is None:
        raise ServiceError(f"installed {package!r} but {command!r} is still not on PATH")
    return found


def resolve_jars() -> float:
    """Resolve Kafka's jars into deploy/lib/ with Maven unless they are there. Returns seconds spent."""
    if any(LIB.glob("kafka_2.13-*.jar")):
        return 0.0
    mvn = ensure_command("mvn", "maven")
    print("resolving Kafka from Maven Central into deploy/lib/ (first run only)", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    done = subprocess.run([mvn, "-q", "-B", "-f", str(DEPLOY / "pom.xml"), "dependency:copy-dependencies"],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0 or not any(LIB.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"mvn could not resolve Kafka (deploy/pom.xml): {_tail(done.stdout + done.stderr)}")
    return time.monotonic() - t0


def own_pid(svc: Service) -> int | None:
    """The pid in ``var/run/NAME.pid`` if that process still runs and is the service; else None.

    A stale pid file (process gone, or pid reused by another program) is removed.
    """
    try:
        pid = int(svc.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid) and svc.marker in _cmdline(pid):
        return pid
    svc.pid_file.unlink(missing_ok=True)
    return None


@dataclass(frozen=True)
class PrivatePair:
    """A plain Kafka and Redis of one tool alone, on their own ports and under ``var/{name}/``.

    ``slsrec chaos`` freezes, kills and empties its services; doing that to the shared pair (9092,
    6379) would break every other test and flow using them. ``up`` starts what does not answer yet
    (reusing what an earlier ``up`` started); ``down`` stops both.

    >>> pair = PrivatePair("chaos", kafka_port=19092, redis_port=16379)
    >>> pair.settings().kafka_bootstrap, pair.redis.name, pair.folder.name
    ('127.0.0.1:19092', 'redis-chaos', 'chaos')
    """

    name: str
    kafka_port: int
    redis_port: int
    host: str = "127.0.0.1"

    @property
    def folder(self) -> Path:
        return VAR / self.name

    @property
    def kafka(self) -> Service:
        return Service(f"kafka-{self.name}", self.host, self.kafka_port, f"kafka-{self.name}")

    @property
    def redis(self) -> Service:
        return Service(f"redis-{self.name}", self.host, self.redis_port, "redis-server")

    def settings(self, base: Settings | None = None) -> Settings:
        """``base`` (default: ``Settings()``) pointed at this pair, with its own recovery, history and
        health folders."""
        return (base or Settings()).model_copy(update={
            "kafka_bootstrap": _addr(self.kafka), "redis_url": SecretStr(f"redis://{_addr(self.redis)}/0"),
            "recovery_dir": self.folder / "recovery", "history_dir": self.folder / "history",
            "health_dir": self.folder / "health"})

    def up(self, settings: Settings | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start both unless they answer, and create the topics of ``settings`` (default: the usual ones)."""
        for svc in (self.kafka, self.redis):
            if (pid := own_pid(svc)) is None:
                if _answers(svc, timeout_s=2.0):
                    raise ServiceError(f"port {svc.port} answers but is not {svc.name}: pick other ports")
                pid = self._start(svc)
            _wait_until_answering(svc, pid, timeout_s)
        create_topics(settings or self.settings())

    def down(self) -> None:
        for svc in (self.kafka, self.redis):
            if (pid := own_pid(svc)) is not None:
                os.kill(pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                _terminate(pid, svc)
                svc.pid_file.unlink(missing_ok=True)

    def pid(self, svc: Service) -> int:
        if (pid := own_pid(svc)) is None:
            raise ServiceError(f"{svc.name} is not running (start it with PrivatePair.up)")
        return pid

    def freeze(self, svc: Service) -> None:
        """SIGSTOP: the process holds its sockets and answers nothing, like a stalled host."""
        os.kill(self.pid(svc), signal.SIGSTOP)

    def thaw(self, svc: Service) -> None:
        os.kill(self.pid(svc), signal.SIGCONT)

    def restart(self, svc: Service, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop and start again: Kafka keeps its data; Redis, which keeps nothing on disk, comes back empty."""
        pid = self.pid(svc)
        os.kill(pid, signal.SIGCONT)
        _terminate(pid, svc)
        _wait_until_answering(svc, self._start(svc), timeout_s)

    def _start(self, svc: Service) -> int:
        if svc.kind == "redis":
            return _start_redis(svc, self.folder / "redis")
        props = _render(DEPLOY / "kafka" / "server.properties", data_dir=self.folder / "kafka" / "data")
        props = props.replace(f"{KAFKA.host}:{KAFKA.port}", _addr(svc)).replace(
            f"{KAFKA.host}:{KAFKA.port + 1}", f"{svc.host}:{svc.port + 1}")  # the controller listener
        return _run_kafka(svc, self.folder / "kafka", props, self.folder / "recovery")


# --- shared use: a lock for up/down, leases for sessions ---------------------------------------------


@contextmanager
def _lock() -> Iterator[None]:
    """One ``up``/``down``/session change at a time, across processes (``var/run/local.lock``)."""
    RUN.mkdir(parents=True, exist_ok=True)
    with open(RUN / "local.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _services(group: str) -> tuple[Service, ...]:
    """The services of a group (each group keeps its own leases)."""
    return {"plain": SERVICES, "secure": SECURE_SERVICES, "redis-cluster": REDIS_CLUSTER}[group]


def _group(secure: bool, redis_cluster: bool) -> str:
    if secure and redis_cluster:
        raise ServiceError("the secure pair and the Redis Cluster are separate groups: pick one")
    return "secure" if secure else "redis-cluster" if redis_cluster else "plain"


def _default_settings(group: str) -> Settings:
    return secure_settings() if group == "secure" else Settings()


def _suffix(group: str) -> str:
    return "" if group == "plain" else f"-{group}"


def _leases(group: str) -> Path:
    # one empty file per process in a session, named by its pid
    return RUN / f"sessions{_suffix(group)}"


def _session_owned(group: str) -> Path:
    return RUN / f"session-owned{_suffix(group)}"  # names of the services a session started


def _live_sessions(group: str) -> list[int]:
    """Pids of other processes holding a session; leases of processes that died are removed."""
    live = []
    for lease in _leases(group).glob("*") if _leases(group).is_dir() else ():
        pid = int(lease.name)
        if pid != os.getpid() and _alive(pid):
            live.append(pid)
        elif pid != os.getpid():
            lease.unlink(missing_ok=True)
    return live


def _up(settings: Settings, timeout_s: float, group: str) -> list[ServiceStatus]:
    result = []
    for svc in _services(group):
        pid = own_pid(svc)
        if pid is None and _answers(svc, timeout_s=2.0):
            result.append(ServiceStatus(svc.name, _addr(svc), None, True))
            continue
        started = pid is None
        if started:
            pid = _START[svc.name](svc)
        _wait_until_answering(svc, pid, timeout_s)
        result.append(ServiceStatus(svc.name, _addr(svc), pid, True, started))
    if group == "redis-cluster":
        _form_cluster(timeout_s)
    else:
        create_topics(settings)
    return result


def _down(names: list[str] | None, group: str) -> list[str]:
    stopped = []
    for svc in _services(group):
        pid = own_pid(svc) if names is None or svc.name in names else None
        if pid is not None:
            _terminate(pid, svc)
            svc.pid_file.unlink(missing_ok=True)
            stopped.append(svc.name)
    if group == "redis-cluster" and not any(own_pid(svc) for svc in REDIS_CLUSTER):
        # Its data was never kept, so neither is its membership: the next up makes a fresh cluster.
        shutil.rmtree(VAR / "redis-cluster", ignore_errors=True)
    return stopped


# --- starting ----------------------------------------------------------------------------------------

_children: list[subprocess.Popen] = []  # kept so that exited children are reaped, not zombies


def _start_kafka(svc: Service) -> int:
    props = _render(DEPLOY / "kafka" / "server.properties", data_dir=KAFKA_DIR / "data")
    return _run_kafka(svc, KAFKA_DIR, props, VAR / "recovery")


def _start_secure_kafka(svc: Service) -> int:
    creds = _credentials()
    tls = _tls(creds)
    folder = VAR / "kafka-secure"
    # The plain broker's properties with the secure listeners appended (a later key wins).
    props = (_render(DEPLOY / "kafka" / "server.properties", data_dir=folder / "data")
             + _render(DEPLOY / "kafka" / "secure.properties", port=svc.port, controller_port=SECURE_CONTROLLER_PORT,
                       broker_password=creds["broker"], key_password=creds["key_store"],
                       keystore=tls.server_p12, truststore=tls.ca_cert))
    scram = [arg for user, key in (("broker", "broker"), (KAFKA_USER, "kafka"))
             for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={creds[key]}]")]
    return _run_kafka(svc, folder, props, secure_fields()["recovery_dir"], scram)


def _run_kafka(svc: Service, folder: Path, props_text: str, recovery_dir: Path, format_args: list[str] = ()) -> int:
    """Write ``folder``/server.properties (mode 0600: it may hold passwords), format the KRaft storage
    on first start (``format_args`` added, e.g. SCRAM users), and spawn the broker."""
    resolve_jars()
    java = ensure_command("java", "openjdk-17-jre-headless")
    data = folder / "data"
    props = folder / "server.properties"
    folder.mkdir(parents=True, exist_ok=True)
    certs.write_file(props, props_text.encode(), secret=True)
    jvm = [java, KAFKA_HEAP, "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={DEPLOY / 'kafka' / 'log4j2.properties'}", f"-Dkafka.logs.dir={LOG}",
           f"-Dslsrec.service={svc.name}", "-cp", str(LIB / "*")]
    if not (data / "meta.properties").exists():  # format the KRaft storage once
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        args = ["kafka.tools.StorageTool", "format", "--ignore-formatted", "-t", cluster_id, "-c", str(props),
                *format_args]
        # Through a java @argfile (mode 0600, removed after): passwords never show in the process list.
        argfile = folder / "format.args"
        certs.write_file(argfile, "\n".join(_java_quote(a) for a in args).encode(), secret=True)
        try:
            done = subprocess.run([*jvm, f"@{argfile}"], capture_output=True, text=True, cwd=ROOT)
        finally:
            argfile.unlink()
        if done.returncode != 0:
            # The tool echoes the SCRAM records (salted keys): leave those lines out of the error.
            out = "\n".join(x for x in (done.stdout + done.stderr).splitlines() if "ScramCredential" not in x)
            raise ServiceError(f"formatting Kafka storage in {data} failed: {_tail(out)}")
        # The flow's recovery snapshots hold offsets into the old storage: resuming from them would skip
        # (or wait for) records that no longer exist, so a fresh Kafka starts a fresh flow.
        shutil.rmtree(recovery_dir, ignore_errors=True)
    return _spawn(svc, [*jvm, "kafka.Kafka", str(props)])


def _render(template: Path, **values) -> str:
    """The template's text with each ``{name}`` replaced by its value."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"{{{name}}}", str(value))
    return text


def _java_quote(arg: str) -> str:
    """One argument of a java @argfile: double-quoted, backslashes and quotes escaped."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start_redis(svc: Service, data: Path | None = None, extra: tuple[str, ...] = ()) -> int:
    redis_server = ensure_command("redis-server", "redis-server")
    data = data or VAR / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Keeps nothing on disk: the long-term vectors are republished from the run directory.
    return _spawn(svc, [redis_server, "--bind", svc.host, "--port", str(svc.port), "--save", "",
                          "--appendonly", "no", "--daemonize", "no", "--dir", str(data), *extra])


def _start_cluster_node(svc: Service) -> int:
    # nodes.conf (the node's view of the cluster) stays in its folder until `down`, so a node that
    # stopped alone rejoins its cluster when started again.
    return _start_redis(svc, VAR / "redis-cluster" / str(svc.port),
                        ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "5000"))


def _cluster_info(svc: Service) -> dict[str, str]:
    """``CLUSTER INFO`` of one node as a dict (cluster_state, cluster_slots_assigned, ...)."""
    import redis

    raw = redis.Redis(svc.host, svc.port, socket_timeout=5).execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else raw
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _form_cluster(timeout_s: float) -> None:
    """Make the three nodes one cluster unless they are one (``redis-cli --cluster create`` assigns
    the 16,384 slots evenly), then wait until every node sees all slots served."""
    if all(int(_cluster_info(svc)["cluster_slots_assigned"]) == 0 for svc in REDIS_CLUSTER):
        cli = ensure_command("redis-cli", "redis-tools")
        done = subprocess.run([cli, "--cluster", "create", *map(_addr, REDIS_CLUSTER), "--cluster-replicas", "0",
                               "--cluster-yes"], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {_tail(done.stdout + done.stderr)}")
    deadline = time.monotonic() + timeout_s
    while (states := {svc.name: _cluster_info(svc) for svc in REDIS_CLUSTER}) and not all(
            i["cluster_state"] == "ok" and i["cluster_known_nodes"] == str(len(REDIS_CLUSTER)) for i in states.values()):
        if time.monotonic() > deadline:
            seen = ", ".join(f"{name} {i['cluster_state']} ({i['cluster_slots_assigned']} slots assigned)"
                             for name, i in states.items())
            raise ServiceError(f"the Redis Cluster is not ok after {timeout_s:.0f} s: {seen} "
                               "(`slsrec local down --redis-cluster` forgets it; `up` then makes a new one)")
        time.sleep(0.25)


def _start_secure_redis(svc: Service) -> int:
    redis_server = ensure_command("redis-server", "redis-server")
    creds = _credentials()
    tls = _tls(creds)
    data = VAR / "redis-secure"
    data.mkdir(parents=True, exist_ok=True)
    # No default user; the app's user reaches only its own keys and never @dangerous commands
    # (FLUSHALL, CONFIG, KEYS, DEBUG, ...).
    acl = data / "users.acl"
    certs.write_file(acl, (f"user default off\nuser {REDIS_USER} on >{creds['redis']} ~slsrec:* resetchannels "
                           "+@all -@dangerous\n").encode(), secret=True)
    return _spawn(svc, [redis_server, "--bind", svc.host, "--port", "0", "--tls-port", str(svc.port),
                        "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
                        "--tls-ca-cert-file", str(tls.ca_cert), "--tls-auth-clients", "no", "--aclfile", str(acl),
                        "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(data)])


_START = {"kafka": _start_kafka, "redis": _start_redis, "kafka-secure": _start_secure_kafka,
          "redis-secure": _start_secure_redis, **{svc.name: _start_cluster_node for svc in REDIS_CLUSTER}}


def _credentials() -> dict[str, str]:
    """The secure pair's random passwords, made once per ``var/`` (``var/secure/credentials.json``, 0600).

    New passwords make the old certificates (their key store password) and the old Kafka storage
    (its SCRAM users) useless, so both are removed then. Safe against a concurrent first call.
    """
    folder = VAR / "secure"
    path = folder / "credentials.json"
    if not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # only this user may list what is in it
        creds = {name: secrets.token_urlsafe(24) for name in ("kafka", "broker", "redis", "key_store")}
        draft = folder / f"credentials.{os.getpid()}.tmp"
        certs.write_file(draft, json.dumps(creds).encode(), secret=True)
        try:
            os.link(draft, path)  # fails if another process got there first: then theirs are the ones
            shutil.rmtree(folder / "tls", ignore_errors=True)
            shutil.rmtree(VAR / "kafka-secure", ignore_errors=True)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return json.loads(path.read_text())


def _tls(creds: dict[str, str]) -> certs.TlsFiles:
    """The secure pair's CA and server certificate, issued on first use (into a temporary folder, then
    renamed, so a concurrent caller never sees half a set)."""
    tls = certs.TlsFiles(VAR / "secure" / "tls")
    if not tls.exists():
        draft = certs.issue(tls.folder.with_name(f"tls.{os.getpid()}.tmp"), key_password=creds["key_store"])
        try:
            draft.folder.rename(tls.folder)
        except OSError:  # another process renamed its set first
            shutil.rmtree(draft.folder)
    return tls


def _spawn(svc: Service, cmd: list[str]) -> int:
    LOG.mkdir(parents=True, exist_ok=True)
    RUN.mkdir(parents=True, exist_ok=True)
    out = LOG / f"{svc.name}.out"  # stdout/stderr; Kafka's own log is var/log/NAME.log
    with open(out, "ab") as f:
        # A new session: Ctrl-C in the terminal that ran `up` (or a test run) does not stop it.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    _children.append(proc)
    svc.pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_until_answering(svc: Service, pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            svc.pid_file.unlink(missing_ok=True)
            raise ServiceError(f"{svc.name} exited while starting; {_log_tail(svc)}")
        if _answers(svc, timeout_s=2.0):
            return
        time.sleep(0.25)
    raise ServiceError(f"{svc.name} (pid {pid}) did not answer on {_addr(svc)} within {timeout_s:.0f} s; "
                       f"{_log_tail(svc)}")


# --- probing and stopping ----------------------------------------------------------------------------


def _answers(svc: Service, timeout_s: float) -> bool:
    try:
        socket.create_connection((svc.host, svc.port), timeout=timeout_s).close()
    except OSError:
        return False
    settings = secure_settings() if svc.secure else Settings(kafka_bootstrap=_addr(svc),
                                                              redis_url=SecretStr(f"redis://{_addr(svc)}/0"))
    if svc.kind == "redis":
        import redis

        try:
            client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=timeout_s,
                                          socket_connect_timeout=timeout_s)
            return bool(client.ping())
        except redis.RedisError:
            return False
    from confluent_kafka import KafkaException

    try:
        meta = admin_client(settings).list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(meta.brokers)


def _terminate(pid: int, svc: Service) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    print(f"{svc.name} (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: killing it", file=sys.stderr)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    for proc in _children:
        if proc.pid == pid:
            return proc.poll() is None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _addr(svc: Service) -> str:
    return f"{svc.host}:{svc.port}"


def _log_tail(svc: Service, lines: int = 12) -> str:
    """The end of the service's own log (Kafka's var/log/NAME.log) and of its stdout/stderr."""
    logs = [p for p in (LOG / f"{svc.name}.log", LOG / f"{svc.name}.out") if p.exists() and p.stat().st_size]
    return "\n".join(f"last lines of {os.path.relpath(p)}:\n{_tail(p.read_text(errors='replace'), lines)}"
                     for p in logs) or "no log output"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"

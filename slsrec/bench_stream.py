"""``slsrec bench-stream``: the flow's throughput and latency through the local Kafka and Redis.

Three phases on their own fresh topics, one flow worker process (``slsrec serve``), CPU only:

1. **Throughput**: a backlog of events is produced first, then the flow drains it
   (``--exit-at-end``); events/s = backlog / (last - first recommendation's Kafka timestamp).
2. **Latency**: the flow tails the topic while events are produced at half that rate (or at
   ``--load-rate``); latency is a
   recommendation's Kafka timestamp minus its event's ``ts`` (set when the event is produced). The
   flow's CPU meanwhile gives its events per CPU second under load, where micro-batches are small.
3. **Naive**: the backlog's first events through a per-event loop (one Redis read and one model
   call per event, no micro-batching, no cache), from Kafka to Kafka, in this process.

The model is a run's (``--run``) or a randomly initialised SLSRec of ML-1M size (6,040 users, 3,706
items, d=64): the weights do not change the cost. Long-term vectors of every user are published to
an otherwise unused Redis database, so the demo's published version is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Consumer, Producer
from pydantic import SecretStr

from schemas.events import InvalidEvent, decode_click
from slsrec import local
from slsrec.benchmark import machine
from slsrec.checkpoint import load_run, save_run
from slsrec.codec import Click, to_model
from slsrec.data import Vocab
from slsrec.errors import ServiceError
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.serving import Origin, Recommender, SessionTable, compute_threads
from slsrec.settings import Settings
from slsrec.store import LongTerm, LongTermStore

ML1M_USERS, ML1M_ITEMS = 6040, 3706
UNKNOWN_ITEM_RATE = 0.01  # new products in the stream
FLOW_TIMEOUT_S = 600.0


@dataclass
class BenchResult:
    machine: str
    model: str
    events: int
    flow_events_per_s: float
    flow_events_per_cpu_s: float  # per CPU second of the flow process (start-up excluded)
    load_events_per_s: float  # the paced load of the latency phase
    load_events_per_cpu_s: float  # ... per CPU second of the flow meanwhile: what small micro-batches cost
    latency_events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    naive_events: int
    naive_events_per_s: float
    load_average: tuple[float, float]  # 1-min load average of the machine at start and end
    latency_s: float
    snapshot_interval_s: float  # the flow's recovery snapshots: each one pauses the stream
    worst_seconds: list[tuple[int, float]]  # (second of the load, its p99 ms): where the tail comes from
    fixed_load: bool = False  # the latency phase ran at a given rate, not at half the measured one

    @property
    def ratio(self) -> float:
        return self.flow_events_per_s / self.naive_events_per_s


def bench(settings: Settings, run: str | None = None, events: int = 100_000, latency_s: float = 20.0,
          naive_events: int = 5_000, load_rate: float | None = None) -> BenchResult:
    """One run of the three phases; ``load_rate`` fixes the latency phase's events/s (default: half
    the throughput just measured)."""
    load_start = os.getloadavg()[0]
    # The local Kafka and Redis: started here if they are not running, and then stopped at the end.
    with (local.session(settings), tempfile.TemporaryDirectory(prefix="slsrec-bench-") as tmp,
          local.scratch_redis_db() as redis_url, contextlib.ExitStack() as phases):
        settings = settings.model_copy(update={"redis_url": SecretStr(redis_url), "device": "cpu"})
        run_dir = Path(run) if run else _ml1m_sized_run(Path(tmp) / "ml1m-random")
        loaded = load_run(run_dir)
        users, items = loaded.users.raw, loaded.items.raw
        store = LongTermStore(settings.redis_url)
        rng = np.random.default_rng(0)
        d = loaded.model.config.d
        # Random long-term states with a full window: the cost of serving does not depend on values.
        full = loaded.model.config.long_len
        states = {u: LongTerm((rng.normal(size=d) / np.sqrt(d)).astype(np.float32), 0.0, full) for u in users}
        version = store.publish(None, states, meta={"run": str(run_dir.resolve())}).version

        # 1. Throughput: drain a backlog. The flow's CPU time, less that of a run over an empty
        # topic (start-up and shutdown), gives events per CPU second, which other load cannot skew.
        def fresh_topics(phase: str) -> Settings:
            return phases.enter_context(local.scratch_topics(settings, f"bench-{phase}-{uuid.uuid4().hex[:8]}."))

        s0 = fresh_topics("idle")
        idle_cpu = _child_cpu(lambda: _run_flow(s0, run_dir, Path(tmp) / "rec0", exit_at_end=True))
        s1 = fresh_topics("tput")
        stream = _events(users, items, events, rng)
        _produce(s1, stream)
        busy_cpu = _child_cpu(lambda: _run_flow(s1, run_dir, Path(tmp) / "rec1", exit_at_end=True))
        first, last, n = _timestamps(s1, s1.topic_recommendations, events)
        if n < events:
            raise ServiceError(f"the flow answered {n} of {events} events")
        flow_eps = events / max((last - first) / 1000.0, 1e-3)

        # 2. Latency at half the sustained rate.
        s2 = fresh_topics("lat")
        rate = load_rate or flow_eps / 2
        flow = _run_flow(s2, run_dir, Path(tmp) / "rec2", exit_at_end=False)
        try:
            _wait_until_serving(s2, users[0], items[0])
            start_ms, cpu0 = int(time.time() * 1000), _process_cpu(flow.pid)
            sent = _paced(s2, _events(users, items, int(rate * latency_s), rng), rate)
            at, lat = _latencies(s2, sent + 1, start_ms)
            load_cpu = _process_cpu(flow.pid) - cpu0
        finally:
            flow.terminate()
            flow.wait(60)
        at, warm = at[len(lat) // 20:], lat[len(lat) // 20:]  # the first 5% include the flow's warm-up
        # 3. The naive per-event path over the same kind of events.
        with compute_threads(settings.serve_threads):  # as the flow computes
            naive_eps = _naive(s1, loaded, store, version, min(naive_events, events))
    return BenchResult(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {machine()['cpu']}",
        model=f"{loaded.name} n_items={len(items)} n_users={len(users)} d={d} ({run_dir.name})",
        events=events, flow_events_per_s=flow_eps, flow_events_per_cpu_s=events / max(busy_cpu - idle_cpu, 1e-3),
        load_events_per_s=rate, load_events_per_cpu_s=sent / max(load_cpu, 1e-3), latency_events=len(warm),
        p50_ms=float(np.percentile(warm, 50)), p99_ms=float(np.percentile(warm, 99)), max_ms=float(warm.max()),
        worst_seconds=worst_seconds(at, warm),
        naive_events=min(naive_events, events), naive_events_per_s=naive_eps,
        load_average=(load_start, os.getloadavg()[0]), latency_s=latency_s,
        snapshot_interval_s=settings.snapshot_interval_s, fixed_load=load_rate is not None,
    )


def report(results: list[BenchResult], sessions: list[dict] | None = None) -> str:
    """Every run's figures and their medians as one markdown table (copy it into docs/benchmarks.md),
    then the serving core against the number of open sessions (``slsrec bench-sessions``)."""
    r = results[0]
    cols = [("events/s", lambda x: f"{x.flow_events_per_s:,.0f}"),
            ("events per CPU s", lambda x: f"{x.flow_events_per_cpu_s:,.0f}"),
            ("load events/s", lambda x: f"{x.load_events_per_s:,.0f}"),
            ("under load, events per CPU s", lambda x: f"{x.load_events_per_cpu_s:,.0f}"),
            ("p50 ms", lambda x: f"{x.p50_ms:.1f}"), ("p99 ms", lambda x: f"{x.p99_ms:.1f}"),
            ("max ms", lambda x: f"{x.max_ms:.0f}"), ("worst second p99 ms", lambda x: f"{x.worst_seconds[0][1]:.0f}"),
            ("naive events/s", lambda x: f"{x.naive_events_per_s:,.0f}"), ("ratio", lambda x: f"{x.ratio:.1f}x"),
            ("load average", lambda x: f"{x.load_average[0]:.1f}-{x.load_average[1]:.1f}")]
    median = _median(results)
    lines = [f"machine     {r.machine}", f"model       {r.model}",
             f"setup       backlog of {r.events:,} events, 1 worker, CPU; latency at "
             f"{f'{r.load_events_per_s:,.0f} events/s' if r.fixed_load else 'half the rate'} for "
             f"{r.latency_s:g} s, a snapshot every {r.snapshot_interval_s:g} s; naive: {r.naive_events:,} events "
             "(per event: 1 Redis read, 1 model call)", "",
             "| run | " + " | ".join(name for name, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k + 1} | " + " | ".join(f(x) for _, f in cols) + " |" for k, x in enumerate(results)]
    if len(results) > 1:
        lines.append(f"| median of {len(results)} | " + " | ".join(f(median) for _, f in cols) + " |")
    if sessions:
        from slsrec.bench_sessions import report as sessions_report
        lines += ["", sessions_report(sessions, [x["open_sessions"] for x in sessions[:-1]], sessions[-1]["users"],
                                      sessions[-1]["cap"], None)]
    lines += ["", "command     " + ("" if r.snapshot_interval_s == Settings.model_fields["snapshot_interval_s"].default
                                   else f"SLSREC_SNAPSHOT_INTERVAL_S={r.snapshot_interval_s:g} ")
              + f"slsrec bench-stream --events {r.events} --latency-s {r.latency_s:g} --naive-events {r.naive_events} "
              f"--repeats {len(results)}" + (f" --load-rate {r.load_events_per_s:g}" if r.fixed_load else "")
              + ("" if sessions else " --no-sessions")]
    return "\n".join(lines)


def _median(results: list[BenchResult]) -> BenchResult:
    """Each figure's median over the runs (the worst second: the median of each run's worst)."""
    def med(get):
        return float(np.median([get(x) for x in results]))
    r = results[0]
    return BenchResult(
        r.machine, r.model, r.events, med(lambda x: x.flow_events_per_s), med(lambda x: x.flow_events_per_cpu_s),
        med(lambda x: x.load_events_per_s), med(lambda x: x.load_events_per_cpu_s), r.latency_events, med(lambda x: x.p50_ms), med(lambda x: x.p99_ms),
        med(lambda x: x.max_ms), r.naive_events, med(lambda x: x.naive_events_per_s),
        (min(x.load_average[0] for x in results), max(x.load_average[1] for x in results)), r.latency_s,
        r.snapshot_interval_s, [(0, med(lambda x: x.worst_seconds[0][1]))], r.fixed_load)


# ---- setup ------------------------------------------------------------------------------------------


def _ml1m_sized_run(path: Path) -> Path:
    torch.manual_seed(0)
    model = SLSRec(SLSRecConfig(n_users=ML1M_USERS, n_items=ML1M_ITEMS))
    users = Vocab([f"u{k}" for k in range(1, ML1M_USERS + 1)], padding=False)
    items = Vocab([str(k) for k in range(1, ML1M_ITEMS + 1)], padding=True)
    return save_run(path, model, name="slsrec", users=users, items=items, dataset="random, ML-1M sized")


def _events(users: list[str], items: list[str], n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(user, item) pairs: users uniform, items Zipf-like (popular items dominate, as in ML-1M)."""
    popularity = 1.0 / np.arange(1, len(items) + 1) ** 0.8
    chosen = rng.choice(len(items), size=n, p=popularity / popularity.sum())
    who = rng.integers(len(users), size=n)
    unknown = rng.random(n) < UNKNOWN_ITEM_RATE
    return [(users[u], f"new-{k}" if unk else items[i]) for k, (u, i, unk) in enumerate(zip(who, chosen, unknown))]


def _click(user: str, item: str) -> bytes:
    """One click, its ts the produce time. Formatted, not ``json.dumps``: the producer shares the
    machine with the flow it measures, so it should cost little (ids here never need escaping)."""
    return b'{"event_id":"%s","user_id":"%s","item_id":"%s","ts":%d,"event_type":"view"}' % (
        uuid.uuid4().hex.encode(), user.encode(), item.encode(), time.time_ns() // 1_000_000)


def _produce(settings: Settings, stream: list[tuple[str, str]]) -> None:
    p = Producer({**settings.kafka_config(), "linger.ms": 5, "queue.buffering.max.messages": 1_000_000})
    for user, item in stream:
        p.produce(settings.topic_clicks, _click(user, item), key=user.encode())
        p.poll(0)
    p.flush(60)


def _paced(settings: Settings, stream: list[tuple[str, str]], rate: float) -> int:
    """Produce at ``rate`` events/s in 2 ms slices; the event ts is its produce time."""
    p = Producer({**settings.kafka_config(), "linger.ms": 0})
    t0, sent = time.perf_counter(), 0
    while sent < len(stream):
        due = min(len(stream), int((time.perf_counter() - t0) * rate) + 1)
        for user, item in stream[sent:due]:
            p.produce(settings.topic_clicks, _click(user, item), key=user.encode())
        sent = max(sent, due)
        p.poll(0)
        time.sleep(0.002)
    p.flush(60)
    return sent


def _run_flow(settings: Settings, run_dir: Path, recovery_dir: Path, exit_at_end: bool) -> subprocess.Popen:
    """`slsrec serve` in a child process on the bench's topics; waits for it when ``exit_at_end``."""
    env = {**os.environ, **settings.model_copy(update={"recovery_dir": recovery_dir}).to_env()}
    cmd = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--run", str(run_dir)]
    child = subprocess.Popen(cmd + (["--exit-at-end"] if exit_at_end else []), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if exit_at_end:
        try:
            _, err = child.communicate(timeout=FLOW_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            raise ServiceError(f"the flow did not drain the backlog in {FLOW_TIMEOUT_S:.0f} s") from None
        if child.returncode:
            raise ServiceError(f"the flow failed: {err.strip().splitlines()[-1] if err.strip() else child.returncode}")
    return child


def _child_cpu(fn) -> float:
    """CPU seconds (user + system) that the child processes finished during ``fn`` used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    fn()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) that a running process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _consumer(settings: Settings, topic: str) -> Consumer:
    c = Consumer({**settings.kafka_config(), "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    return c


def _drain(settings: Settings, topic: str, n: int, timeout_s: float = 120.0):
    c = _consumer(settings, topic)
    deadline, got = time.monotonic() + timeout_s, 0
    try:
        while got < n and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                if m.error() is None:
                    got += 1
                    yield m
    finally:
        c.close()


def _timestamps(settings: Settings, topic: str, n: int) -> tuple[int, int, int]:
    ts = [m.timestamp()[1] for m in _drain(settings, topic, n)]
    return min(ts), max(ts), len(ts)


def _wait_until_serving(settings: Settings, user: str, item: str, timeout_s: float = 120.0) -> None:
    _produce(settings, [(user, item)])
    if not list(_drain(settings, settings.topic_recommendations, 1, timeout_s)):
        raise ServiceError(f"the flow gave no recommendation within {timeout_s:.0f} s")


def _latencies(settings: Settings, n: int, since_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """(ms since ``since_ms``, latency ms) in event order of the events produced from ``since_ms`` on;
    latency is recommendation produce time minus event produce time. The warm-up event is left out
    by its time, since the recommendations' partitions are read in no particular order."""
    got = [(json.loads(m.value())["event_ts"], m.timestamp()[1])
           for m in _drain(settings, settings.topic_recommendations, n)]
    if len(got) < n:
        raise ServiceError(f"only {len(got)} of {n} recommendations arrived")
    kept = np.array([(ev_ts - since_ms, rec_ts - ev_ts) for ev_ts, rec_ts in sorted(got) if ev_ts >= since_ms],
                    dtype=np.float64).reshape(-1, 2)
    return kept[:, 0], kept[:, 1]


def worst_seconds(at_ms: np.ndarray, latency_ms: np.ndarray, n: int = 3) -> list[tuple[int, float]]:
    """The ``n`` seconds with the highest p99 latency, as (second, p99 ms), slowest first.

    >>> worst_seconds(np.array([0, 500, 1000, 1500, 2100]), np.array([5, 6, 90, 7, 8]), n=2)
    [(1, 89.17), (2, 8.0)]
    """
    second = (at_ms // 1000).astype(np.int64)
    p99 = [(int(t), round(float(np.percentile(latency_ms[second == t], 99)), 2)) for t in np.unique(second)]
    return sorted(p99, key=lambda x: -x[1])[:n]


def _naive(settings: Settings, run, store: LongTermStore, version: str, n: int) -> float:
    """Per event: decode, one Redis read, one model call on a batch of one, produce."""
    def one_read(user_ids):
        return version, store.get_many(version, user_ids)

    rec = Recommender(run.model, run.items, one_read, model_version="naive", gap_ms=settings.session_gap_s * 1000,
                      max_segment=run.model.config.max_segment, top_k=settings.top_k, device="cpu", users=run.users)
    table = SessionTable()
    p = Producer({**settings.kafka_config(), "linger.ms": 0})
    c = _consumer(settings, settings.topic_clicks)
    done, t0 = 0, None
    while done < n:
        m = c.poll(5.0)
        if m is None:
            raise ServiceError("the naive path ran out of events")
        t0 = t0 or time.perf_counter()
        try:
            ev = decode_click(m.value())
        except InvalidEvent:
            continue
        click = Click(ev.event_id, ev.user_id, ev.item_id, ev.ts, ev.event_type, ev.context)
        for out in rec.process(table, [(click, Origin(m.value(), m.topic(), m.partition(), m.offset()))]):
            p.produce(settings.topic_recommendations, to_model(out).model_dump_json().encode(), key=ev.user_id.encode())
            p.poll(0)
        done += 1
    p.flush(30)
    c.close()
    return n / (time.perf_counter() - t0)

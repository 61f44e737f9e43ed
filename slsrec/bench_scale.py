"""``slsrec bench-stream --processes 1,2,4``: how the flow scales out over worker processes.

For each process count N, on fresh topics whose ``clicks`` has max(N, 4) partitions (at least one
per worker), with the model, events and long-term vectors of ``slsrec bench-stream``:

1. **Throughput**: a backlog is produced, then ``slsrec serve --processes N`` starts on it. A Bytewax
   cluster starts processing once all its processes are up, so the window runs from the moment
   every worker has answered (the ``slsrec-worker`` header of its recommendations) to the last
   answer: events/s is the events answered in it over its length, and events per CPU second divide
   them by the CPU time (user + system) that the worker processes spent in it, which other load on
   the machine cannot skew. Events per worker count every answer by its header.
2. **Restart**: then every process of the cluster is killed (SIGKILL) and started again on the same
   recovery directory while probe events arrive every 50 ms: the seconds from the kill to the first
   answer to an event sent after it, and until every worker has answered one (the start-up of the
   processes and the resume from the last snapshot).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import SecretStr

from flows.kafka_sink import WORKER_HEADER
from slsrec import local
from slsrec.bench_stream import _click, _consumer, _events, _ml1m_sized_run, _produce
from slsrec.benchmark import machine
from slsrec.checkpoint import load_run
from slsrec.errors import ServiceError
from slsrec.settings import Settings
from slsrec.store import LongTerm, LongTermStore

FLOW_TIMEOUT_S = 300.0
PROBE_EVERY_S = 0.05


@dataclass
class ScaleRow:
    processes: int
    partitions: int
    load_average: float  # 1-min load average of the machine when the row started
    events: int
    events_per_s: float
    events_per_cpu_s: float
    per_worker: dict[str, int]  # worker index -> events it answered
    restart_first_s: float  # kill -> the first recommendation of an event sent after the kill
    restart_all_s: float  # kill -> every worker has answered such an event

    @property
    def imbalance(self) -> float:
        """Busiest worker over the mean (1.0 = even)."""
        counts = list(self.per_worker.values())
        return max(counts) / (sum(counts) / len(counts))


@dataclass
class ScaleResult:
    machine: str
    model: str
    rows: list[ScaleRow]


def bench(settings: Settings, processes: list[int], run: str | None = None, events: int = 40_000) -> ScaleResult:
    torch.set_num_threads(1)
    with (local.session(settings), tempfile.TemporaryDirectory(prefix="slsrec-scale-") as tmp,
          local.scratch_redis_db() as redis_url, contextlib.ExitStack() as topics):
        settings = settings.model_copy(update={"redis_url": SecretStr(redis_url), "device": "cpu"})
        run_dir = Path(run) if run else _ml1m_sized_run(Path(tmp) / "ml1m-random")
        loaded = load_run(run_dir)
        users, items, rng = loaded.users.raw, loaded.items.raw, np.random.default_rng(0)
        d, full = loaded.model.config.d, loaded.model.config.long_len
        # Random long-term states with a full window, as bench-stream publishes them.
        LongTermStore(settings.redis_url).publish(None, {
            u: LongTerm((rng.normal(size=d) / np.sqrt(d)).astype(np.float32), 0.0, full) for u in users},
            meta={"run": str(run_dir.resolve())})
        rows = []
        for n in processes:
            s = topics.enter_context(local.scratch_topics(settings.model_copy(update={"partitions": max(n, 4)}),
                                                          f"scale-{n}-{uuid.uuid4().hex[:8]}."))
            rows.append(_row(s, run_dir, n, events, users, items, rng, Path(tmp) / f"recovery-{n}"))
    return ScaleResult(machine=f"{os.cpu_count()} cores, {machine()['cpu']}",
                       model=f"{loaded.name} n_items={len(items)} n_users={len(users)} d={d} ({run_dir.name})",
                       rows=rows)


def _row(settings: Settings, run_dir: Path, n: int, events: int, users: list[str], items: list[str],
         rng: np.random.Generator, recovery_dir: Path) -> ScaleRow:
    load = os.getloadavg()[0]
    _produce(settings, _events(users, items, events, rng))
    reader = _consumer(settings, settings.topic_recommendations)
    cluster = _start(settings, run_dir, n, recovery_dir)
    try:
        per_worker: dict[str, int] = {}
        answered, window = 0, None  # window: (time, answers so far, worker CPU seconds) once all serve
        deadline = time.monotonic() + FLOW_TIMEOUT_S
        while answered < events:
            if time.monotonic() > deadline or cluster.poll() is not None:
                raise ServiceError(f"{n} processes answered {answered} of {events} events; the end of "
                                   f"{_log(recovery_dir)}:\n" + "\n".join(_log(recovery_dir).read_text().splitlines()[-15:]))
            for m in reader.consume(10_000, 0.05):
                if m.error() is None:
                    worker = _worker(m)
                    per_worker[worker] = per_worker.get(worker, 0) + 1
                    answered += 1
            if window is None and len(per_worker) == n:
                window = time.monotonic(), answered, _cpu_s(_workers(cluster.pid))
        busy_s, cpu_s = time.monotonic() - window[0], _cpu_s(_workers(cluster.pid)) - window[2]
        killed = time.time()
        os.killpg(cluster.pid, signal.SIGKILL)  # the parent and its worker processes
        cluster.wait()
        cluster = _start(settings, run_dir, n, recovery_dir)
        first, every = _probe_until_all_answer(settings, reader, users[: 8 * n], n, since_ms=int(killed * 1000))
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already when the cluster failed
            os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait()
        reader.close()
    in_window = events - window[1]
    return ScaleRow(n, settings.partitions, load, events, in_window / max(busy_s, 1e-3), in_window / max(cpu_s, 1e-3),
                    dict(sorted(per_worker.items(), key=lambda kv: int(kv[0]))), first - killed, every - killed)


def _workers(parent: int) -> list[int]:
    """Pids of the worker processes of `slsrec serve` ``parent`` (itself when it runs alone)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children] or [parent]


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of running processes (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _probe_until_all_answer(settings: Settings, reader, users: list[str], n: int, since_ms: int) -> tuple[float, float]:
    """Send an event of each probe user every 50 ms until every one of the ``n`` workers has answered
    one sent after ``since_ms``; returns (time of the first such answer, time the last worker answered)."""
    from confluent_kafka import Producer

    producer = Producer({**settings.kafka_config(), "linger.ms": 0})
    seen: set[str] = set()
    first = None
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise ServiceError(f"only workers {sorted(seen)} of {n} answered within {FLOW_TIMEOUT_S:.0f} s")
        for u in users:
            producer.produce(settings.topic_clicks, _click(u, "1"), key=u.encode())
        producer.poll(0)
        for m in reader.consume(10_000, PROBE_EVERY_S):
            if m.error() is None and _event_ts(m) >= since_ms:
                first = first or time.time()
                seen.add(_worker(m))
    producer.flush(10)
    return first, time.time()


def _event_ts(m) -> int:
    return json.loads(m.value())["event_ts"]


def _worker(m) -> str:
    return dict(m.headers() or [])[WORKER_HEADER].decode()


def _start(settings: Settings, run_dir: Path, n: int, recovery_dir: Path) -> subprocess.Popen:
    """`slsrec serve --processes n`, tailing, in its own process group (so that a kill reaches its workers)."""
    env = {**os.environ, **settings.model_copy(update={"recovery_dir": recovery_dir}).to_env()}
    cmd = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--run", str(run_dir),
           "--processes", str(n)]
    with open(_log(recovery_dir), "a") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(recovery_dir: Path) -> Path:
    return recovery_dir.with_suffix(".log")


def report(r: ScaleResult, events: int) -> str:
    base = r.rows[0]
    lines = [f"machine    {r.machine}", f"model      {r.model}", "",
             "processes  partitions  load  events/s  x1     events/CPU-s  x1     per worker (busiest/mean)      "
             "restart: first  all workers"]
    for row in r.rows:
        workers = " ".join(f"{c:,}" for c in row.per_worker.values())
        lines.append(f"{row.processes:<10} {row.partitions:<11} {row.load_average:<5.1f} {row.events_per_s:<9,.0f} "
                     f"{row.events_per_s / base.events_per_s:<6.2f} {row.events_per_cpu_s:<13,.0f} "
                     f"{row.events_per_cpu_s / base.events_per_cpu_s:<6.2f} {workers + f' ({row.imbalance:.2f})':<30} "
                     f"{row.restart_first_s:<15.1f} {row.restart_all_s:.1f} s")
    lines += ["", "command    slsrec bench-stream --processes "
              + ",".join(str(row.processes) for row in r.rows) + f" --events {events}"]
    return "\n".join(lines)

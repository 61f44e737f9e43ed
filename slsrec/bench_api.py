"""``slsrec bench-api``: GET latency of ``slsrec api`` at a fixed request rate, with the flow running.

Set-up, on scratch topics and a scratch Redis database of the local services: a randomly initialised
SLSRec of ML-1M size (6,040 users, 3,706 items, d=64) with random long-term states published; the
flow (``slsrec serve``) and the API (``slsrec api``), each its own process; one click per user
replayed through the flow, so Redis holds every user's latest recommendation. Then, while a paced
live stream of clicks (``--flow-rate`` events/s) keeps the flow, the API's consumer and its live
updates busy, GETs of random users' recommendations go out at ``--rate`` requests/s.

The load is open loop: request ``i`` leaves at ``t0 + i / rate`` whether or not earlier ones have been
answered, and its latency runs from that *scheduled* time to the end of its response body, so a
server that stalls shows every request it delayed (no coordinated omission). The client
(:mod:`slsrec.loadgen`) runs in a process of its own over keep-alive connections and reports its own
CPU; everything shares this machine's cores. The first ``WARMUP_S`` seconds are sent but not measured.
"""

from __future__ import annotations

import os
import platform
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import SecretStr

from slsrec import loadgen, local
from slsrec.api import running_api
from slsrec.bench_stream import _events, _ml1m_sized_run, _paced, _produce, _run_flow
from slsrec.checkpoint import load_run
from slsrec.errors import ServiceError
from slsrec.latest import LatestStore
from slsrec.settings import Settings
from slsrec.store import LongTerm, LongTermStore

WARMUP_S = 2.0
FILL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ApiBenchResult:
    machine: str
    load_average: tuple[float, float]  # 1-minute load average at the start and at the end
    users: int
    flow_rate: float  # clicks/s through the flow during the load
    rate: float  # requests per second asked for
    duration_s: float
    sent: int  # measured requests (after the warm-up)
    achieved_rate: float  # measured requests / measured seconds
    send_lag_p99_ms: float  # how late the client itself sent (its own scheduling delay)
    status: dict[int, int]
    errors: int  # connection errors and timeouts
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    api_cpu_us: float  # CPU of the API process per request sent (its consumer and live updates included)
    client_cpu_us: float  # CPU of the load client's process per request sent
    memory_share: float  # lookups answered from the process's memory rather than Redis


def bench(settings: Settings, *, rate: float = 1000.0, duration_s: float = 20.0, flow_rate: float = 200.0,
          run: str | None = None) -> ApiBenchResult:
    from slsrec.benchmark import machine

    load_start = os.getloadavg()[0]
    with (local.session(settings), tempfile.TemporaryDirectory(prefix="slsrec-bench-api-") as tmp,
          local.scratch_redis_db() as redis_url,
          local.scratch_topics(settings, f"bench-api-{uuid.uuid4().hex[:8]}.") as scratch):
        settings = scratch.model_copy(update={"redis_url": SecretStr(redis_url), "device": "cpu",
                                              "api_group": f"bench-api-{uuid.uuid4().hex[:8]}"})
        run_dir = Path(run) if run else _ml1m_sized_run(Path(tmp) / "ml1m-random")
        loaded = load_run(run_dir)
        users, items = loaded.users.raw, loaded.items.raw
        rng = np.random.default_rng(0)
        d, full = loaded.model.config.d, loaded.model.config.long_len
        states = {u: LongTerm((rng.normal(size=d) / np.sqrt(d)).astype(np.float32), 0.0, full) for u in users}
        LongTermStore(settings.redis_url).publish(None, states, meta={"run": str(run_dir.resolve())})

        flow = _run_flow(settings, run_dir, Path(tmp) / "recovery", exit_at_end=False)
        try:
            with running_api(settings, Path(tmp) / "api.log") as api:
                _produce(settings, [(u, items[int(i)]) for u, i in zip(users, rng.integers(len(items), size=len(users)))])
                _wait_filled(settings, len(users))
                stop = threading.Event()
                live = threading.Thread(target=_live_stream, args=(settings, users, items, flow_rate, stop), daemon=True)
                live.start()
                try:
                    cpu0 = _cpu_s(api.pid)
                    load = loadgen.run(api.url, [str(u) for u in rng.permutation(users)], rate, WARMUP_S, duration_s)
                    api_cpu_s = _cpu_s(api.pid) - cpu0
                    lookups = _lookups(api.url)
                finally:
                    stop.set()
                    live.join(30)
        finally:
            flow.terminate()
            flow.wait(60)
    lat = load.latencies_ms
    p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9]) if len(lat) else [float("nan")] * 4
    n_sent = int(rate * (WARMUP_S + duration_s))
    return ApiBenchResult(
        f"{platform.machine()}, {os.cpu_count()} cores, {machine()['cpu']}", (load_start, os.getloadavg()[0]),
        len(users), flow_rate, rate, duration_s, len(lat), len(lat) / duration_s,
        float(np.percentile(load.send_lag_ms, 99)) if len(load.send_lag_ms) else 0.0, load.status, load.errors,
        float(p50), float(p90), float(p99), float(p999), float(np.max(lat)) if len(lat) else 0.0,
        api_cpu_s / n_sent * 1e6, load.cpu_s / n_sent * 1e6,
        lookups.get("memory", 0.0) / max(1.0, sum(lookups.values())))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _lookups(url: str) -> dict[str, float]:
    """The API's ``slsrec_api_lookups_total`` by source (memory, redis), from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
        return {s.labels["source"]: s.value for f in families if f.name == "slsrec_api_lookups" for s in f.samples
                if s.name.endswith("_total")}


def _wait_filled(settings: Settings, n: int) -> None:
    """Until the API's Redis holds a recommendation for ``n`` users."""
    latest = LatestStore(settings.redis_url, settings.api_ttl_s)
    deadline = time.monotonic() + FILL_TIMEOUT_S
    while len(latest.users(n)) < n:
        if time.monotonic() > deadline:
            raise ServiceError(f"Redis held {len(latest.users(n))} of {n} users' recommendations after "
                               f"{FILL_TIMEOUT_S:.0f} s (is the flow running?)")
        time.sleep(0.5)
    latest.close()


def _live_stream(settings: Settings, users: list[str], items: list[str], rate: float, stop: threading.Event) -> None:
    """Clicks at ``rate`` per second, one second's worth at a time, until ``stop``."""
    rng = np.random.default_rng(1)
    while not stop.is_set():
        _paced(settings, _events(users, items, max(1, int(rate)), rng), rate)


def report(r: ApiBenchResult) -> str:
    codes = ", ".join(f"{code}: {n:,}" for code, n in sorted(r.status.items()))
    rows = [
        ("machine", f"{r.machine}; load average {r.load_average[0]:.1f} at start, {r.load_average[1]:.1f} at end"),
        ("target", f"GET /v1/users/{{user_id}}/recommendations of {r.users:,} users, round robin; the flow "
                   f"meanwhile serves {r.flow_rate:,.0f} clicks/s, which the API stores and announces"),
        ("rate", f"{r.rate:,.0f} req/s asked, {r.achieved_rate:,.0f} req/s answered over {r.duration_s:g} s "
                 f"(client send lag p99 {r.send_lag_p99_ms:.1f} ms)"),
        ("answers", f"{r.sent:,} measured ({codes}; errors {r.errors}); {100 * r.memory_share:.1f}% from the API's "
                    "memory, the rest from Redis"),
        ("cost", f"{r.api_cpu_us:.0f} µs of API CPU per request (its Kafka consumer and live updates included); "
                 f"the load client took {r.client_cpu_us:.0f} µs per request"),
        ("latency", f"p50 {r.p50_ms:.2f} ms, p90 {r.p90_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                    f"p99.9 {r.p999_ms:.2f} ms, max {r.max_ms:.1f} ms (from the scheduled send time)"),
        ("command", f"slsrec bench-api --rate {r.rate:g} --duration-s {r.duration_s:g} --flow-rate {r.flow_rate:g}"),
    ]
    return "\n".join(f"{k:<8}  {v}" for k, v in rows)

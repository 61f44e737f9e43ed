"""``slsrec bench-api``: GET latency of ``slsrec api`` at a fixed request rate, open loop.

Requests go out on a fixed schedule (request ``i`` at ``t0 + i / rate``) whether or not earlier ones
have been answered, and each latency is measured from its *scheduled* send time to the end of its
response body. A server that stalls therefore shows every request it delayed, not only the one it
was busy with (no coordinated omission). The client is aiohttp on uvloop, keep-alive connections,
in this process; the API is one ``slsrec api`` process (started here unless ``--url`` names one),
on the same machine, so both share its cores.

The users requested are read from the API's Redis: run a replay through the flow first (``make
demo`` or ``slsrec demo --keep-services`` leaves them there). The first ``WARMUP_S`` seconds are
sent but not measured.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import numpy as np

from slsrec.api import running_api
from slsrec.errors import UserError
from slsrec.latest import LatestStore
from slsrec.settings import Settings

WARMUP_S = 2.0
CONNECTIONS = 64  # keep-alive connections at most; a request waiting for one counts that wait


@dataclass(frozen=True)
class ApiBenchResult:
    machine: str
    load_average: tuple[float, float]  # 1-minute load average at the start and at the end
    url: str
    users: int
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


def bench(settings: Settings, *, url: str | None = None, rate: float = 1000.0, duration_s: float = 20.0,
          n_users: int = 1000) -> ApiBenchResult:
    from slsrec.benchmark import machine

    users = LatestStore(settings.redis_url, settings.api_ttl_s).users(n_users)
    if not users:
        raise UserError("Redis holds no recommendations for the API to serve: replay clicks through the flow with "
                        "the API running first (`slsrec demo --keep-services` does)")
    load_start = os.getloadavg()[0]
    if url is None:
        with running_api(settings) as started:
            lat, lag, status, errors = _run_load(started, users, rate, duration_s)
            url = started
    else:
        lat, lag, status, errors = _run_load(url.rstrip("/"), users, rate, duration_s)
    p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9]) if len(lat) else [float("nan")] * 4
    return ApiBenchResult(machine(), (load_start, os.getloadavg()[0]), url, len(users), rate, duration_s, len(lat),
                          len(lat) / duration_s, float(np.percentile(lag, 99)) if len(lag) else 0.0, status, errors,
                          float(p50), float(p90), float(p99), float(p999), float(np.max(lat)) if len(lat) else 0.0)


def report(r: ApiBenchResult) -> str:
    codes = ", ".join(f"{code}: {n:,}" for code, n in sorted(r.status.items()))
    rows = [
        ("machine", f"{r.machine}; load average {r.load_average[0]:.1f} at start, {r.load_average[1]:.1f} at end"),
        ("target", f"{r.url}/v1/users/{{user_id}}/recommendations, {r.users:,} users round robin"),
        ("rate", f"{r.rate:,.0f} req/s asked, {r.achieved_rate:,.0f} req/s answered over {r.duration_s:g} s "
                 f"(client send lag p99 {r.send_lag_p99_ms:.1f} ms)"),
        ("answers", f"{r.sent:,} measured ({codes}; errors {r.errors})"),
        ("latency", f"p50 {r.p50_ms:.2f} ms, p90 {r.p90_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                    f"p99.9 {r.p999_ms:.2f} ms, max {r.max_ms:.1f} ms (from the scheduled send time)"),
        ("command", f"slsrec bench-api --rate {r.rate:g} --duration-s {r.duration_s:g} --users {r.users}"),
    ]
    return "\n".join(f"{k:<8}  {v}" for k, v in rows)


def _run_load(url: str, users: list[str], rate: float, duration_s: float):
    import uvloop

    return uvloop.run(_load(url, users, rate, duration_s))


async def _load(url: str, users: list[str], rate: float, duration_s: float):
    import aiohttp
    from urllib.parse import quote

    paths = [f"{url}/v1/users/{quote(u, safe='')}/recommendations" for u in users]
    loop = asyncio.get_running_loop()
    n = int(rate * (WARMUP_S + duration_s))
    latencies = np.full(n, np.nan)
    lag = np.zeros(n)
    status: dict[int, int] = {}
    errors = 0

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(i: int, at: float) -> None:
            nonlocal errors
            lag[i] = loop.time() - at
            try:
                async with session.get(paths[i % len(paths)]) as response:
                    await response.read()
                    code = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += i >= warm
                return
            latencies[i] = loop.time() - at
            if i >= warm:
                status[code] = status.get(code, 0) + 1

        warm = int(rate * WARMUP_S)
        # Open the connections before the clock starts: connecting is not what is measured.
        await asyncio.gather(*(one(i, loop.time()) for i in range(min(CONNECTIONS, n))))
        t0 = loop.time() + 0.05
        tasks = set()
        for i in range(n):
            at = t0 + i / rate
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    measured = latencies[warm:]
    return measured[~np.isnan(measured)] * 1000, lag[warm:] * 1000, status, errors

"""The open-loop HTTP load of ``slsrec bench-api``, in a process of its own.

Request ``i`` is due at ``t0 + i / rate`` whether or not earlier ones have been answered, and its
latency runs from that *scheduled* time to the last byte of its response, so a server that stalls
shows in every request it delayed (no coordinated omission). A due request goes out on an idle
keep-alive connection, or waits for the next one that frees up (that wait counts).

Why a process of its own: the benchmark's own process holds torch, the flow's set-up and a thread
producing the live click stream; a load client there shares their interpreter lock, and one full
collection of their ~320,000 objects took 355 ms here, all of it added to the latencies it measures.
This process imports only asyncio, uvloop and numpy, freezes what it made before the load, and
reports its own CPU so the reader can judge what the client took from the shared cores.

Why no HTTP library: aiohttp cost ~600 µs of CPU a request here. This costs one write, one read and
a little parsing per request (the API always answers with a ``Content-Length``), with no task or
timer per request; its ~150-250 µs a request on these cores are mostly the event loop and the socket
calls (py-spy), and every run reports them.

>>> c = _Connection(None)
>>> c.parse(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\nEtag: x\\r\\n\\r\\n{}HTTP/1.1 304 Not Modified\\r\\n\\r\\n")
[200, 304]
>>> c.parse(b"HTTP/1.1 404 Not Found\\r\\nContent-Length: 5\\r\\n\\r\\nab"), c.parse(b"cde")
([], [404])
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import numpy as np

from slsrec.errors import ServiceError

CONNECTIONS = 64  # keep-alive connections at most
DRAIN_S = 10.0  # how long after the last send an answer may still come; later ones are errors


@dataclass(frozen=True)
class Load:
    latencies_ms: np.ndarray  # per answered request after the warm-up, from its scheduled time
    send_lag_ms: np.ndarray  # how late each measured request was handed to a connection
    status: dict[int, int]  # answers after the warm-up, by status code
    errors: int  # measured requests never answered (closed connection, or none within DRAIN_S)
    cpu_s: float  # this process's CPU (user + system) over the whole load, warm-up included


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, client: _Client | None) -> None:
        self.client = client
        self.request = -1  # the index of the request in flight, -1 when idle
        self._buf = b""
        self._end = -1  # where the current response ends in _buf, once its head is in
        self._status = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def send(self, i: int, raw: bytes) -> None:
        self.request = i
        self.transport.write(raw)

    def parse(self, data: bytes) -> list[int]:
        """The status of each response that ``data`` completes."""
        self._buf += data
        done = []
        while True:
            if self._end < 0:
                head_end = self._buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return done
                head = self._buf[:head_end].lower()
                self._status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                size = int(head[at + 17 : head.find(b"\r\n", at + 2) % (len(head) + 1)]) if at >= 0 else 0
                self._end = head_end + 4 + size
            if len(self._buf) < self._end:
                return done
            self._buf, self._end = self._buf[self._end :], -1
            done.append(self._status)

    def data_received(self, data: bytes) -> None:
        for status in self.parse(data):
            i, self.request = self.request, -1
            self.client.answered(self, i, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class _Client:
    """Hands due requests to idle connections and records each answer; no task or timer per request."""

    def __init__(self, requests: list[bytes], n: int, warm: int, t0: float, rate: float):
        self.requests, self.n, self.warm, self.t0, self.rate = requests, n, warm, t0, rate
        self.idle: list[_Connection] = []
        self.waiting: deque[int] = deque()  # due requests with no free connection yet
        self.latency = np.full(n, np.nan)
        self.lag = np.zeros(n)
        self.status: dict[int, int] = {}
        self.finished = 0  # answered or lost

    def submit(self, i: int, now: float) -> None:
        self.lag[i] = now - (self.t0 + i / self.rate)
        if self.idle:
            self.idle.pop().send(i, self.requests[i % len(self.requests)])
        else:
            self.waiting.append(i)

    def answered(self, conn: _Connection, i: int, status: int) -> None:
        self.latency[i] = time.perf_counter() - (self.t0 + i / self.rate)
        self.finished += 1
        if i >= self.warm:
            self.status[status] = self.status.get(status, 0) + 1
        if self.waiting:
            j = self.waiting.popleft()
            conn.send(j, self.requests[j % len(self.requests)])
        else:
            self.idle.append(conn)

    def lost(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.request >= 0:  # its request is never answered: counted as an error
            self.finished += 1


async def _run(url: str, users: list[str], rate: float, warmup_s: float, duration_s: float) -> Load:
    loop = asyncio.get_running_loop()
    where = urlsplit(url)
    requests = [f"GET /v1/users/{quote(u, safe='')}/recommendations HTTP/1.1\r\nHost: {where.netloc}\r\n\r\n".encode()
                for u in users]
    warm = int(rate * warmup_s)
    n = warm + int(rate * duration_s)
    client = _Client(requests, n, warm, 0.0, rate)
    for _ in range(CONNECTIONS):
        client.idle.append((await loop.create_connection(lambda: _Connection(client), where.hostname, where.port))[1])
    gc.collect()
    gc.freeze()  # nothing made so far is garbage: the collector's passes during the load stay short
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    # perf_counter, not loop.time(): uvloop's clock has 1 ms steps and is read once per loop iteration.
    client.t0 = t0 = time.perf_counter() + 0.05
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and t0 + i / rate <= now:
            client.submit(i, now)
            i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    deadline = time.perf_counter() + DRAIN_S
    while client.finished < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    cpu_s = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    for conn in client.idle:
        conn.transport.close()
    measured = client.latency[warm:]
    answered = measured[~np.isnan(measured)]
    return Load(answered * 1000, client.lag[warm:] * 1000, client.status, len(measured) - len(answered), cpu_s)


def run(url: str, users: list[str], rate: float, warmup_s: float, duration_s: float) -> Load:
    """GET ``/v1/users/{user}/recommendations`` of ``users`` round robin at ``rate`` requests/s: ``warmup_s``
    seconds sent but not measured, then ``duration_s`` measured, in a fresh ``python -m slsrec.loadgen``."""
    job = {"url": url, "users": users, "rate": rate, "warmup_s": warmup_s, "duration_s": duration_s}
    done = subprocess.run([sys.executable, "-m", "slsrec.loadgen"], input=json.dumps(job), capture_output=True,
                          text=True, timeout=warmup_s + duration_s + DRAIN_S + 120)
    if done.returncode != 0:
        raise ServiceError(f"the load client failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
    out = json.loads(done.stdout)
    return Load(np.array(out["latencies_ms"]), np.array(out["send_lag_ms"]),
                {int(k): v for k, v in out["status"].items()}, out["errors"], out["cpu_s"])


if __name__ == "__main__":  # the client process: a job as JSON on stdin, the Load as JSON on stdout
    import uvloop

    load = uvloop.run(_run(**json.load(sys.stdin)))
    json.dump({"latencies_ms": load.latencies_ms.tolist(), "send_lag_ms": load.send_lag_ms.tolist(),
               "status": load.status, "errors": load.errors, "cpu_s": load.cpu_s}, sys.stdout)

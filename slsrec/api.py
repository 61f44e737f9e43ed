"""``slsrec api``: each user's latest recommendation over HTTP, live updates, and the page at ``/``.

One process holds three parts:

- :class:`Ingest`, a thread: consumes ``recommendations`` in its own consumer group (``api_group``;
  replicas share the partitions) and stores each user's latest record in Redis
  (:class:`slsrec.latest.LatestStore`), which also announces it on a pub/sub channel. Offsets are
  committed only after Redis has the records, so a restart loses nothing; a restarted API answers
  at once from Redis.
- :class:`Broadcaster`, an asyncio task: reads that channel and hands each update to the Server-Sent
  Events streams of its user, and counts updates per user for the "busiest users" of the page.
- The FastAPI app (:func:`create_app`): the endpoints below, OpenAPI from the pydantic models in
  ``schemas/``, Prometheus metrics at ``/metrics``, CORS for the ``api_cors_origins`` setting.

=======================================================  ============================================
``GET /v1/users/{user_id}/recommendations``              the latest ``Recommendation``; ``ETag``,
                                                         ``If-None-Match`` -> 304; unknown user -> 404
``GET /v1/users/{user_id}/recommendations/stream``       SSE: the current one, then one event per new one
``GET /v1/active-users``                                 users with the most updates in the last minute
``GET /healthz``, ``GET /readyz``                        alive; ready = Kafka and Redis answer
``GET /metrics``                                         Prometheus text format
``GET /``                                                the live page (``slsrec/web/``)
=======================================================  ============================================

A GET answers with the bytes stored in Redis (the JSON the flow wrote), so it neither parses nor
re-encodes: the response model documents the contract, it is not re-validated on every request.

>>> etag(b'{"user_id": "u1"}')
'"fce97bb48b38f509"'
>>> matches('W/"fce97bb48b38f509", "other"', '"fce97bb48b38f509"'), matches(None, '"x"'), matches("*", '"x"')
(True, False, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from hashlib import blake2b
from pathlib import Path
from typing import NamedTuple

import anyio
import cachetools
from fastapi import FastAPI, Path as PathParam, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter as PromCounter, Gauge, Histogram
from prometheus_client import generate_latest
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from schemas.api import ActiveUser, ActiveUsers, ApiError, Readiness
from schemas.events import MAX_ID_CHARS, NO_CONTROL, Recommendation
from slsrec.errors import ServiceError
from slsrec.latest import LatestStore
from slsrec.settings import Settings

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
CONSUME_BATCH = 500  # records per Redis round trip at most
CONSUME_WAIT_S = 0.05  # the longest a record waits for its batch: part of the live update's delay
ACTIVITY_WINDOW_S = 60
READY_TIMEOUT_S = 60.0
CACHE_USERS = 200_000  # users whose latest recommendation one API process keeps in memory (~2 kB each)
CACHE_TTL_S = 60.0  # how long such a copy is used; then Redis is asked again
SSE_QUEUE = 16  # updates a slow browser may fall behind before the oldest is dropped (it gets the newest)
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)
UserId = PathParam(min_length=1, max_length=MAX_ID_CHARS, pattern=NO_CONTROL, description="the user's id")


def etag(body: bytes) -> str:
    """A strong ETag of a stored recommendation: 64 bits of its hash (each record names its event)."""
    return f'"{blake2b(body, digest_size=8).hexdigest()}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (weak comparison, as RFC 9110 asks for GET)."""
    if if_none_match is None:
        return False
    return any(t.strip().removeprefix("W/") in (tag, "*") for t in if_none_match.split(","))


class Metrics:
    """The API's Prometheus instruments, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = PromCounter("slsrec_api_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.latency = Histogram("slsrec_api_request_seconds", "time to answer a recommendations GET", ["endpoint"],
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.ingested = PromCounter("slsrec_api_ingested", "recommendations stored from Kafka", registry=r)
        self.invalid = PromCounter("slsrec_api_invalid_records", "records on the topic that are no Recommendation",
                                   registry=r)
        self.updates = PromCounter("slsrec_api_updates", "updates received from the Redis channel", registry=r)
        self.lookups = PromCounter("slsrec_api_lookups", "latest recommendations looked up, by where they were found",
                                   ["source"], registry=r)
        self.streams = Gauge("slsrec_api_sse_streams", "open Server-Sent Events streams", registry=r)


class Activity:
    """Updates per user over the last ``window_s`` seconds, counted in buckets of ``bucket_s``.

    >>> a = Activity(window_s=10, bucket_s=5)
    >>> for user, t in [("u1", 0), ("u2", 1), ("u1", 6), ("u3", 7), ("u3", 8), ("u3", 9)]:
    ...     a.add(user, t)
    >>> a.top(2, now=9)
    [('u3', 3), ('u1', 2)]
    >>> a.top(2, now=12)  # the first bucket (t < 5) has left the window
    [('u3', 3), ('u1', 1)]
    """

    def __init__(self, window_s: int = ACTIVITY_WINDOW_S, bucket_s: int = 5):
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._buckets: deque[tuple[int, Counter]] = deque()

    def add(self, user_id: str, now: float) -> None:
        b = int(now // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != b:
            self._buckets.append((b, Counter()))
            self._prune(now)
        self._buckets[-1][1][user_id] += 1

    def top(self, n: int, now: float) -> list[tuple[str, int]]:
        self._prune(now)
        total: Counter = Counter()
        for _, counts in self._buckets:
            total.update(counts)
        return total.most_common(n)

    def _prune(self, now: float) -> None:
        oldest = int((now - self.window_s) // self.bucket_s) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()


class Broadcaster:
    """Follows the Redis channel: hands each update to the SSE streams of its user, keeps the recent
    ones in memory for GETs, and counts updates per user for the page.

    The memory copy is exact because every write to Redis is announced on the channel (``put_many``
    sets, then publishes): while subscribed, a delivered update replaces the copy. It is used only
    while the subscription stands and dropped whenever it breaks (an update may have been missed); a
    value read from Redis on a miss is kept only if no update for that user arrived meanwhile. An
    entry lives ``CACHE_TTL_S`` at most, so it never outlives the Redis key by more than that.
    """

    def __init__(self, latest: LatestStore, metrics: Metrics):
        self.latest = latest
        self.metrics = metrics
        self.activity = Activity()
        self._streams: dict[str, set[asyncio.Queue]] = {}
        self._recent: cachetools.TTLCache = cachetools.TTLCache(CACHE_USERS, CACHE_TTL_S)
        self._following = False
        self._from_memory, self._from_redis = metrics.lookups.labels("memory"), metrics.lookups.labels("redis")

    def subscribe(self, user_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        self._streams.setdefault(user_id, set()).add(q)
        self.metrics.streams.inc()
        return q

    def unsubscribe(self, user_id: str, q: asyncio.Queue) -> None:
        queues = self._streams.get(user_id, set())
        queues.discard(q)
        if not queues:
            self._streams.pop(user_id, None)
        self.metrics.streams.dec()

    async def latest_of(self, user_id: str) -> bytes | None:
        """The user's latest recommendation JSON: from memory when it is there, else from Redis."""
        if self._following and (body := self._recent.get(user_id)) is not None:
            self._from_memory.inc()
            return body
        self._from_redis.inc()
        body = await self.latest.get(user_id)
        if body is not None and self._following and user_id not in self._recent:
            self._recent[user_id] = body
        return body

    def deliver(self, user_id: str, body: bytes) -> None:
        self.metrics.updates.inc()
        self.activity.add(user_id, time.monotonic())
        self._recent[user_id] = body
        for q in self._streams.get(user_id, ()):
            if q.full():  # a browser that cannot keep up needs the newest, not every one
                q.get_nowait()
            q.put_nowait(body)

    def _follow(self, following: bool) -> None:
        self._following = following
        self._recent.clear()

    async def run(self) -> None:
        """Follow the channel until cancelled; reconnect when Redis goes away."""
        while True:
            try:
                async for user_id, body in self.latest.changes(on_subscribed=lambda: self._follow(True)):
                    self.deliver(user_id, body)
            except ServiceError as e:
                log.warning("live updates paused: %s; retrying in 1 s", e)
            finally:
                self._follow(False)
            await asyncio.sleep(1.0)


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


class FastGet:
    """ASGI middleware: answers ``GET /v1/users/{user_id}/recommendations`` before FastAPI's routing and
    parameter resolution, which took most of each request's CPU here (``slsrec bench-api``: about
    460 µs a request through the route on the shared 2 cores, see docs/benchmarks.md). The route
    documents the same answer in OpenAPI and serves what this passes on (an id it rejects: 422).

    >>> m = FastGet(app=None, answer=None)
    >>> m.user_of({"type": "http", "method": "GET", "path": "/v1/users/u/1/recommendations"})  # the path is decoded
    >>> m.user_of({"type": "http", "method": "GET", "path": "/v1/users/u 1/recommendations"})
    'u 1'
    >>> m.user_of({"type": "http", "method": "GET", "path": "/v1/users/u\x01/recommendations"}) is None  # the route's 422
    True
    """

    _PATH = re.compile(r"/v1/users/([^/]{1,%d})/recommendations" % MAX_ID_CHARS)
    _ID = re.compile(NO_CONTROL)

    def __init__(self, app, answer: Callable[[str, str | None], Awaitable[Answer]]):
        self.app = app
        self.answer = answer

    def user_of(self, scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        m = self._PATH.fullmatch(scope["path"])
        return m[1] if m and self._ID.match(m[1]) else None

    async def __call__(self, scope, receive, send) -> None:
        user_id = self.user_of(scope)
        if user_id is None:
            return await self.app(scope, receive, send)
        if_none_match = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"if-none-match"), None)
        status, headers, body = await self.answer(user_id, if_none_match)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        if status != 304:
            raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


class Ingest(threading.Thread):
    """Kafka ``recommendations`` -> Redis, in batches, offsets stored only once Redis has the batch."""

    def __init__(self, settings: Settings, latest: LatestStore, metrics: Metrics):
        super().__init__(name="slsrec-api-ingest", daemon=True)
        self.settings = settings
        self.latest = latest
        self.metrics = metrics
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)

    def run(self) -> None:
        from confluent_kafka import Consumer

        from slsrec.kafka_check import QUIET

        s = self.settings
        consumer = Consumer({**s.kafka_config(), "group.id": s.api_group, "auto.offset.reset": "earliest",
                             "enable.auto.offset.store": False, "logger": QUIET})
        consumer.subscribe([s.topic_recommendations])
        log.info("consuming %s as group %s", s.topic_recommendations, s.api_group)
        try:
            while not self._stopping.is_set():
                msgs = [m for m in consumer.consume(CONSUME_BATCH, CONSUME_WAIT_S) if m.error() is None]
                if msgs:
                    self._store([m.value() for m in msgs])
                    for m in msgs:  # offsets move only now: a crash before this re-reads the batch
                        consumer.store_offsets(m)
        finally:
            consumer.close()

    def _store(self, values: list[bytes | None]) -> None:
        records = []
        for value in values:
            try:
                records.append((Recommendation.model_validate_json(value).user_id, value))
            except ValidationError as e:
                self.metrics.invalid.inc()
                log.warning("skipped a record on %s that is no Recommendation: %s", self.settings.topic_recommendations,
                            e.errors()[0]["msg"])
        while not self._stopping.is_set():
            try:
                self.latest.put_many(records)
                self.metrics.ingested.inc(len(records))
                return
            except ServiceError as e:  # keep the batch until Redis is back: nothing is skipped
                log.warning("cannot store recommendations: %s; retrying in 1 s", e)
                self._stopping.wait(1.0)


def create_app(settings: Settings, *, ingest: bool = True) -> FastAPI:
    """The API app; ``ingest=False`` serves what Redis holds without consuming Kafka (read replicas)."""
    latest = LatestStore(settings.redis_url, settings.api_ttl_s)
    metrics = Metrics()
    broadcaster = Broadcaster(latest, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        consumer = Ingest(settings, latest, metrics) if ingest else None
        if consumer is not None:
            consumer.start()
        follow = asyncio.create_task(broadcaster.run())
        try:
            yield
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            if consumer is not None:
                await anyio.to_thread.run_sync(consumer.stop)
            await latest.aclose()
            latest.close()

    app = FastAPI(title="SLSRec recommendations", version="1", lifespan=lifespan,
                  description="Each user's latest recommendation from the SLSRec stream, and live updates.")
    get_seconds = metrics.latency.labels("recommendations")  # label lookups cost more than the update

    @functools.cache
    def answered(code: int):
        return metrics.requests.labels("recommendations", code)

    async def answer(user_id: str, if_none_match: str | None) -> Answer:
        """The GET's answer, whichever way the request came (:class:`FastGet` or the route)."""
        t0 = time.perf_counter()
        body = await broadcaster.latest_of(user_id)
        if body is None:
            detail = f"no recommendation for user {user_id!r} (none yet, or older than {settings.api_ttl_s} s)"
            result = Answer(404, {"content-type": "application/json"},
                            ApiError(error="not_found", detail=detail).model_dump_json().encode())
        else:
            tag = etag(body)
            result = (Answer(304, {"etag": tag, "cache-control": "no-cache"}, b"") if matches(if_none_match, tag)
                      else Answer(200, {"etag": tag, "cache-control": "no-cache", "content-type": "application/json"},
                                  body))
        get_seconds.observe(time.perf_counter() - t0)
        answered(result.status).inc()
        return result

    app.add_middleware(FastGet, answer=answer)
    if settings.api_cors_origins:  # added last, so it wraps FastGet's answers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.api_cors_origins, allow_methods=["GET"],
                           allow_headers=["If-None-Match"], expose_headers=["ETag"])

    @app.get("/v1/users/{user_id}/recommendations", response_model=Recommendation,
             responses={404: {"model": ApiError, "description": "no recommendation for this user (none yet, or expired)"},
                        304: {"description": "unchanged since the ETag in If-None-Match"}})
    async def recommendations(request: Request, user_id: str = UserId) -> Response:
        """The user's latest recommendation, with an ``ETag``; ``If-None-Match`` with it answers 304."""
        status, headers, body = await answer(user_id, request.headers.get("if-none-match"))
        return Response(body, status, headers)

    @app.get("/v1/users/{user_id}/recommendations/stream", response_model=Recommendation,
             response_description="text/event-stream: `recommendation` events, each data a Recommendation")
    async def stream(request: Request, user_id: str = UserId) -> EventSourceResponse:
        """Server-Sent Events: the user's current recommendation (if any), then one event per new one."""
        q = broadcaster.subscribe(user_id)  # before reading the current one: no update falls in between

        async def events() -> AsyncIterator[dict]:
            sent = None
            try:
                body = await broadcaster.latest_of(user_id)
                while True:
                    if body is not None and (tag := etag(body)) != sent:
                        sent = tag
                        yield {"event": "recommendation", "id": tag, "data": body.decode()}
                    body = await q.get()
            finally:
                broadcaster.unsubscribe(user_id, q)

        metrics.requests.labels("stream", 200).inc()
        return EventSourceResponse(events(), ping=15)

    @app.get("/v1/active-users", response_model=ActiveUsers)
    async def active_users(limit: int = Query(10, ge=1, le=100)) -> ActiveUsers:
        """The users with the most recommendations in the last minute, most first (for the live page)."""
        top = broadcaster.activity.top(limit, time.monotonic())
        return ActiveUsers(window_s=broadcaster.activity.window_s,
                           users=[ActiveUser(user_id=u, updates=n) for u, n in top])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        """Ready when Kafka (the topic) and Redis both answer."""
        kafka = await anyio.to_thread.run_sync(_kafka_status, settings)
        try:
            await latest.ping()
            redis_status = "ok"
        except ServiceError as e:
            redis_status = str(e)
        ready = Readiness(ready=kafka == redis_status == "ok", kafka=kafka, redis=redis_status)
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.state.latest = latest
    return app


def _kafka_status(settings: Settings, timeout_s: float = 2.0) -> str:
    """``ok`` when Kafka answers and has the recommendations topic, else the one-line reason."""
    from slsrec.kafka_check import check_kafka

    try:
        topics = check_kafka(settings, timeout_s).topics
    except ServiceError as e:
        return str(e)
    return "ok" if settings.topic_recommendations in topics else f"topic {settings.topic_recommendations} is missing"


def serve_api(settings: Settings) -> None:
    """Run the API until Ctrl-C (uvicorn, one process; run more behind a load balancer to scale)."""
    import uvicorn

    log.info("api: http://%s:%d/ (docs at /docs)", settings.api_host, settings.api_port)
    app = create_app(settings)
    # What start-up made (modules, the app, the pydantic models) lives as long as the process: frozen,
    # the collector stops re-scanning it, and a full collection, which stops every request waiting in
    # this process, shrinks from ~40 ms to a few (docs/benchmarks.md, HTTP API). Here, not in
    # create_app: freezing is the owner of the process's choice, not an app's (tests run it in theirs).
    gc.collect()
    gc.freeze()
    # uvloop and httptools by name, not "auto": a missing one is an error at start, not a silent fall-back
    # to the pure-Python loop and parser (h11). No access log: a log line per GET costs more than the GET.
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, loop="uvloop",
                http="httptools", access_log=False, log_level="info")


class ApiProcess(NamedTuple):
    url: str  # e.g. http://127.0.0.1:41234
    pid: int


@contextlib.contextmanager
def running_api(settings: Settings, log_path: Path | None = None) -> Iterator[ApiProcess]:
    """`slsrec api` in a child process on a free loopback port, with these settings, until the block ends.
    Yields it once it is ready; its output goes to ``log_path`` (default: a temporary file)."""
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("slsrec", path=str(Path(sys.executable).parent)) or "slsrec"
    env = {**os.environ, **settings.to_env(), "SLSREC_API_HOST": "127.0.0.1", "SLSREC_API_PORT": str(port)}
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "api.log"
        proc = subprocess.Popen([exe, "api"], env=env, stdout=stack.enter_context(open(log_path, "w")),
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, log_path)
            yield ApiProcess(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the API at ``url`` answers ``/readyz`` with 200; fail with its log's tail if it exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"`slsrec api` exited with {proc.returncode}; log {log_path}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise ServiceError(f"the API at {url} was not ready within {timeout_s:.0f} s; log {log_path}")

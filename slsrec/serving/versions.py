"""Version following: the long-term lookup through Redis, loading published versions, and the
recommender that ``slsrec serve`` runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from schemas.drift import HealthEvent
from slsrec.breaker import CircuitBreaker
from slsrec.checkpoint import CONFIG, WEIGHTS, load_run
from slsrec.drift import DriftMonitor
from slsrec.errors import CheckpointError, Unavailable, UserError
from slsrec.serving.recommender import Published, Recommender
from slsrec.settings import Settings
from slsrec.store import CachedLongTerm, LongTermStore, parse_seq
from slsrec.telemetry import Telemetry


log = logging.getLogger(__name__)


class LongTermReader:
    """The production long-term lookup: the current Redis version, read through the TTL cache.

    ``slsrec:current`` is re-read at most every ``ttl_s``; only a version with a higher sequence number
    than the one in use is taken (versions only move forward). Two modes:

    - ``load`` given (``slsrec serve`` without ``--run``): a new version's model is loaded in a
      background thread (``load(version)``) while the stream goes on with the version in use;
      :meth:`poll` then hands it to the :class:`Recommender`, and the vectors switch with the model.
    - otherwise the served model is fixed (``--run``): new versions published for ``run`` switch the
      vectors only; a version of another run holds vectors of another model, meaningless to this
      one, so the reader stays on the version it has and says a restart without ``--run`` follows it.

**Degraded mode.** When Redis does not answer (its store's deadline and circuit breaker fail the call
at once), a lookup answers from the cache, however old its entries, and says so: it returns
``(version, entries, True)``, and the recommendations are flagged. So does a Redis that lost the
version in use (restarted empty): then any version published next is taken, even one with a lower
number (a fresh Redis counts from 1 again), and the reader leaves degraded mode once it uses it.
Entering and leaving degraded mode is logged, counted (``slsrec.degraded.workers``) and reported
as a :class:`HealthEvent` (:meth:`take_events`).

    Parameters
    ----------
    store : LongTermStore
    ttl_s : float
        How stale the current version id, and a cached absence (a cold user), may be.
    run : str, optional
        The served run directory; versions whose ``meta["run"]`` names another run are not used.
    telemetry : Telemetry, optional
    load : callable, optional
        ``version -> Published``; follow every new version, model included.
    version : str, optional
        The version in use at the start (its model already served).
    worker_id : str
        Named in its health events.
    """

    def __init__(self, store: LongTermStore, ttl_s: float, run: str | None = None, telemetry: Telemetry | None = None,
                 load: Callable[[str], Published] | None = None, version: str | None = None, worker_id: str = "0"):
        self.store = store
        self.worker_id = worker_id
        self.degraded_reason: str | None = None  # why this worker serves without Redis; None: it does not
        self._lost: str | None = None  # the version in use is gone from Redis (restarted empty?)
        self._events: list[HealthEvent] = []
        self.telemetry = telemetry
        self.cache = CachedLongTerm(store, ttl_s)
        self.ttl_s = ttl_s
        self.run = None if run is None else Path(run).resolve()
        self.load = load
        self.version: str | None = None
        self._checked_at = -float("inf")
        self._refused: set[str] = set()
        self._loading: tuple[str, Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="slsrec-load") if load is not None else None
        if version is not None:
            self._use(version)

    def __call__(self, user_ids: Sequence[str]) -> tuple:
        """``(version, entries)``, or ``(version, cached entries, True)`` in degraded mode."""
        # Degraded, every batch checks the version first: a Redis back from a restart may be empty, and
        # reading vectors from it would replace cached ones with absences. (Free while the breaker is open.)
        self._check(force=self.degraded_reason is not None)
        if self.version is None:
            return None, [None] * len(user_ids)
        if self._lost is None:
            hits, misses, t0 = self.cache.hits, self.cache.misses, time.perf_counter()
            try:
                vectors = self.cache.get_many(self.version, user_ids)
            except Unavailable as e:
                self._degrade(str(e))
            else:
                if self.telemetry is not None:
                    self.telemetry.cache_hits.add(self.cache.hits - hits)
                    self.telemetry.cache_misses.add(self.cache.misses - misses)
                    if self.cache.misses > misses:  # one round trip
                        self.telemetry.redis_latency.record((time.perf_counter() - t0) * 1000)
                if self.cache.misses > misses:  # Redis answered
                    self._recover()
                return self.version, vectors
        vectors = self.cache.stale(self.version, user_ids)
        if self.telemetry is not None:
            cached = sum(v is not None for v in vectors)
            self.telemetry.degraded.add(cached, {"long_term": "cached"})
            self.telemetry.degraded.add(len(vectors) - cached, {"long_term": "unavailable"})
        return self.version, vectors, True

    def take_events(self) -> list[HealthEvent]:
        """The health events since the last call (entering or leaving degraded mode)."""
        events, self._events = self._events, []
        return events

    def poll(self) -> Published | None:
        """A newer version whose model has finished loading (the reader now reads its vectors), or None."""
        self._check()
        if self._loading is None or not self._loading[1].done():
            return None
        version, future = self._loading
        self._loading = None
        try:
            published = future.result()
        except Unavailable as e:  # Redis went away meanwhile: try again at a later check
            log.warning("cannot load version %s now (%s): staying on %s", version, e, self.version)
            return None
        except UserError as e:  # expired, or published without model files: keep serving what we have
            self._refused.add(version)
            log.warning("cannot load version %s (%s): staying on %s", version, e, self.version)
            return None
        self._use(version)
        return published

    def _newer(self, version: str | None) -> bool:
        if version is None or version == self.version or version in self._refused:
            return False
        if self.version is None or self._lost is not None:
            return True
        seq, ours = parse_seq(version), parse_seq(self.version)
        return seq is not None and (ours is None or seq > ours)

    def _check(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked_at < self.ttl_s:
            return
        self._checked_at = time.monotonic()
        try:
            current = self.store.current_version()
            # Another current version is normal after a publish (ours expires after a grace period);
            # ours gone altogether is not.
            if self.version is not None and current != self.version and not self.store.meta(self.version):
                self._lost = f"version {self.version} is gone from Redis at {self.store.location} (restarted empty?)"
                self._degrade(self._lost)
            elif current is not None and current == self.version and self._lost is not None:
                self._use(current)  # republished under the same id
                return
        except Unavailable as e:
            self._degrade(str(e))
            return
        if not self._newer(current):
            return
        if self._pool is not None:
            if self._loading is None:
                log.info("version %s published: loading its model", current)
                self._loading = (current, self._pool.submit(self._timed_load, current))
            return
        published = self.store.meta(current).get("run")
        if self.run is not None and published is not None and Path(published).resolve() != self.run:
            self._refused.add(current)
            log.warning("long-term version %s was published for run %s, not the served %s: staying on %s; "
                        "serve without --run to follow every published version", current, published, self.run,
                        self.version)
            return
        self._use(current)

    def _timed_load(self, version: str) -> Published:
        t0 = time.perf_counter()
        published = self.load(version)
        log.info("version %s: model loaded in %.0f ms (in the background)", version, (time.perf_counter() - t0) * 1000)
        return published

    def _use(self, version: str) -> None:
        log.info("long-term vectors: version %s", version)
        if self._lost is not None:  # Redis lost our version: what it holds now may differ under the same ids
            self.cache.clear()
        self.version = version
        self._lost = None
        if self.telemetry is not None:
            self.telemetry.set_versions(long_term=version)
        self._recover()

    def _degrade(self, reason: str) -> None:
        if self.degraded_reason is None:
            log.warning("degraded mode: %s; recommending from the short-term state and the cached long-term "
                        "vectors", reason)
            self._health("degraded", reason)
            if self.telemetry is not None:
                self.telemetry.degraded_workers.add(1)
        self.degraded_reason = reason

    def _recover(self) -> None:
        if self.degraded_reason is None or self._lost is not None:
            return
        log.info("degraded mode over: Redis at %s answers with version %s", self.store.location, self.version)
        self._health("recovered", f"Redis at {self.store.location} answers with version {self.version}")
        if self.telemetry is not None:
            self.telemetry.degraded_workers.add(-1)
        self.degraded_reason = None

    def _health(self, state: str, reason: str) -> None:
        self._events.append(HealthEvent(state=state, component="redis", reason=reason[:1000], worker_id=self.worker_id,
                                        ts=int(time.time() * 1000), long_term_version=self.version))


def version_run_dir(store: LongTermStore, version: str, runs_dir: str | Path) -> Path:
    """The run directory of a published version: ``meta["run"]`` when it is on this machine, else its
    model files from Redis written to ``{runs_dir}/published/{version}`` (``load_run`` reads either).

    Raises :class:`CheckpointError` when neither exists (the version expired, or was published
    without model files).
    """
    run = store.meta(version).get("run")
    if run is not None and (Path(run) / WEIGHTS).is_file():
        return Path(run)
    files = store.model_files(version)
    if WEIGHTS not in files or CONFIG not in files:
        raise CheckpointError(f"version {version}: run {run or '(none)'} is not on this machine and Redis holds "
                              "no model files for it")
    out = Path(runs_dir) / "published" / version
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / Path(name).name).write_bytes(data)  # name only: a file name never leaves the directory
    return out


def load_version(store: LongTermStore, runs_dir: str | Path, version: str) -> Published:
    """Load the model published with ``version`` (its run directory, or its model files from Redis)."""
    loaded = load_run(version_run_dir(store, version, runs_dir))
    return Published(version, loaded.model, loaded.items, loaded.users)


def open_recommender(settings: Settings, run: str | Path | None = None, telemetry: Telemetry | None = None,
                     worker_id: str = "0") -> Recommender:
    """The recommender ``slsrec serve`` runs: a model, the Redis long-term lookup, a drift monitor.

    Without ``run``, serves the current Redis version (its run directory, or the model files the
    publisher stored in Redis when that directory is not on this machine) and follows every newer
    version without a restart; ``model_version`` is then the version id. With ``run``, serves that
    run (``model_version`` is its directory name) and reads the versions published for it.

    The hot path reads Redis with a deadline and a circuit breaker (``settings.redis_timeout_ms``,
    ``redis_breaker_*``); loading a version's model, in the background, uses a plain client.
    """
    store = LongTermStore(settings.redis_url)
    fast = LongTermStore(settings.redis_url, timeout_s=settings.redis_timeout_ms / 1000,
                         breaker=CircuitBreaker(settings.redis_breaker_failures, settings.redis_breaker_reset_s,
                                                settings.redis_breaker_max_reset_s))
    reader: LongTermReader
    if run is None:
        version = store.current_version()
        if version is None:
            raise UserError(f"nothing is published in Redis at {store.location} yet: "
                            "run `slsrec publish --run runs/NAME` first, or pass --run")
        published = load_version(store, settings.runs_dir, version)
        model, items, users, model_version = published.model, published.items, published.users, version
        reader = LongTermReader(fast, settings.redis_cache_ttl_s, telemetry=telemetry,
                                load=partial(load_version, store, settings.runs_dir), version=version,
                                worker_id=worker_id)
        source = store.meta(version).get("run", version)
    else:
        loaded = load_run(run)
        model, items, users, model_version, source = loaded.model, loaded.items, loaded.users, Path(run).name, str(run)
        reader = LongTermReader(fast, settings.redis_cache_ttl_s, str(run), telemetry, worker_id=worker_id)
    if not hasattr(model, "short_encoder"):
        raise CheckpointError(f"{source}: a {type(model).__name__} model cannot serve the stream; "
                              "train an slsrec model")
    trained_gap = getattr(model.config, "gap_ms", None)
    gap_ms = settings.session_gap_s * 1000
    if trained_gap not in (None, gap_ms):
        log.warning("session gap %d ms differs from the %d ms the model was trained with", gap_ms, trained_gap)
    return Recommender(model, items, reader, model_version=model_version, gap_ms=gap_ms,
                       max_segment=model.config.max_segment, top_k=settings.top_k,
                       exclude_seen=settings.exclude_seen, device=settings.torch_device(), telemetry=telemetry,
                       versions=reader.poll if run is None else None, drift=DriftMonitor(worker_id=worker_id),
                       users=users, max_open_sessions=settings.max_open_sessions,
                       max_session_events=settings.max_session_events, events=reader.take_events)

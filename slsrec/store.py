"""Versioned long-term vectors (and model files) in Redis. With :mod:`slsrec.latest` (the API's latest
recommendation per user), the only modules that talk to Redis; both report failures through
:func:`redis_errors`.

Key layout (``prefix`` defaults to ``slsrec``; ``{prefix}`` in braces is literal, a hash tag)::

    {prefix}:{{prefix}}:current              string  the current version id
    {prefix}:{{prefix}}:version_seq          string  counter behind version ids (only moves forward)
    {prefix}:{{prefix}}:v:{version}:meta     hash    seq, created_at, dim, n_users, lt_shards, format, + the publisher's
    {prefix}:{{prefix}}:v:{version}:model    hash    file name -> bytes (model.safetensors, config.json, ...)
    {prefix}:v:{version}:lt:{shard}         hash    user_id -> (dim+2) float32 little-endian: vector, log_norm, n_items

The same layout serves a single Redis and a Redis Cluster (a ``redis+cluster://`` or
``rediss+cluster://`` URL). A cluster runs a Lua script or a MULTI only on keys of one hash slot, and
the slot of a key with braces is that of the text inside them: so everything the two scripts touch
together (the counter, ``current``, a version's meta and model) carries the hash tag ``{prefix}`` and
lives on one slot, while the vectors, which hold nearly all the bytes and all the reads, are spread
over ``lt_shards`` hashes without a tag (a user's shard: crc32 of the id, modulo ``lt_shards``;
1 on a single Redis, 16 per primary on a cluster, fixed per version in its meta). Keeping the prefix
first keeps one glob (``slsrec:*``) for ACLs and clean-ups.

A user's entry is a :class:`LongTerm`: the model's long-term state of the user's history (for
SLSRec, the attention-weighted mean of the item embeddings, before the layer norm, and the
attention's log-normaliser and the number of items pooled), so the stream can fold a long
session's overflow into it. The
``format`` meta field names this layout (:data:`LT_FORMAT`); there is no other.

A version id is ``v{seq:06d}-{UTC time}`` (e.g. ``v000042-20261129T103000Z``); its ``seq`` orders
versions. :meth:`LongTermStore.publish` writes a whole version with pipelined writes while its keys
carry a safety TTL (so an aborted publish cleans itself up), makes the vector shards persistent, and
then one Lua script makes the meta and model persistent and moves ``current`` to it, refusing to
move backwards. The shards go first because they live on other slots than ``current``: whatever
``current`` names is always persistent; a publisher that dies between the two leaves orphan shards,
which the next publish expires with the versions it supersedes. Superseded versions expire after a
grace period, which lets readers that still hold the old id finish. A reader reads ``current`` first
and only then the vectors, so it never sees a half-written version.

>>> parse_seq("v000042-20261129T103000Z")
42
>>> parse_seq("latest") is None
True
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit

import cachetools
import numpy as np
import redis
import redis.asyncio
from pydantic import SecretStr
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from slsrec.breaker import CircuitBreaker
from slsrec.errors import DataError, ServiceError, Unavailable, UserError

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d{1,18})(-[A-Za-z0-9._]{1,64})*$")
_VECTOR_DTYPE = np.dtype("<f4")
LT_FORMAT = "2"  # meta "format": lt values are vector, log_norm, n_items (1 was the vector alone)
_PENDING_TTL_MS = 24 * 3600 * 1000  # an aborted publish vanishes after a day
_CHUNK = 1000  # users per HSET
_CHUNKS_PER_ROUND_TRIP = 8  # bounds client memory for huge versions
_SHARDS_PER_PRIMARY = 16  # vector hashes per cluster primary: about even bytes per node, few keys per read
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # URL scheme -> redis-py's

# Claims a version id for one publisher. KEYS: version_seq, current, meta. ARGV: seq, pending TTL.
# Returns {status, current}: 1 claimed (meta created, counter moved past seq), 0 id in use, -1 not newer.
_CLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0, ''} end
local cur = redis.call('GET', KEYS[2]) or ''
local cur_seq = tonumber(string.match(cur, '^v(%d+)'))
local n = tonumber(ARGV[1])
if cur_seq and cur_seq >= n then return {-1, cur} end
redis.call('HSET', KEYS[3], 'seq', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if n > tonumber(redis.call('GET', KEYS[1]) or '0') then redis.call('SET', KEYS[1], ARGV[1]) end
return {1, cur}
"""

# The switch, atomic because Redis runs a script alone. KEYS: current, meta, model (one slot).
# ARGV: version, seq. Returns {status, previous}: 1 switched, 0 not newer, -1 version missing.
_SWITCH = """
local cur = redis.call('GET', KEYS[1]) or ''
local cur_seq = tonumber(string.match(cur, '^v(%d+)'))
if cur_seq and cur_seq >= tonumber(ARGV[2]) then return {0, cur} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1, cur} end
redis.call('PERSIST', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1])
return {1, cur}
"""


def parse_seq(version: str) -> int | None:
    """The ordering number of a version id, or ``None`` if it is not one."""
    m = VERSION_RE.match(version)
    return int(m.group(1)) if m else None


def redis_location(url: SecretStr | str) -> str:
    """``host:port`` (or the socket path) of a Redis URL: what may be logged, never the password.

    >>> redis_location(SecretStr("rediss://:hunter2@cache.internal:6380/1"))
    'cache.internal:6380'
    """
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    parts = urlsplit(raw)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


def connect(url: str, *, aio: bool = False, **options):
    """A redis-py client for ``url`` (asyncio's with ``aio``): a ``RedisCluster`` for ``redis+cluster://``
    (or ``rediss+cluster://``) URLs, which finds every node from the one named, else a ``Redis``."""
    lib = redis.asyncio if aio else redis
    scheme, sep, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return lib.RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}{sep}{rest}", **options)
    return lib.Redis.from_url(url, **options)


def node_url(url: str) -> str:
    """The URL of the one node that ``url`` names: pub/sub needs a node, and on a cluster a message
    published on any node reaches the subscribers of every node.

    >>> node_url("redis+cluster://127.0.0.1:7001"), node_url("redis://h:1/2")
    ('redis://127.0.0.1:7001', 'redis://h:1/2')
    """
    scheme, sep, rest = url.partition("://")
    return f"{CLUSTER_SCHEMES.get(scheme, scheme)}{sep}{rest}"


def lt_shard(user_id: str, shards: int) -> int:
    """The vector shard of a user (stable across processes and releases).

    >>> lt_shard("u42", 1), lt_shard("u42", 48)
    (0, 46)
    """
    return zlib.crc32(user_id.encode()) % shards


@contextlib.contextmanager
def redis_errors(location: str, tls: bool) -> Iterator[None]:
    """Redis failures as one clear line naming host:port (redis-py never prints the password); a Redis
    that does not answer is :class:`Unavailable` (worth waiting for), anything else a ServiceError."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise ServiceError(f"Redis at {location} refused the credentials: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if isinstance(e.__context__, ssl.SSLError):
            raise ServiceError(f"Redis at {location}: TLS handshake failed (is ssl_ca_certs in the Redis URL "
                               f"the CA that signed the server's certificate?): {e}") from None
        # A TLS port hangs up on a plaintext client without a word.
        hint = (" (if that port serves TLS, use a rediss:// URL)"
                if isinstance(e.__context__, ConnectionResetError) and not tls else "")
        raise Unavailable(f"Redis at {location} is unreachable: {e}{hint}") from None
    except redis.RedisError as e:  # e.g. OOM under maxmemory, a read-only replica
        raise ServiceError(f"Redis at {location} refused a command: {e}") from None
    except redis.exceptions.RedisClusterException as e:  # no node answers, a slot without a node
        raise Unavailable(f"Redis Cluster at {location}: {e}") from None


class LongTerm(NamedTuple):
    """One user's published long-term state (``SLSRec.long_state`` of one user, as numpy)."""

    vector: np.ndarray  # (dim,) float32; for SLSRec the pooled mean before the layer norm
    log_norm: float  # the pooling's log-normaliser, what folding more items into the vector needs
    n_items: int  # items pooled, so a fold knows when the model's long_len window is full


def encode_long_term(entry: LongTerm) -> bytes:
    """(dim+2) float32 little-endian: the vector, the log-normaliser, the item count (an ``lt`` value).

    >>> decode_long_term(encode_long_term(LongTerm(np.array([1.5, -2.0]), 0.25, 7)))
    LongTerm(vector=array([ 1.5, -2. ], dtype=float32), log_norm=0.25, n_items=7)
    """
    return np.append(np.asarray(entry.vector, dtype=_VECTOR_DTYPE), [entry.log_norm, entry.n_items]).astype(
        _VECTOR_DTYPE).tobytes()


def decode_long_term(b: bytes) -> LongTerm:
    """The entry of an ``lt`` hash value; the vector is a read-only float32 view (no copy)."""
    v = np.frombuffer(b, dtype=_VECTOR_DTYPE)
    return LongTerm(v[:-2], float(v[-2]), int(v[-1]))


class VersionError(UserError):
    """A version id that is malformed, not newer than the current one, or gone."""


def _client_options(timeout_s: float | None) -> dict:
    """redis-py options. By default (publish, retrain, the CLI) a generous timeout and redis-py's own
    retries with exponential backoff. With ``timeout_s`` (the flow's hot path) every call has that
    deadline and is never retried inside the call: the caller's :class:`CircuitBreaker` decides when
    to try again, so a frozen Redis costs one deadline, not a chain of backed-off retries."""
    if timeout_s is None:
        return {"socket_connect_timeout": 5, "socket_timeout": 30,
                "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), 3)}
    return {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}


@dataclass(frozen=True)
class PublishResult:
    version: str
    previous: str | None  # the version it replaced, now expiring
    n_users: int
    dim: int
    seconds: float  # writing the vectors and switching
    vectors_per_s: float


class LongTermStore:
    """Versioned long-term vectors in Redis.

    Parameters
    ----------
    url
        Redis URL, may carry a password (``redis://:pw@host``) or TLS (``rediss://``). Only its
        ``host:port`` is ever logged or shown.
    prefix
        Key namespace, so several deployments (or tests) can share one Redis.
    """

    def __init__(self, url: SecretStr | str, prefix: str = "slsrec", timeout_s: float | None = None,
                 breaker: CircuitBreaker | None = None):
        secret = url if isinstance(url, SecretStr) else SecretStr(url)
        self.location = redis_location(secret)
        self._tls = urlsplit(secret.get_secret_value()).scheme.startswith("rediss")
        if "{" in prefix or "}" in prefix:
            raise UserError(f"Redis key prefix {prefix!r}: braces are not allowed (they would move its hash slot)")
        self.prefix = prefix
        self.breaker = breaker
        with self._errors():  # a cluster client asks for the slot map here
            self._r = connect(secret.get_secret_value(), **_client_options(timeout_s))
        self.cluster = isinstance(self._r, redis.RedisCluster)
        self.lt_shards = _SHARDS_PER_PRIMARY * len(self._r.get_primaries()) if self.cluster else 1
        self._shards: cachetools.LRUCache = cachetools.LRUCache(maxsize=64)  # version -> its lt_shards
        self._claim_script = self._r.register_script(_CLAIM)
        self._switch = self._r.register_script(_SWITCH)

    def __repr__(self) -> str:
        return f"LongTermStore({self.location!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._r.close()

    # Keys.
    def _tagged(self, name: str) -> str:
        """A key in the slot of ``current`` (the hash tag ``{prefix}``)."""
        return f"{self.prefix}:{{{self.prefix}}}:{name}"

    def _key(self, version: str, part: str) -> str:
        return self._tagged(f"v:{version}:{part}")

    def _lt_key(self, version: str, shard: int | str) -> str:
        return f"{self.prefix}:v:{version}:lt:{shard}"

    def _version_shards(self, version: str) -> int | None:
        """The version's number of vector shards, or ``None`` once it has expired."""
        shards = self._shards.get(version)
        if shards is None:
            with self._errors():
                raw = self._r.hget(self._key(version, "meta"), "lt_shards")
            if raw is None:
                return None
            shards = self._shards[version] = int(raw)
        return shards

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """:func:`redis_errors`, through the breaker when there is one: a call it does not allow fails at
        once with :class:`Unavailable`, and every call's outcome is recorded (a refused command counts
        as an answer: Redis is there)."""
        if self.breaker is None:
            with redis_errors(self.location, self._tls):
                yield
            return
        if not self.breaker.allow():
            raise Unavailable(f"Redis at {self.location}: circuit open after repeated failures")
        try:
            with redis_errors(self.location, self._tls):
                yield
        except Unavailable:
            self.breaker.record_failure()
            raise
        except ServiceError:
            self.breaker.record_success()
            raise
        self.breaker.record_success()

    # Reading.
    def current_version(self) -> str | None:
        """The version readers should use now, or ``None`` before the first publish."""
        with self._errors():
            v = self._r.get(self._tagged("current"))
        return v.decode() if v is not None else None

    def get_many(self, version: str, user_ids: Sequence[str]) -> list[LongTerm | None]:
        """Long-term entries of ``user_ids`` in ``version`` in one round trip (the first read of a version
        also fetches its shard count); ``None`` = no entry."""
        if not user_ids or (shards := self._version_shards(version)) is None:
            return [None] * len(user_ids)
        with self._errors():
            if shards == 1:
                raw = self._r.hmget(self._lt_key(version, 0), list(user_ids))
            else:  # one HMGET per shard, sent together (a cluster client sends each node its own)
                positions: dict[int, list[int]] = {}  # shard -> indexes into user_ids
                for i, u in enumerate(user_ids):
                    positions.setdefault(lt_shard(u, shards), []).append(i)
                pipe = self._r.pipeline(transaction=False)
                for shard, idx in positions.items():
                    pipe.hmget(self._lt_key(version, shard), [user_ids[i] for i in idx])
                raw = [None] * len(user_ids)
                for idx, values in zip(positions.values(), pipe.execute()):
                    for i, b in zip(idx, values):
                        raw[i] = b
        return [None if b is None else decode_long_term(b) for b in raw]

    def meta(self, version: str) -> dict[str, str]:
        """The version's metadata (empty once it has expired)."""
        with self._errors():
            m = self._r.hgetall(self._key(version, "meta"))
        return {k.decode(): v.decode() for k, v in m.items()}

    def model_files(self, version: str) -> dict[str, bytes]:
        """The model files published with ``version`` (file name -> bytes); empty when none."""
        with self._errors():
            files = self._r.hgetall(self._key(version, "model"))
        return {k.decode(): v for k, v in files.items()}

    def versions(self) -> list[str]:
        """Versions still in Redis (current, expiring, or being written), oldest first."""
        found = (self._version_of(k) for k in self._scan(self._key("*", "meta")))
        return sorted((v for v in found if parse_seq(v) is not None), key=parse_seq)

    def _scan(self, pattern: str) -> list[str]:
        with self._errors():  # a cluster client scans every primary
            return [k.decode() for k in self._r.scan_iter(match=pattern, count=1000)]

    def _version_of(self, key: str) -> str:
        """The version named by a version key (meta, model or a vector shard)."""
        return key.rsplit(":v:", 1)[1].split(":", 1)[0]  # a version id has no colon

    # Writing.
    def new_version(self) -> str:
        """A fresh version id, higher than any handed out before on this Redis."""
        with self._errors():
            seq = self._r.incr(self._tagged("version_seq"))
        return f"v{seq:06d}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"

    def _claim(self, version: str) -> int:
        """Make ``version`` this publisher's alone (its meta key) if it is unused and newer than current.

        Generated ids pass by construction; an explicit id also moves the counter past it, so that
        later generated ids sort after it.
        """
        seq = parse_seq(version)
        if seq is None:
            raise VersionError(f"bad version id {version!r}: expected v<number>[-label], e.g. v42-nightly")
        keys = [self._tagged("version_seq"), self._tagged("current"), self._key(version, "meta")]
        with self._errors():
            status, current = self._claim_script(keys=keys, args=[seq, _PENDING_TTL_MS])
        if status == 0:
            raise VersionError(f"version {version} already exists in Redis; pick a new id")
        if status == -1:
            raise VersionError(f"version {version} is not newer than the current version {current.decode()}")
        return seq

    def publish(
        self,
        version: str | None,
        vectors: Mapping[str, LongTerm],
        meta: Mapping[str, str | int | float] | None = None,
        model_files: Mapping[str, bytes] | None = None,
        grace_s: float = 3600.0,
    ) -> PublishResult:
        """Write a whole version, switch ``current`` to it atomically, expire the ones it replaces.

        Parameters
        ----------
        version
            ``None`` for a fresh id, or one from :meth:`new_version`, or an explicit
            ``v<number>[-label]``; it must be unused and newer than the current version.
        vectors
            user_id -> :class:`LongTerm`; vectors all of one length, everything finite.
        meta
            Extra fields for the ``meta`` hash (e.g. ``run``).
        model_files
            File name -> bytes of the model that serves with these vectors.
        grace_s
            How long superseded versions stay readable.
        """
        dim = _check_vectors(vectors)
        version = version or self.new_version()
        seq = self._claim(version)
        meta_key, model_key = self._key(version, "meta"), self._key(version, "model")
        fields = {
            **{k: str(v) for k, v in (meta or {}).items()},
            "seq": str(seq),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dim": str(dim),
            "n_users": str(len(vectors)),
            "lt_shards": str(self.lt_shards),
            "format": LT_FORMAT,
        }
        by_shard: dict[str, list[str]] = {}
        for u in vectors:
            by_shard.setdefault(self._lt_key(version, lt_shard(u, self.lt_shards)), []).append(u)
        t0 = time.perf_counter()
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(meta_key, mapping=fields)
            if model_files:
                pipe.hset(model_key, mapping=dict(model_files))
            for key in (meta_key, model_key):
                pipe.pexpire(key, _PENDING_TTL_MS)
            writes = 0
            for lt, users in by_shard.items():
                for start in range(0, len(users), _CHUNK):
                    pipe.hset(lt, mapping={u: encode_long_term(vectors[u]) for u in users[start : start + _CHUNK]})
                    if start == 0:
                        pipe.pexpire(lt, _PENDING_TTL_MS)
                    writes += 1
                    if writes % _CHUNKS_PER_ROUND_TRIP == 0:
                        pipe.execute()
            for lt in by_shard:  # before the switch: current never names a version that can expire
                pipe.persist(lt)
            pipe.execute()
            keys = [self._tagged("current"), meta_key, model_key]
            status, previous = self._switch(keys=keys, args=[version, seq])
            seconds = time.perf_counter() - t0
            previous = previous.decode() or None
            if status != 1:
                self._r.delete(meta_key, model_key, *by_shard)  # never served, and no longer servable
            if status == 0:
                raise VersionError(f"version {version} is not newer than the current version {previous}")
            if status == -1:
                raise VersionError(f"version {version} expired before it could be switched to")
            self._expire_older(seq, grace_s)
        result = PublishResult(version, previous, len(vectors), dim, seconds, len(vectors) / max(seconds, 1e-9))
        log.info("published %s (%d users, dim %d) to Redis %s in %.2fs, %.0f vectors/s, replacing %s",
                 version, result.n_users, dim, self.location, seconds, result.vectors_per_s, previous)
        return result

    def _expire_older(self, seq: int, grace_s: float) -> None:
        # Every key of an older version: meta and model by the tag, vector shards by their own pattern
        # (which also finds the shards of a publish that died before its switch).
        # LT: never extends an expiry already set (earlier supersessions, aborted publishes).
        keys = self._scan(self._key("*", "*")) + self._scan(self._lt_key("*", "*"))
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            if (found := parse_seq(self._version_of(key))) is not None and found < seq:
                pipe.pexpire(key, max(1, int(grace_s * 1000)), lt=True)
        pipe.execute()


def _check_vectors(vectors: Mapping[str, LongTerm]) -> int:
    """The common dimension of the vectors; DataError names the first bad entry."""
    dim = None
    for user, entry in vectors.items():
        if not isinstance(entry, LongTerm):
            raise DataError(f"long-term entry of user {user!r} is a {type(entry).__name__}, expected "
                            "LongTerm(vector, log_norm, n_items)")
        v = np.asarray(entry.vector)
        if v.ndim != 1 or (dim is not None and v.shape[0] != dim):
            raise DataError(f"long-term vector of user {user!r} has shape {v.shape}, expected ({dim or 'd'},)")
        if not (np.isfinite(v).all() and np.isfinite(entry.log_norm)):
            raise DataError(f"long-term entry of user {user!r} is not finite")
        if not 0 < entry.n_items < 2**24:  # a float32 holds the count exactly
            raise DataError(f"long-term entry of user {user!r} pools {entry.n_items} items, expected 1 to 2**24-1")
        dim = v.shape[0]
    return dim or 0



class CachedLongTerm:
    """A cache in front of :meth:`LongTermStore.get_many`, for the flow's hot path.

    Entries are keyed by (version, user_id), so a version switch never serves a stale version's
    entry. A published version's vectors never change (:meth:`LongTermStore.publish` writes a whole
    version before switching to it), so a cached vector is served until ``maxsize`` pushes it out:
    Redis is asked only for users it has not seen. A known absence (a cold user) expires after
    ``ttl_s``, which bounds how long a user may still look cold. Misses of one call are fetched in
    one round trip. Every entry, however old, is also kept for :meth:`stale`, what the flow serves
    while Redis does not answer.

    Parameters
    ----------
    store
        Anything with ``get_many(version, user_ids)``.
    ttl_s
        Seconds a known absence is served from memory.
    maxsize
        Entries kept at most; the least recently used go first.
    clock
        Monotonic seconds; tests pass their own.
    """

    def __init__(self, store: LongTermStore, ttl_s: float, maxsize: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl_s = ttl_s
        self.maxsize = maxsize
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._cache: cachetools.LRUCache = cachetools.LRUCache(maxsize=maxsize)  # key -> (fetched at, entry)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def get_many(self, version: str, user_ids: Sequence[str]) -> list[LongTerm | None]:
        """Like :meth:`LongTermStore.get_many`, answering from memory where it can."""
        out: list[LongTerm | None] = []
        missing: dict[str, list[int]] = {}  # user -> positions in out
        fresh_after = self.clock() - self.ttl_s
        for i, u in enumerate(user_ids):
            at, v = self._cache.get((version, u), _EXPIRED)
            if v is not None or at > fresh_after:
                out.append(v)
                self.hits += 1
            else:
                out.append(None)
                missing.setdefault(u, []).append(i)
                self.misses += 1
        if missing:
            fetched = self.store.get_many(version, list(missing))
            now = self.clock()
            for (u, positions), v in zip(missing.items(), fetched):
                self._cache[(version, u)] = (now, v)
                for i in positions:
                    out[i] = v
        return out

    def clear(self) -> None:
        """Forget every entry: a Redis restarted empty may hold other vectors under the same version ids."""
        self._cache.clear()

    def stale(self, version: str, user_ids: Sequence[str]) -> list[LongTerm | None]:
        """The entries in memory, however old, without asking the store; ``None`` where there is none."""
        return [self._cache.get((version, u), _EXPIRED)[1] for u in user_ids]


_EXPIRED = (-float("inf"), None)

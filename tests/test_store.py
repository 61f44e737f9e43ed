"""LongTermStore and CachedLongTerm against a real Redis and a real Redis Cluster: exact entries
(vector and log-normaliser), atomic version switch, expiry of old versions, versions only moving
forward, no secret in errors, logs or repr; on the cluster, vectors spread over every primary."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from pydantic import SecretStr

from slsrec import local
from slsrec.errors import DataError, ServiceError
from slsrec.settings import Settings
from slsrec.store import LT_FORMAT, CachedLongTerm, LongTerm, LongTermStore, VersionError, connect, parse_seq

pytestmark = pytest.mark.integration


REDIS_URL = f"redis://{local.REDIS.host}:{local.REDIS.port}/0"


@pytest.fixture(params=["single", "cluster"])
def store_url(request, services) -> Iterator[str]:
    """The shared single Redis, or the local Redis Cluster (held by this test alone, emptied after)."""
    if request.param == "single":
        yield REDIS_URL
        return
    request.getfixturevalue("redis_cluster")
    with local.scratch_redis_cluster() as url:
        yield url


@pytest.fixture
def store(store_url, redis_prefix) -> Iterator[LongTermStore]:
    s = LongTermStore(store_url, prefix=redis_prefix)  # a namespace of its own on the shared Redis
    yield s
    s.close()


@pytest.fixture
def protected_redis(services, tmp_path) -> Iterator[int]:
    """A throwaway password-protected redis-server (s3cret-pw) on a spare port; the shared one has none."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "s3cret-pw"],
                            stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _vectors(n: int, dim: int, seed: int) -> dict[str, LongTerm]:
    rng = np.random.default_rng(seed)
    return {f"user-{i}": LongTerm(rng.standard_normal(dim).astype(np.float32), float(np.float32(rng.normal() * 5)),
                                  int(rng.integers(1, 2**24))) for i in range(n)}


def _ones(dim: int, value: float = 1.0) -> LongTerm:
    return LongTerm(np.full(dim, value, np.float32), value, 1)


def test_publish_then_read_back_exact_vectors(store):
    vectors = _vectors(2500, 16, seed=0)  # several chunks
    files = {"model.safetensors": bytes(range(256)) * 10, "config.json": b'{"d": 16}'}
    result = store.publish(None, vectors, meta={"run": "runs/test"}, model_files=files)

    assert store.current_version() == result.version and result.previous is None
    assert result.n_users == 2500 and result.dim == 16 and result.vectors_per_s > 0
    users = ["user-2499", "nobody", "user-0", "user-1234"]
    got = store.get_many(result.version, users)
    assert got[1] is None
    for u, entry in zip(users, got):
        if u != "nobody":
            assert entry.vector.dtype == np.float32 and np.array_equal(entry.vector, vectors[u].vector)
            assert entry.log_norm == vectors[u].log_norm != 0 and entry.n_items == vectors[u].n_items
    meta = store.meta(result.version)
    assert (meta["run"], meta["dim"], meta["n_users"], meta["format"]) == ("runs/test", "16", "2500", LT_FORMAT)
    assert store.model_files(result.version) == files
    assert store.get_many(result.version, []) == []


def test_no_version_before_first_publish(store):
    assert store.current_version() is None and store.versions() == []


class _RacingVectors(Mapping):
    """Vectors whose write phase lets another publisher switch first (a deterministic race)."""

    def __init__(self, vectors, during_write):
        self._v, self._during_write, self._iterations = vectors, during_write, 0

    def __getitem__(self, k):
        return self._v[k]

    def __len__(self):
        return len(self._v)

    def __iter__(self):
        self._iterations += 1
        if self._iterations == 2:  # the first pass validates, the second writes
            self._during_write()
        return iter(self._v)


def test_versions_only_move_forward(store, store_url):
    first = store.publish(None, _vectors(10, 4, seed=1)).version
    second = store.publish(None, _vectors(10, 4, seed=2)).version
    assert parse_seq(second) > parse_seq(first) and store.versions() == [first, second]

    with pytest.raises(VersionError, match="not newer than the current version"):
        store.publish("v1-again", _vectors(10, 4, seed=3))
    with pytest.raises(VersionError, match="bad version id"):
        store.publish("latest", _vectors(10, 4, seed=3))
    assert store.current_version() == second

    # An id in use is never written twice: the live version keeps its vectors.
    live = store.get_many(second, ["user-0"])[0].vector.copy()
    with pytest.raises(VersionError, match="already exists"):
        store.publish(second, _vectors(10, 4, seed=3))
    assert np.array_equal(store.get_many(second, ["user-0"])[0].vector, live) and store.meta(second)["n_users"] == "10"

    # An id taken with new_version() first (to name a run before publishing it) is usable once.
    reserved = store.new_version()
    assert store.publish(reserved, _vectors(10, 4, seed=3)).version == reserved == store.current_version()

    # An explicit id may jump ahead; generated ids continue after it.
    assert store.publish("v1000-nightly", _vectors(10, 4, seed=4)).version == "v1000-nightly"
    assert parse_seq(store.new_version()) == 1001

    # A slow publisher overtaken by a newer one must not move current backwards.
    newer = []
    slow = _RacingVectors(_vectors(10, 4, seed=5),
                          lambda: newer.append(store.publish(None, _vectors(10, 4, seed=6)).version))
    with pytest.raises(VersionError, match="not newer than the current version"):
        store.publish(None, slow)
    assert store.current_version() == newer[0]
    # The overtaken version (seq 1002) is deleted, vector shards too; the superseded ones stay for
    # their grace period.
    assert [parse_seq(v) for v in store.versions()] == [1, 2, 3, 1000, 1003]
    assert not [k for k in connect(store_url).scan_iter(match=f"{store.prefix}:*") if b":v:v001002-" in k]


def test_reader_never_sees_a_half_written_version(store, store_url):
    n, dim = 20_000, 8
    users = [f"user-{i}" for i in range(n)]
    probe = users[:: n // 50] + users[-10:]  # includes the last chunk written
    seen, problems, done = [], [], threading.Event()

    def read():
        reader = LongTermStore(store_url, prefix=store.prefix)
        while not done.is_set():
            version = reader.current_version()
            if version is None:
                continue
            vs = reader.get_many(version, probe)
            marker = float(reader.meta(version)["marker"])
            if any(v is None or v.vector[0] != marker or v.log_norm != marker for v in vs):
                problems.append(version)
            seen.append(version)
        reader.close()

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for marker in range(1, 4):
            store.publish(None, {u: _ones(dim, marker) for u in users}, meta={"marker": marker})
    finally:
        done.set()
        thread.join()
    assert not problems
    assert len(set(seen)) >= 2, "the reader should have observed switches"
    assert [parse_seq(v) for v in seen] == sorted(parse_seq(v) for v in seen)


def test_cluster_spreads_vectors_over_every_primary_and_keeps_the_switch_on_one_slot(redis_cluster, redis_prefix):
    with local.scratch_redis_cluster() as url:
        store, client = LongTermStore(url, prefix=redis_prefix), connect(url)
        result = store.publish(None, _vectors(3000, 4, seed=0), model_files={"config.json": b"{}"})
        keys = [k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*")]
        shards = [k for k in keys if ":lt:" in k]
        assert len(shards) == store.lt_shards == 16 * 3 and int(store.meta(result.version)["lt_shards"]) == 48
        assert len({client.get_node_from_key(k).name for k in shards}) == 3
        switched_together = [k for k in keys if ":lt:" not in k]  # current, version_seq, meta, model
        assert len(switched_together) == 4 and len({client.keyslot(k) for k in switched_together}) == 1
        assert store.get_many(result.version, ["user-7", "user-2999"])[1].n_items > 0


def test_orphan_shards_of_a_publish_that_died_before_its_switch_expire_at_the_next_publish(store, store_url):
    client = connect(store_url)
    dead = store.new_version()  # its publisher wrote and persisted a shard, then died
    client.hset(f"{store.prefix}:v:{dead}:lt:0", "user-0", b"x")
    store.publish(None, _vectors(5, 4, seed=1), grace_s=0.3)
    assert 0 < client.pttl(f"{store.prefix}:v:{dead}:lt:0") <= 300


def test_old_versions_expire_after_grace(store):
    old = store.publish(None, _vectors(5, 4, seed=1), model_files={"config.json": b"{}"}).version
    new = store.publish(None, _vectors(5, 4, seed=2), grace_s=0.3).version
    assert store.get_many(old, ["user-0"])[0] is not None  # still readable during the grace period
    time.sleep(0.6)
    assert store.get_many(old, ["user-0"]) == [None] and store.model_files(old) == {}
    assert store.versions() == [new] and store.get_many(new, ["user-0"])[0] is not None


def test_bad_vectors_are_refused_before_anything_is_written(store):
    with pytest.raises(DataError, match="user-3"):
        store.publish(None, {**_vectors(3, 4, seed=0), "user-3": _ones(5)})
    with pytest.raises(DataError, match="not finite"):
        store.publish(None, {"u": LongTerm(np.array([1.0, np.nan]), 0.0, 1)})
    with pytest.raises(DataError, match="'u' is not finite"):  # a cold user has no entry, not -inf
        store.publish(None, {"u": LongTerm(np.ones(2), -np.inf, 0)})
    with pytest.raises(DataError, match="pools 0 items"):
        store.publish(None, {"u": LongTerm(np.ones(2), 0.0, 0)})
    with pytest.raises(DataError, match="expected LongTerm"):
        store.publish(None, {"u": np.ones(2)})
    assert store.current_version() is None and store.versions() == []


def test_cache_keeps_vectors_and_refreshes_absences_after_ttl(store):
    v = store.publish(None, _vectors(3, 4, seed=0)).version
    cache = CachedLongTerm(store, ttl_s=0.3)
    first = cache.get_many(v, ["user-0", "user-1", "ghost", "user-0"])
    assert first[2] is None and first[0] is first[3]
    assert (cache.hits, cache.misses) == (0, 4)
    again = cache.get_many(v, ["user-0", "ghost"])
    assert again[0] is first[0] and again[1] is None
    assert (cache.hits, cache.misses) == (2, 4)

    # A user published later is no longer cold once the cached absence expires.
    v2 = store.publish(None, {**_vectors(3, 4, seed=0), "ghost": _ones(4)}).version
    assert cache.get_many(v2, ["ghost"])[0] is not None  # a new version is a new cache key
    time.sleep(0.4)
    assert cache.get_many(v, ["ghost"]) == [None]  # v is still there (grace period) and has no ghost
    assert cache.misses == 6 and cache.hit_rate == 2 / 8
    # A version's vectors never change: past the TTL a cached vector is still served without Redis.
    assert cache.get_many(v, ["user-1"])[0] is first[1] and cache.misses == 6


def test_secrets_stay_out_of_errors_logs_and_repr(protected_redis, caplog):
    caplog.set_level(logging.DEBUG)
    settings = Settings(redis_url="redis://:s3cret-pw@127.0.0.1:1/0")  # nothing listens on port 1
    down = LongTermStore(settings.redis_url)
    with pytest.raises(ServiceError) as info:
        down.current_version()
    assert "127.0.0.1" in str(info.value) and "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in repr(down) and "s3cret-pw" not in repr(settings)

    # A password-protected Redis: the password passes through, and is never shown.
    port = protected_redis
    protected = LongTermStore(SecretStr(f"redis://:s3cret-pw@127.0.0.1:{port}/0"))
    protected.publish(None, {"u": _ones(3)})
    assert f"127.0.0.1:{port}" in caplog.text
    wrong = LongTermStore(SecretStr(f"redis://:wrong-pw@127.0.0.1:{port}/0"))
    with pytest.raises(ServiceError, match="refused the credentials") as info:
        wrong.current_version()
    assert "wrong-pw" not in str(info.value)
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text

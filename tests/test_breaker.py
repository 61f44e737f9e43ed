"""The circuit breaker alone (slsrec/breaker.py), and in front of a Redis that does not answer."""

from __future__ import annotations

import socket
import time

import pytest

from slsrec.breaker import CircuitBreaker
from slsrec.errors import Unavailable
from slsrec.store import LongTermStore


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_success_in_between_resets_the_count_of_failures():
    b = CircuitBreaker(failures=3, clock=Clock())
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state == "closed" and b.opened == 0


def test_backoff_doubles_per_failed_probe_up_to_the_cap_and_resets_on_success():
    clock = Clock()
    b = CircuitBreaker(failures=1, reset_s=1.0, max_reset_s=5.0, clock=clock)
    b.record_failure()
    waits = []
    for _ in range(5):
        opened_at = clock.t
        while not b.allow():
            clock.t += 0.25
        waits.append(clock.t - opened_at)
        assert b.state == "half_open"
        b.record_failure()
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.t += 5.0
    assert b.allow()
    b.record_success()
    assert (b.state, b.open_for_s, b.opened, b.closed) == ("closed", 1.0, 1, 1)


def test_half_open_lets_exactly_one_probe_through():
    clock = Clock()
    b = CircuitBreaker(failures=1, reset_s=1.0, clock=clock)
    b.record_failure()
    clock.t = 1.0
    assert [b.allow() for _ in range(4)] == [True, False, False, False]


@pytest.fixture
def dead_redis_url() -> str:
    """A loopback port that nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_store_with_a_breaker_stops_calling_a_dead_redis(dead_redis_url):
    breaker = CircuitBreaker(failures=2, reset_s=60.0)
    store = LongTermStore(dead_redis_url, timeout_s=0.05, breaker=breaker)
    for _ in range(2):
        with pytest.raises(Unavailable, match="is unreachable"):
            store.get_many("v1", ["u1"])
    assert breaker.state == "open"
    t0 = time.perf_counter()
    with pytest.raises(Unavailable, match="circuit open"):
        store.current_version()
    assert time.perf_counter() - t0 < 0.01  # no network call at all


def test_a_frozen_redis_costs_one_deadline_per_call():
    """A listening socket that never answers (a SIGSTOPped Redis looks the same): the call gives up
    after the deadline instead of redis-py's retries."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel accepts connections; nobody reads
        store = LongTermStore(f"redis://127.0.0.1:{server.getsockname()[1]}/0", timeout_s=0.05)
        t0 = time.perf_counter()
        with pytest.raises(Unavailable, match="Timeout"):
            store.get_many("v1", ["u1"])
        assert time.perf_counter() - t0 < 1.0  # redis-py alone would retry with backoff for seconds

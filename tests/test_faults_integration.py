"""Faults through the real flow, on a private Kafka and Redis (never the shared ones, which other
tests use): Redis frozen and emptied, kill -9 of the flow, Kafka restarted, malformed input (the short
chaos suite), and SIGTERM / kill -9 of a multi-process flow leaving no process behind.

The full suite with its figures is ``slsrec chaos`` (docs/benchmarks.md); these are shorter runs of
the same code with the same claims: nothing lost, the flow up at the end, recommendations going on
while Redis is away, flagged as degraded, and the flow back to normal by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import live_processes, wait_until
from slsrec import health, local
from slsrec.chaos import Chaos, _Stream

pytestmark = pytest.mark.integration

OUTAGE_S = 6.0


@pytest.fixture(scope="module")
def chaos():
    pair = local.PrivatePair("chaos-test", kafka_port=19192, redis_port=16479)
    c = Chaos(pair, duration_s=15.0, outage_s=OUTAGE_S, rate=100.0, kill_every_s=6.0, drain_s=90.0)
    try:
        c.setup()
        yield c
    finally:
        pair.down()


def test_redis_frozen_recommendations_go_on_flagged_and_recover(chaos):
    r = chaos.run("redis-frozen")
    assert (r.lost, r.flow_up) == (0, True), r
    assert r.degraded > 0, r  # served during the outage, flagged cached / unavailable
    # The stream never waited for Redis: no pause anywhere near the outage's length.
    assert r.gap_in_fault_s < OUTAGE_S / 2, r
    assert r.health == ["degraded", "recovered"], r


def test_redis_restarted_empty_is_detected_and_a_publish_restores_it(chaos):
    r = chaos.run("redis-empty")
    assert (r.lost, r.flow_up) == (0, True), r
    assert r.degraded > 0, r
    # "recovered" comes only once the reader uses the republished version (numbered from 1 again).
    assert r.health == ["degraded", "recovered"], r
    assert any(n.startswith("republished v000001-") for n in r.notes), r


def test_kill_9_of_the_flow_loses_nothing(chaos):
    r = chaos.run("kill-flow")
    assert r.restarts >= 2, r  # at t = 6 s and 12 s
    assert (r.lost, r.flow_up) == (0, True), r


def test_kafka_restarted_every_sent_event_is_recommended(chaos):
    r = chaos.run("kafka-restart")
    # Kafka acknowledged every event the harness made, across the restart (none left out as not sent),
    # and the flow recommended each of them.
    assert (r.unacked, r.lost, r.flow_up) == (0, 0, True), r
    assert r.sent > 0, r


def test_events_kafka_never_acknowledges_are_reported_not_sent_and_the_run_goes_on():
    # No broker on this port: the load producer gives up drain_s after its stream instead of hanging the
    # run, and what it made is "not sent", never counted against the flow.
    c = Chaos(local.PrivatePair("chaos-nowhere", kafka_port=19999, redis_port=16999), duration_s=2.0, rate=10.0,
              drain_s=3.0)
    stream = _Stream()
    t0 = time.monotonic()
    c._produce(c.settings, stream, False, threading.Event(), local.QUIET)
    assert time.monotonic() - t0 < 15
    assert len(stream.sent) == 0 and stream.unacked > 0, stream
    assert stream.unacked_why.startswith("no metadata from Kafka"), stream.unacked_why


def test_malformed_input_is_dead_lettered_and_valid_events_all_recommended(chaos):
    r = chaos.run("malformed")
    assert (r.lost, r.flow_up, r.duplicates) == (0, True, 0), r
    assert r.junk_sent > 0 and r.dead_letters == r.junk_sent, r


# ---- stopping a multi-process flow ----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    return [p for p, parent, _ in live_processes() if parent == pid]


def _alive(pid: int) -> bool:
    return any(p == pid for p, _, _ in live_processes())


def _start_cluster(chaos: Chaos, topics, tmp_path: Path) -> tuple[subprocess.Popen, list[int], object]:
    settings = topics.model_copy(update={"recovery_dir": tmp_path / "recovery", "health_dir": tmp_path / "health"})
    env = {**os.environ, **settings.to_env()}
    parent = subprocess.Popen([sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--processes",
                               "2", "--run", str(chaos.run_dir)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "flow.log", "wb"), start_new_session=True)
    ready = wait_until(lambda: health.probe(settings.health_dir, 30, ready=True)[0]
                       and len(list(settings.health_dir.glob("process-*.json"))) == 2, 180)
    assert ready, (tmp_path / "flow.log").read_text()[-3000:]
    workers = _children(parent.pid)
    assert len(workers) == 2
    return parent, workers, settings


def test_sigterm_stops_a_multi_process_flow_and_every_worker(chaos, tmp_path):
    with local.scratch_topics(chaos.settings, "sigterm.") as topics:
        parent, workers, settings = _start_cluster(chaos, topics, tmp_path)
        try:
            t0 = time.monotonic()
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(15) == 0  # a clean stop by signal is not an error
            assert wait_until(lambda: not any(_alive(w) for w in workers), 5)
            assert time.monotonic() - t0 < 15
            assert list(settings.health_dir.glob("process-*.json")) == []  # no one claims to be alive
        finally:
            os.killpg(parent.pid, signal.SIGKILL) if parent.poll() is None else None


def test_kill_9_of_the_parent_takes_its_workers_along(chaos, tmp_path):
    with local.scratch_topics(chaos.settings, "kill9.") as topics:
        parent, workers, _ = _start_cluster(chaos, topics, tmp_path)
        try:
            parent.kill()
            parent.wait()
            # the kernel's parent-death signal: SIGTERM to each worker, which then stops cleanly
            assert wait_until(lambda: not any(_alive(w) for w in workers), 15), [w for w in workers if _alive(w)]
        finally:
            for w in workers:
                if _alive(w):
                    os.kill(w, signal.SIGKILL)

"""Shards: the stateful step's keys (one per worker) and the logic that holds a shard's sessions."""

from __future__ import annotations

import pickle
import time
import zlib
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.run import cli_main
from bytewax.testing import TestingSource  # the source of the shard-key probe

from schemas.drift import DriftAlert
from schemas.events import ClickEvent, DeadLetter, Recommendation, SessionClosed
from slsrec.errors import ServiceError
from slsrec.serving.recommender import Origin, Recommender
from slsrec.serving.sessions import SessionTable

Decoded = tuple[ClickEvent, Origin]
Output = Recommendation | DeadLetter | SessionClosed | DriftAlert


def shard_keys(workers: int) -> list[str]:
    """One key per worker, such that Bytewax routes key ``i`` to worker ``i``.

    Bytewax sends a key to the worker its hash picks; with a few arbitrary keys some workers get
    none (keys "0".."3" all land on one of 2 workers). A tiny local flow with the same worker count
    shows where candidate keys go (milliseconds), so that each worker owns exactly one shard and
    batches across all of its users.
    """
    if workers == 1:
        return ["0"]
    owner: dict[int, str] = {}

    def record(step_id: str, item: tuple[str, str], epoch: int, worker: int) -> None:
        owner.setdefault(worker, item[0])

    probe = Dataflow("shard_probe")
    keys = op.key_on("key", op.input("candidates", probe, TestingSource([str(i) for i in range(64 * workers)])), str)
    op.inspect_debug("owner", op.stateful_map("route", keys, keep_state), record)
    cli_main(probe, workers_per_process=workers)
    if len(owner) < workers:
        raise ServiceError(f"could not find a shard key for each of {workers} workers")
    return [owner[w] for w in range(workers)]


def keep_state(state: None, value: str) -> tuple[None, str]:
    return state, value


def shard_of(keys: list[str], item: Decoded) -> str:
    """The shard of the event's user, by a stable hash: all of a user's events, in order."""
    return keys[zlib.crc32(item[0].user_id.encode()) % len(keys)]


class ShardLogic(StatefulBatchLogic):
    """The open sessions of one shard, fed in micro-batches of up to ``batch_size`` events.

    A batch starts at least ``batch_timeout_ms`` after the previous one ended, so that a batch
    gathers what arrived meanwhile; events that arrived while the shard was busy have already waited,
    and events after a quiet spell go at once (timing the wait from an event's arrival instead added
    the whole timeout to every cycle: p50 20-25 -> 12 ms at 5,000 events/s). A sweep every ``sweep`` closes
    idle sessions. The snapshot holds the sessions *and* the unprocessed events, because the input
    offsets in the same snapshot are already past them.
    """

    def __init__(self, rec: Recommender, batch_size: int, timeout: timedelta, sweep: timedelta, resume=None):
        self.rec, self.batch_size, self.timeout, self.sweep = rec, batch_size, timeout, sweep
        self.table, self.pending = pickle.loads(resume) if resume is not None else (SessionTable(), [])
        now = datetime.now(timezone.utc)
        self.flushed_at = now - timeout  # when the last batch ended
        self.flush_at = now if self.pending else None
        self.sweep_at = now + sweep

    def on_batch(self, values: list[Decoded]) -> tuple[list[Output], bool]:
        now = datetime.now(timezone.utc)
        if not self.pending:
            self.flush_at = max(now, self.flushed_at + self.timeout)
        if values:
            self.rec.observe([ev for ev, _ in values])  # time moves on arrival, for every shard
        self.pending.extend(values)
        out: list[Output] = []
        while len(self.pending) >= self.batch_size:
            out += self._flush(self.batch_size)
        if self.pending and now >= self.flush_at:
            out += self._flush(len(self.pending))
        return out, self.RETAIN

    def on_notify(self) -> tuple[list[Output], bool]:
        now = datetime.now(timezone.utc)
        if now >= self.sweep_at:
            self.sweep_at = now + self.sweep
            return self._flush_and_sweep(), self.RETAIN
        if self.flush_at is not None and now >= self.flush_at:
            return self._flush(len(self.pending)), self.RETAIN
        return [], self.RETAIN

    def on_eof(self) -> tuple[list[Output], bool]:
        return self._flush_and_sweep(), self.RETAIN

    def _flush_and_sweep(self) -> list[Output]:
        # Pending events first: a session must not close while its next event waits here.
        out = self._flush(len(self.pending))
        self.rec.follow()  # a new version is adopted while the stream is quiet, too
        return out + self.rec.close_idle(self.table)

    def notify_at(self) -> datetime:
        return min(self.sweep_at, self.flush_at) if self.flush_at is not None else self.sweep_at

    def snapshot(self) -> bytes:
        # A frozen copy of the live (mutable) sessions; pickling is much faster than deepcopy.
        t0 = time.perf_counter()
        frozen = pickle.dumps((self.table, self.pending), protocol=pickle.HIGHEST_PROTOCOL)
        self.rec.telemetry.snapshot_duration.record((time.perf_counter() - t0) * 1000)
        self.rec.telemetry.snapshot_size.record(len(frozen))
        return frozen

    def _flush(self, n: int) -> list[Output]:
        batch, self.pending = self.pending[:n], self.pending[n:]
        out = self.rec.process(self.table, batch) if batch else []
        self.flushed_at = datetime.now(timezone.utc)
        self.flush_at = self.flushed_at + self.timeout if self.pending else None
        return out

"""Shards: the stateful step's keys (one per worker) and the logic that holds a shard's sessions."""

from __future__ import annotations

import pickle
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.run import cli_main
from bytewax.testing import TestingSource  # the source of the shard-key probe

from slsrec.codec import Click
from slsrec.errors import ServiceError
from slsrec.serving.recommender import Origin, Output, Recommender
from slsrec.serving.sessions import SessionLog

Decoded = tuple[Click, Origin]


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


def split_by_shard(keys: list[str], clicks: list[Decoded]) -> list[tuple[str, list[Decoded]]]:
    """One sub-batch per shard, by a stable hash of the user id: all of a user's events, in order."""
    parts: dict[str, list[Decoded]] = {}
    n = len(keys)
    for c in clicks:
        parts.setdefault(keys[zlib.crc32(c[0].user_id.encode()) % n], []).append(c)
    return list(parts.items())


class ShardLogic(StatefulBatchLogic):
    """The open sessions of one shard, fed sub-batches of polls, processed in micro-batches of up to
    ``batch_size`` events. Each call hands downstream at most one item: the list of its outputs.

    A batch starts at least ``batch_timeout_ms`` after the previous one ended, so that a batch
    gathers what arrived meanwhile; events that arrived while the shard was busy have already waited,
    and events after a quiet spell go at once (timing the wait from an event's arrival instead added
    the whole timeout to every cycle: p50 20-25 -> 12 ms at 5,000 events/s). A sweep every ``sweep`` closes
    idle sessions. The snapshot covers the sessions *and* the unprocessed events, because the input
    offsets in the same snapshot are already past them. The sessions go to a :class:`SessionLog` under
    ``sessions_dir``, which writes only what changed since the previous snapshot; the Bytewax snapshot
    holds its mark and the unprocessed events.
    """

    def __init__(self, rec: Recommender, batch_size: int, timeout: timedelta, sweep: timedelta, sessions_dir: Path,
                 resume: bytes | None = None):
        self.rec, self.batch_size, self.timeout, self.sweep = rec, batch_size, timeout, sweep
        if resume is None:
            self.log, self.pending = SessionLog(sessions_dir), []
        else:
            *mark, self.pending = pickle.loads(resume)
            self.log = SessionLog.resume(sessions_dir, *mark)
        self.table = self.log.table
        now = datetime.now(timezone.utc)
        self.flushed_at = now - timeout  # when the last batch ended
        self.flush_at = now if self.pending else None
        self.sweep_at = now + sweep

    def on_batch(self, values: list[list[Decoded]]) -> tuple[list[list[Output]], bool]:
        now = datetime.now(timezone.utc)
        if not self.pending:
            self.flush_at = max(now, self.flushed_at + self.timeout)
        for part in values:
            self.rec.observe([ev for ev, _ in part])  # time moves on arrival, for every shard
            self.pending.extend(part)
        out: list[Output] = []
        while len(self.pending) >= self.batch_size:
            out += self._flush(self.batch_size)
        if self.pending and now >= self.flush_at:
            out += self._flush(len(self.pending))
        return _one_item(out), self.RETAIN

    def on_notify(self) -> tuple[list[list[Output]], bool]:
        now = datetime.now(timezone.utc)
        if now >= self.sweep_at:
            self.sweep_at = now + self.sweep
            return _one_item(self._flush_and_sweep()), self.RETAIN
        if self.flush_at is not None and now >= self.flush_at:
            return _one_item(self._flush(len(self.pending))), self.RETAIN
        return [], self.RETAIN

    def on_eof(self) -> tuple[list[list[Output]], bool]:
        return _one_item(self._flush_and_sweep()), self.RETAIN

    def _flush_and_sweep(self) -> list[Output]:
        # Pending events first: a session must not close while its next event waits here.
        out = self._flush(len(self.pending))
        self.rec.follow()  # a new version is adopted while the stream is quiet, too
        return out + self.rec.close_idle(self.table)

    def notify_at(self) -> datetime:
        return min(self.sweep_at, self.flush_at) if self.flush_at is not None else self.sweep_at

    def snapshot(self) -> bytes:
        t0 = time.perf_counter()
        mark = self.log.write(self.table)  # what changed since the previous snapshot, on disk
        frozen = pickle.dumps((*mark, self.pending), protocol=pickle.HIGHEST_PROTOCOL)
        self.rec.telemetry.snapshot_duration.record((time.perf_counter() - t0) * 1000)
        self.rec.telemetry.snapshot_size.record(len(frozen) + self.log.last_bytes)
        return frozen

    def _flush(self, n: int) -> list[Output]:
        batch, self.pending = self.pending[:n], self.pending[n:]
        out = self.rec.process(self.table, batch) if batch else []
        self.flushed_at = datetime.now(timezone.utc)
        self.flush_at = self.flushed_at + self.timeout if self.pending else None
        return out


def _one_item(outputs: list[Output]) -> list[list[Output]]:
    return [outputs] if outputs else []

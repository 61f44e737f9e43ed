"""The session log (what a shard's snapshots write): a resume at any mark rebuilds the table exactly as
it was, while each delta holds only the events of its epoch."""

from __future__ import annotations

import random
from array import array

import numpy as np
import pytest

from slsrec.errors import CheckpointError
from slsrec.serving.sessions import SessionLog, SessionTable


def contents(table: SessionTable) -> list:
    """Everything a resume must restore, in the table's order."""
    return [(u, s.start_ts, s.last_ts, s.seg_len, s.model_version, s.events, list(s.ids), list(s.seen),
             list(s.last_top), table.state(s).tolist()) for u, s in table.sessions.items()]


def epoch(table: SessionTable, rng: random.Random, step: int) -> None:
    """A few events on random users: sessions open, grow, close and reopen, and some are re-encoded."""
    for k in range(rng.randint(1, 8)):
        user = f"u{rng.randint(0, 9)}"
        s = table.sessions.get(user)
        if s is None or rng.random() < 0.1:  # a new session (after the gap, or an eviction)
            if s is not None:
                table.close(s)
            s = table.open(user, step, np.full(4, step, np.float32), "v1")
        elif rng.random() < 0.1:  # a new model re-encoded it: `seen` replaced (Recommender.reencode)
            s.seen, s.model_version, s.saved = array("q", [rng.randint(1, 50) for _ in range(3)]), f"v{step}", None
        s.record(f"e{step}-{k}", f"item{rng.randint(1, 50)}", 1000 * step + k, "view")
        s.seen.append(rng.randint(1, 50))
        s.last_ts, s.seg_len, s.last_top = 1000 * step + k, rng.randint(0, 5), array("q", rng.sample(range(50), 3))
        table.states[s.slot] = rng.random()
        table.touch(s)
        table.changed.add(user)
    if table.sessions and rng.random() < 0.2:
        table.close(rng.choice(list(table.sessions.values())))


@pytest.mark.parametrize("rebase_bytes", [1 << 30, 3000])  # never, and every few snapshots
def test_a_resume_at_any_mark_rebuilds_the_table_as_it_was(tmp_path, rebase_bytes):
    rng, table = random.Random(rebase_bytes), SessionTable()
    log = SessionLog(tmp_path, rebase_bytes=rebase_bytes)
    marks = []
    for step in range(40):
        epoch(table, rng, step)
        marks.append((log.write(table), contents(table)))
    # Newest first: a resume cuts the records after its mark. A rebase deletes the file before the previous one.
    for mark, expected in reversed([m for m in marks if m[0][1] >= log.file_no - 1]):
        assert contents(SessionLog.resume(tmp_path, *mark).table) == expected


def test_a_delta_holds_only_the_new_events_of_a_long_session(tmp_path):
    table, log = SessionTable(), SessionLog(tmp_path)
    s = table.open("u", 0, np.zeros(4, np.float32), "v1")
    for k in range(1000):
        s.record(f"e{k}", "item", k, "view")
    log.write(table)
    base = log.last_bytes
    s.record("e1000", "item", 1000, "view")
    table.changed.add("u")
    log.write(table)
    assert log.last_bytes < base / 10 and len(log.last_record["upserts"]["ids"]) == 8  # one event id
    assert SessionLog.resume(tmp_path, log.lineage, log.file_no, log.seq).table.sessions["u"].n_events == 1001


def test_a_log_that_appends_to_a_session_it_never_wrote_is_refused(tmp_path):
    table, log = SessionTable(), SessionLog(tmp_path)
    table.open("u", 0, np.zeros(4, np.float32), "v1").record("e0", "item", 0, "view")
    log.write(table)
    table.sessions["u"].record("e1", "item", 1, "view")
    table.changed.add("u")
    mark = log.write(table)
    data = log.path(log.file_no).read_bytes()
    first = SessionLog.HEADER.size + SessionLog.HEADER.unpack_from(data, 0)[1]
    log.path(log.file_no).write_bytes(data[first:])  # the base record lost
    with pytest.raises(CheckpointError, match="never wrote"):
        SessionLog.resume(tmp_path, *mark)

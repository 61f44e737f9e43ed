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


# Never a new file; a new file every few snapshots, written whole at once; the same, spread over writes.
@pytest.mark.parametrize("rebase_bytes, roll", [(1 << 30, 10_000), (3000, 10_000), (3000, 2)])
def test_a_resume_at_any_mark_rebuilds_the_table_as_it_was(tmp_path, rebase_bytes, roll):
    rng, table = random.Random(rebase_bytes + roll), SessionTable()
    log = SessionLog(tmp_path, rebase_bytes=rebase_bytes, roll_sessions=roll)
    marks = []
    for step in range(60):
        epoch(table, rng, step)
        marks.append((log.write(table), contents(table)))
    assert log.file_no >= (0 if rebase_bytes > 1 << 20 else 3) and not log.path(log.file_no - 3).exists()
    # Newest first: a resume cuts the records after its mark. Starting a file deletes the third before it.
    for mark, expected in reversed([m for m in marks if m[0][1] >= log.file_no - 1]):
        assert contents(SessionLog.resume(tmp_path, *mark).table) == expected


def test_a_new_file_is_written_a_share_per_snapshot_and_a_resume_midway_has_every_session(tmp_path):
    table, log = SessionTable(), SessionLog(tmp_path, roll_sessions=30)
    for k in range(100):
        table.open(f"u{k}", k, np.full(4, k, np.float32), "v1").record(f"e{k}", "item", k, "view")
    log.write(table)  # 100 new sessions: the first file holds them all at once
    assert log.last_record["complete"] and len(log.last_record["upserts"]["user_id"]) == 100
    expected = contents(table)
    log.rebase()
    shares, marks = [], []
    while not shares or not log.last_record["complete"]:
        marks.append(log.write(table))  # nothing changed: only the share of the new file
        shares.append(len(log.last_record["upserts"]["user_id"]))
    assert shares == [30, 30, 30, 10] and {m[1] for m in marks} == {1}
    log.path(0).rename(tmp_path / "file-0")
    assert contents(SessionLog.resume(tmp_path, *marks[-1]).table) == expected  # file 1 alone is the whole table
    with pytest.raises(CheckpointError, match="is missing"):
        SessionLog.resume(tmp_path, *marks[-2])
    (tmp_path / "file-0").rename(log.path(0))
    for mark in reversed(marks):  # midway, the previous file holds the rest
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

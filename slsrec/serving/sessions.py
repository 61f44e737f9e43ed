"""Open sessions and their storage: what a Bytewax snapshot of a shard holds.

A session is a small object with ``__slots__``: its events in one ``bytearray`` line per event, event
id hashes and known items in ``array('q')`` buffers, and a row of the table's state matrix. Nothing
per event is a Python object, so an open session of a few events costs a few hundred bytes
(``slsrec bench-stream`` reports it), and a snapshot joins a few buffers per session.
"""

from __future__ import annotations

import os
import pickle
import struct
import uuid
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from hashlib import blake2b
from pathlib import Path
from typing import ClassVar

import numpy as np

from schemas.events import SessionClosed, SessionItem
from slsrec.errors import CheckpointError

# Ids never hold control characters (schemas.events.Id), so these can delimit them.
_SEP, _END = "\x1f", "\x1e"


def event_hash(event_id: str) -> int:
    """A signed 64-bit hash of an event id, stable across processes (``hash`` is salted per process).
    Two ids of one session collide with probability about n^2 / 2^65."""
    return int.from_bytes(blake2b(event_id.encode(), digest_size=8).digest(), "little", signed=True)


class Session:
    """One user's open session.

    The events live in ``log``, one line per event (item_id, ts, event_type), appended by
    :meth:`record`; the event ids are kept as 64-bit hashes in ``ids`` (duplicates are all they are
    for), the known items' indices in ``seen``. ``slot`` is the session's row in its table's state
    matrix (the short-term encoder state of the current segment).

    >>> s = Session("u1", 5, 5, slot=0)
    >>> s.record("e1", "a", 5, "view"); s.record("e2", "new", 9, "click")
    >>> s.events, s.has_event("e2"), s.has_event("e3"), s.n_events
    ([('a', 5, 'view'), ('new', 9, 'click')], True, False, 2)
    """

    __slots__ = ("user_id", "start_ts", "last_ts", "slot", "seg_len", "log", "ids", "seen", "last_top",
                 "model_version", "long_part", "saved")

    def __init__(self, user_id: str, start_ts: int, last_ts: int, slot: int, seg_len: int = 0,
                 log: bytearray | None = None, ids: array | None = None, seen: array | None = None,
                 last_top: array | None = None, model_version: str | None = None):
        self.user_id = user_id
        self.start_ts = start_ts
        self.last_ts = last_ts
        self.slot = slot
        self.seg_len = seg_len  # known items stepped into the state since the last boundary
        self.log = bytearray() if log is None else log  # every event, unknown items too
        self.ids = array("q") if ids is None else ids  # event id hashes (`event_hash`)
        self.seen = array("q") if seen is None else seen  # indices of the session's known items
        self.last_top = array("q") if last_top is None else last_top  # item indices recommended at the previous event
        self.model_version = model_version  # the model that encoded the state; another one re-encodes it first
        self.long_part = None  # what its row of the table's `longs` was computed from (None: nothing yet)
        # (file number, lengths of log, ids, seen) at its last write to the session log; None: never written
        self.saved: tuple[int, int, int, int] | None = None

    def record(self, event_id: str | int, item_id: str, ts: int, event_type: str) -> None:
        """Append an event; ``event_id`` may be given as its :func:`event_hash` already."""
        self.log += f"{item_id}{_SEP}{ts}{_SEP}{event_type}{_END}".encode()
        self.ids.append(event_id if type(event_id) is int else event_hash(event_id))

    def has_event(self, event_id: str) -> bool:
        # A scan: sessions hold at most `max_session_events` events, and this one C loop beats a set's bytes.
        return event_hash(event_id) in self.ids

    @property
    def n_events(self) -> int:
        return len(self.ids)

    @property
    def events(self) -> list[tuple[str, int, str]]:
        """(item_id, ts, event_type) in arrival order."""
        lines = (line.split(_SEP) for line in self.log.decode().split(_END)[:-1])
        return [(item, int(ts), kind) for item, ts, kind in lines]


def session_closed(s: Session, reason: str = "gap") -> SessionClosed:
    return SessionClosed(
        user_id=s.user_id,
        items=[SessionItem(item_id=i, ts=t, event_type=k) for i, t, k in s.events],
        start_ts=s.start_ts,
        end_ts=s.last_ts,
        reason=reason,
    )


class SessionTable:
    """The open sessions of one shard (what a Bytewax snapshot of the shard holds), least recently
    active first.

    ``sessions`` maps user ids to sessions in the order of their last event (:meth:`touch` moves one
    to the end), so the sessions to evict under a cap come first. ``states`` holds every session's
    short-term state, one row each (``Session.slot``); freed rows are reused.

    It pickles as columns: one joined buffer each for all logs, event id hashes and ``seen`` arrays,
    one matrix of states. ``FORMAT`` names this layout; a change of it bumps the number, so that a flow
    never resumes from snapshots it cannot read (``flows.cluster``).

    >>> import pickle
    >>> t = SessionTable()
    >>> u1 = t.open("u1", 5, np.ones(2, np.float32), "v1")
    >>> u1.record("e1", "a", 5, "view"); u1.record("e2", "new", 9, "view"); u1.seen.append(3)
    >>> u1.last_ts, u1.seg_len, u1.last_top = 9, 1, array("q", [2, 5])
    >>> _ = t.open("u2", 7, np.zeros(2, np.float32), "v1")
    >>> back = pickle.loads(pickle.dumps(t))
    >>> b1 = back.sessions["u1"]
    >>> b1.events, b1.has_event("e2"), b1.seen, b1.last_top, b1.model_version, b1.seg_len
    ([('a', 5, 'view'), ('new', 9, 'view')], True, array('q', [3]), array('q', [2, 5]), 'v1', 1)
    >>> back.state(b1), back.state(back.sessions["u2"]), list(back.sessions)
    (array([1., 1.], dtype=float32), array([0., 0.], dtype=float32), ['u1', 'u2'])
    """

    FORMAT: ClassVar[int] = 8

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.states = np.zeros((0, 0), np.float32)  # (capacity, d)
        # (capacity, d): the recommender's cache of each session's long-term vector (`Session.long_part`
        # says what it was computed from); derived, so never snapshotted
        self.longs = np.zeros((0, 0), np.float32)
        # Users whose session opened, closed or changed (the recommender adds every micro-batch's) since
        # the last `SessionLog.write`.
        self.changed: set[str] = set()
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions.values())

    def open(self, user_id: str, ts: int, state: np.ndarray, model_version: str | None) -> Session:
        """A new session for ``user_id`` (whose previous one is closed already), starting at ``state``."""
        if self.states.shape[1] != state.shape[0]:  # the first session, or a model of another width
            self.states = np.zeros((max(64, len(self.sessions)), state.shape[0]), np.float32)
            self.longs = np.zeros_like(self.states)
            self._free = list(range(len(self.states)))[::-1]
            for s in self.sessions.values():  # their states are re-encoded by the new model anyway
                s.slot = self._free.pop()
        if not self._free:
            n = len(self.states)
            self.states = np.concatenate([self.states, np.zeros_like(self.states)])  # doubling
            self.longs = np.concatenate([self.longs, np.zeros_like(self.longs)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        s = self.sessions[user_id] = Session(user_id, ts, ts, self._free.pop(), model_version=model_version)
        self.states[s.slot] = state
        self.changed.add(user_id)
        return s

    def close(self, s: Session) -> None:
        del self.sessions[s.user_id]
        self._free.append(s.slot)
        self.changed.add(s.user_id)

    def touch(self, s: Session) -> None:
        """Mark ``s`` as the most recently active session."""
        self.sessions[s.user_id] = self.sessions.pop(s.user_id)

    def state(self, s: Session) -> np.ndarray:
        return self.states[s.slot]

    def columns(self, sessions: Iterable[Session] | None = None, file_no: int | None = None) -> dict:
        """``sessions`` (default: all, in table order) as columns: joined buffers, one state matrix.

        ``file_no``: a session already written to that file of the session log (:meth:`mark_saved`)
        gives only what it appended since (its row's ``append`` flag is 1): a snapshot then costs the
        events of its epoch, not the whole sessions they fall in."""
        code: dict[str, int] = {}  # model version -> its index in "versions"
        users, slots, ints, logs, ids, seen, tops = [], [], [], [], [], [], []
        for s in self.sessions.values() if sessions is None else sessions:  # one pass: the snapshot's stall
            saved = s.saved
            if saved is not None and saved[0] == file_no:
                log, i, sn, append = s.log[saved[1]:], s.ids[saved[2]:], s.seen[saved[3]:], 1
            else:
                log, i, sn, append = s.log, s.ids, s.seen, 0
            version = code.setdefault(s.model_version or "", len(code))
            users.append(s.user_id), slots.append(s.slot), logs.append(log), ids.append(i), seen.append(sn)
            tops.append(s.last_top)
            ints += (s.start_ts, s.last_ts, s.seg_len, version, len(log), len(i), len(sn), len(s.last_top), append)
        return {
            "d": self.states.shape[1], "user_id": users, "versions": list(code),
            "ints": np.array(ints, dtype=np.int64).reshape(-1, 9),
            "state": self.states[slots],  # (n, d): one array, not n
            # memcpy, not objects: every session's log, event id hashes, known and recommended items, concatenated
            "log": b"".join(logs), "ids": b"".join(ids), "seen": b"".join(seen), "last_top": b"".join(tops),
        }

    @staticmethod
    def mark_saved(sessions: Iterable[Session], file_no: int) -> None:
        """Mark what these sessions hold as written to file ``file_no`` of the session log:
        :meth:`columns` for that file gives only what follows."""
        for s in sessions:
            s.saved = (file_no, len(s.log), len(s.ids), len(s.seen))

    def order_by_last_event(self) -> None:
        """Put the sessions in the order of their last event, as the stream keeps them (a replay
        of the session log leaves them in the order of their last write)."""
        self.sessions = dict(sorted(self.sessions.items(), key=lambda kv: kv[1].last_ts))

    def apply(self, c: dict, deleted: Iterable[str] = (), file_no: int | None = None) -> None:
        """Put the sessions of :meth:`columns` into the table (replacing those of the same users, or
        appending to them for rows flagged ``append``; either way they become the most recent), and
        drop the sessions of ``deleted``. ``file_no``: they come from that file of the session log
        (:meth:`mark_saved`)."""
        for user in deleted:
            if user in self.sessions:
                self.close(self.sessions[user])
        size = array("q").itemsize
        at = {"log": 0, "ids": 0, "seen": 0, "last_top": 0}  # read positions in the joined buffers

        def take(name: str, length: int, width: int):
            part = c[name][at[name] * width:(at[name] + length) * width]
            at[name] += length
            return part

        written = []
        for j, (start, last, seg_len, version, n_log, n_ids, n_seen, n_top, append) in enumerate(c["ints"].tolist()):
            user = c["user_id"][j]
            if append:
                s = self.sessions.get(user)
                if s is None:
                    raise CheckpointError(f"the session log appends to the session of {user!r}, which it never wrote")
                self.touch(s)
                s.model_version = c["versions"][version] or None
                self.states[s.slot] = c["state"][j]
                s.log += take("log", n_log, 1)
                s.ids.frombytes(take("ids", n_ids, size))
                s.seen.frombytes(take("seen", n_seen, size))
            else:
                if user in self.sessions:
                    self.close(self.sessions[user])
                s = self.open(user, start, c["state"][j], c["versions"][version] or None)
                s.log = bytearray(take("log", n_log, 1))
                s.ids, s.seen = array("q", take("ids", n_ids, size)), array("q", take("seen", n_seen, size))
            s.last_ts, s.seg_len = last, seg_len
            s.last_top = array("q", take("last_top", n_top, size))
            written.append(s)
        if file_no is not None:
            self.mark_saved(written, file_no)

    def __getstate__(self) -> dict:
        return self.columns()

    def __setstate__(self, c: dict) -> None:
        self.__init__()
        self.apply(c)
        self.changed.clear()


_SYNC = ThreadPoolExecutor(1, thread_name_prefix="session-log-sync")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SessionLog:
    """A shard's sessions on disk, for recovery: per snapshot only what changed, in a chain of files.

    Each :meth:`write` appends one record to the current file: the sessions opened since the previous
    write, what the others appended since (their new events; their state and last ranking whole), and
    the users whose session closed (``SessionTable.changed``). So a snapshot costs the events of its
    epoch, not what is open, nor how long the sessions they fall in have grown.

    When a file outgrows ``rebase_bytes`` (and twice what it held when it first covered every open
    session), the next write starts a new one. A session's first write to a file is whole, so the
    new file becomes self-contained once every open session has been written to it: the sessions that
    change do so by themselves, and each write adds up to ``roll_sessions`` of the others. A re-base
    therefore stalls a snapshot by a bounded amount, not by the number of open sessions. Each record
    says whether its file is ``complete`` from there on; a resume at a record before that replays the
    previous file first. Starting file ``n`` deletes file ``n - 3``: a resume may still need the two
    before it.

    The shard's Bytewax snapshot holds ``(lineage, file number, sequence number)`` only: a resume
    replays the files up to that record and cuts off the records after it (written for an epoch that
    never committed). A record: 8-byte sequence number, 8-byte length, then the record: a pickled dict
    whose large buffers (the joined logs, id hashes, items and states) follow it raw, out of band
    (pickle protocol 5), so that writing them costs no copy: 8-byte count n, 8-byte pickle length,
    n 8-byte buffer lengths, the pickle, the n buffers.

    >>> import tempfile
    >>> log, t = SessionLog(Path(tempfile.mkdtemp())), SessionTable()
    >>> for u in ("a", "b", "c"):
    ...     t.open(u, 5, np.zeros(2, np.float32), "v1").record("e", "i1", 5, "view")
    >>> mark = log.write(t)  # the 3 new sessions
    >>> t.sessions["b"].record("e2", "i2", 6, "view"); t.changed.add("b"); t.close(t.sessions["c"])
    >>> mark2 = log.write(t)  # a delta: b changed, c closed
    >>> up = log.last_record["upserts"]
    >>> up["user_id"], len(up["ids"]) // 8, log.last_record["deleted"]  # b's new event only
    (['b'], 1, ['c'])
    >>> [(u, s.events) for u, s in SessionLog.resume(log.directory, *mark2).table.sessions.items()]
    [('a', [('i1', 5, 'view')]), ('b', [('i1', 5, 'view'), ('i2', 6, 'view')])]
    >>> sorted(SessionLog.resume(log.directory, *mark).table.sessions)  # an older snapshot: the tail is cut
    ['a', 'b', 'c']
    """

    HEADER = struct.Struct("<qq")
    BLOBS = ("log", "ids", "seen", "last_top")  # the columns written out of band

    def __init__(self, directory: Path, lineage: str | None = None, rebase_bytes: int = 64 << 20,
                 roll_sessions: int = 10_000):
        self.directory = Path(directory)
        self.lineage = lineage or uuid.uuid4().hex
        self.rebase_bytes = rebase_bytes
        self.roll_sessions = roll_sessions
        self.file_no, self.seq, self.table = -1, 0, SessionTable()
        self.last_record: dict = {}  # what the last write wrote
        self.last_bytes = 0  # ... and its size on disk
        self._size = 0  # of the current file
        self._base_size = 0  # the current file's size when it first held every open session; 0: not yet
        self._unrolled: list[str] = []  # users whose session the current file may not hold yet
        self._rebase = False  # the next write starts a new file
        self._synced: Future | None = None  # the disk sync of the last record

    def path(self, file_no: int) -> Path:
        return self.directory / f"sessions-{self.lineage}-{file_no}.log"

    def rebase(self) -> None:
        """Start a new file at the next write, as when the current one outgrows ``rebase_bytes``."""
        self._rebase = True

    def write(self, table: SessionTable) -> tuple[str, int, int]:
        """Append what changed in ``table`` since the previous write (and a share of the sessions the
        current file does not hold yet); returns the mark that the Bytewax snapshot keeps:
        (lineage, file number, sequence number)."""
        self.seq += 1
        grown = self._size > max(self.rebase_bytes, 2 * self._base_size)
        if self.file_no < 0 or (self._base_size and (grown or self._rebase)):
            self.file_no += 1
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path(self.file_no).write_bytes(b"")
            self._size, self._base_size, self._rebase = 0, 0, False
            self.path(self.file_no - 3).unlink(missing_ok=True)
            self._unrolled = list(table.sessions)
        sessions, deleted = [], []  # (a resume orders the sessions by their last event)
        for u in table.changed:
            s = table.sessions.get(u)
            sessions.append(s) if s is not None else deleted.append(u)
        sessions += self._roll(table)
        record = {"complete": not self._unrolled, "upserts": table.columns(sessions, self.file_no),
                  "deleted": deleted}
        upserts = {**record["upserts"], **{k: pickle.PickleBuffer(record["upserts"][k]) for k in self.BLOBS}}
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps({**record, "upserts": upserts}, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        lengths = struct.pack(f"<qq{len(raws)}q", len(raws), len(data), *(r.nbytes for r in raws))
        size = len(lengths) + len(data) + sum(r.nbytes for r in raws)
        if self._synced is not None:
            self._synced.result()  # the previous record is on the disk before this one follows it
        with open(self.path(self.file_no), "ab") as f:
            f.writelines([self.HEADER.pack(self.seq, size), lengths, data, *raws])
        # Written, so a killed process loses nothing (the OS holds it). The disk sync runs beside the
        # stream: it stalled each snapshot by tens of ms (bench-stream). A machine crash before it
        # ends leaves the log one record short, which a resume refuses loudly (CheckpointError).
        self._synced = _SYNC.submit(_fsync, self.path(self.file_no))
        self.last_bytes = self.HEADER.size + size
        self._size += self.last_bytes
        if record["complete"] and not self._base_size:
            self._base_size = self._size
        self.last_record = record
        table.mark_saved(sessions, self.file_no)
        table.changed.clear()
        return self.lineage, self.file_no, self.seq

    def _roll(self, table: SessionTable) -> list[Session]:
        """Up to ``roll_sessions`` open, unchanged sessions that the current file does not hold yet."""
        out: list[Session] = []
        while self._unrolled and len(out) < self.roll_sessions:
            s = table.sessions.get(self._unrolled.pop())
            if s is not None and s.user_id not in table.changed and (s.saved is None or s.saved[0] != self.file_no):
                out.append(s)
        return out

    @staticmethod
    def _read(data: bytes, at: int) -> dict:
        """The record that starts at ``at`` (after its header)."""
        n, length = struct.unpack_from("<qq", data, at)
        sizes = struct.unpack_from(f"<{n}q", data, at + 16)
        at += 16 + 8 * n
        body, at = data[at:at + length], at + length
        buffers = []
        for size in sizes:
            buffers.append(data[at:at + size])
            at += size
        return pickle.loads(body, buffers=buffers)

    def _load(self, file_no: int, seq: int | None = None) -> tuple[bytes, list[tuple[int, int, int]]]:
        """A file's bytes, and (sequence number, start, end) of each record in it up to record ``seq``."""
        path = self.path(file_no)
        if not path.exists():
            raise CheckpointError(f"{path} is missing: the recovery snapshots need it; move {self.directory} away "
                                  "to start without them")
        data, at, index = path.read_bytes(), 0, []
        while at + self.HEADER.size <= len(data):
            n, length = self.HEADER.unpack_from(data, at)
            if (seq is not None and n > seq) or at + self.HEADER.size + length > len(data):
                break
            index.append((n, at + self.HEADER.size, at + self.HEADER.size + length))
            at = index[-1][2]
        return data, index

    def _replay(self, file_no: int, data: bytes, index: list[tuple[int, int, int]]) -> int:
        """Apply these records of file ``file_no`` to the table, one at a time; returns the offset
        after the first that says the file then held every open session (0: none does)."""
        base_size = 0
        for _, start, end in index:
            record = self._read(data, start)
            self.table.apply(record["upserts"], record["deleted"], file_no)
            base_size = base_size or (end if record["complete"] else 0)
        return base_size

    @classmethod
    def resume(cls, directory: Path, lineage: str, file_no: int, seq: int) -> SessionLog:
        """The log as it was at mark ``(lineage, file_no, seq)``, its ``table`` rebuilt; later records are cut."""
        log = cls(directory, lineage)
        data, index = log._load(file_no, seq)
        if not index or index[-1][0] != seq:
            raise CheckpointError(f"{log.path(file_no)} ends at snapshot {index[-1][0] if index else 0}, not {seq}: "
                                  f"move {directory} away to start without the recovery snapshots")
        if not log._read(data, index[-1][1])["complete"]:  # the file did not hold every session yet
            if not log._replay(file_no - 1, *log._load(file_no - 1)):
                raise CheckpointError(f"{log.path(file_no - 1)} does not hold every session that {log.path(file_no)} "
                                      f"needs: move {directory} away to start without the recovery snapshots")
        log._base_size = log._replay(file_no, data, index)
        with open(log.path(file_no), "r+b") as f:
            f.truncate(index[-1][2])
        log.file_no, log.seq, log._size = file_no, seq, index[-1][2]
        log._unrolled = [u for u, s in log.table.sessions.items() if s.saved[0] != file_no]
        log.table.order_by_last_event()
        log.table.changed.clear()
        return log

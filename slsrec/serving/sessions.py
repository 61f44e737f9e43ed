"""Open sessions and their storage: what a Bytewax snapshot of a shard holds.

A session is a small object with ``__slots__``: its events in one ``bytearray`` line per event, event
id hashes and known items in ``array('q')`` buffers, and a row of the table's state matrix. Nothing
per event is a Python object, so an open session of a few events costs a few hundred bytes
(``slsrec bench-stream`` reports it), and a snapshot joins a few buffers per session.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from hashlib import blake2b
from typing import ClassVar

import numpy as np

from schemas.events import SessionClosed, SessionItem

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
                 "model_version")

    def __init__(self, user_id: str, start_ts: int, last_ts: int, slot: int, seg_len: int = 0,
                 log: bytearray | None = None, ids: array | None = None, seen: array | None = None,
                 last_top: tuple[str, ...] = (), model_version: str | None = None):
        self.user_id = user_id
        self.start_ts = start_ts
        self.last_ts = last_ts
        self.slot = slot
        self.seg_len = seg_len  # known items stepped into the state since the last boundary
        self.log = bytearray() if log is None else log  # every event, unknown items too
        self.ids = array("q") if ids is None else ids  # event id hashes (`event_hash`)
        self.seen = array("q") if seen is None else seen  # indices of the session's known items
        self.last_top = last_top  # raw ids recommended at the previous event (online quality)
        self.model_version = model_version  # the model that encoded the state; another one re-encodes it first

    def record(self, event_id: str, item_id: str, ts: int, event_type: str) -> None:
        self.log += f"{item_id}{_SEP}{ts}{_SEP}{event_type}{_END}".encode()
        self.ids.append(event_hash(event_id))

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
    >>> u1.last_ts, u1.seg_len, u1.last_top = 9, 1, ("b", "c")
    >>> _ = t.open("u2", 7, np.zeros(2, np.float32), "v1")
    >>> back = pickle.loads(pickle.dumps(t))
    >>> b1 = back.sessions["u1"]
    >>> b1.events, b1.has_event("e2"), b1.seen, b1.last_top, b1.model_version, b1.seg_len
    ([('a', 5, 'view'), ('new', 9, 'view')], True, array('q', [3]), ('b', 'c'), 'v1', 1)
    >>> back.state(b1), back.state(back.sessions["u2"]), list(back.sessions)
    (array([1., 1.], dtype=float32), array([0., 0.], dtype=float32), ['u1', 'u2'])
    """

    FORMAT: ClassVar[int] = 3

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.states = np.zeros((0, 0), np.float32)  # (capacity, d)
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions.values())

    def open(self, user_id: str, ts: int, state: np.ndarray, model_version: str | None) -> Session:
        """A new session for ``user_id`` (whose previous one is closed already), starting at ``state``."""
        if self.states.shape[1] != state.shape[0]:  # the first session, or a model of another width
            self.states = np.zeros((max(64, len(self.sessions)), state.shape[0]), np.float32)
            self._free = list(range(len(self.states)))[::-1]
            for s in self.sessions.values():  # their states are re-encoded by the new model anyway
                s.slot = self._free.pop()
        if not self._free:
            n = len(self.states)
            self.states = np.concatenate([self.states, np.zeros_like(self.states)])  # doubling
            self._free = list(range(2 * n - 1, n - 1, -1))
        s = self.sessions[user_id] = Session(user_id, ts, ts, self._free.pop(), model_version=model_version)
        self.states[s.slot] = state
        return s

    def close(self, s: Session) -> None:
        del self.sessions[s.user_id]
        self._free.append(s.slot)

    def touch(self, s: Session) -> None:
        """Mark ``s`` as the most recently active session."""
        self.sessions[s.user_id] = self.sessions.pop(s.user_id)

    def state(self, s: Session) -> np.ndarray:
        return self.states[s.slot]

    def __getstate__(self) -> dict:
        ss = list(self.sessions.values())
        return {
            "d": self.states.shape[1],
            "user_id": [s.user_id for s in ss], "model_version": [s.model_version for s in ss],
            "last_top": [s.last_top for s in ss],
            "ints": np.array([(s.start_ts, s.last_ts, s.seg_len, len(s.log), len(s.ids), len(s.seen)) for s in ss],
                             dtype=np.int64).reshape(-1, 6),
            "state": self.states[[s.slot for s in ss]],  # (n, d): one array, not n
            # memcpy, not objects: every session's log, event id hashes and known items, concatenated
            "log": b"".join(s.log for s in ss), "ids": b"".join(s.ids for s in ss), "seen": b"".join(s.seen for s in ss),
        }

    def __setstate__(self, c: dict) -> None:
        log, ids, seen, size = c["log"], c["ids"], c["seen"], array("q").itemsize
        n = len(c["user_id"])
        self.states = np.zeros((max(64, 2 * n), c["d"]), np.float32)
        self.states[:n] = c["state"]
        self._free = list(range(len(self.states) - 1, n - 1, -1))
        self.sessions, at_log, at_ids, at_seen = {}, 0, 0, 0  # read positions
        for j, (start, last, seg_len, n_log, n_ids, n_seen) in enumerate(c["ints"].tolist()):
            user = c["user_id"][j]
            self.sessions[user] = Session(
                user, start, last, j, seg_len, bytearray(log[at_log:at_log + n_log]),
                array("q", ids[at_ids * size:(at_ids + n_ids) * size]),
                array("q", seen[at_seen * size:(at_seen + n_seen) * size]), c["last_top"][j], c["model_version"][j])
            at_log, at_ids, at_seen = at_log + n_log, at_ids + n_ids, at_seen + n_seen

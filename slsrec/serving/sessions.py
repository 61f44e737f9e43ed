"""Open sessions and their storage: what a Bytewax snapshot of a shard holds."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import ClassVar

import numpy as np

from schemas.events import SessionClosed, SessionItem


@dataclass
class Session:
    """One user's open session, stored so that a snapshot copies a few buffers per session.

    The events live in ``log``, one line per event (item_id, ts, event_type), appended by
    :meth:`record`; the event ids are kept as 64-bit hashes in ``ids`` (duplicates are all they are
    for), the known items in ``seen``. Nothing per event is a Python object that pickle would visit
    (see :class:`SessionTable`).

    >>> s = Session("u1", 5, 5, np.zeros(2))
    >>> s.record("e1", "a", 5, "view"); s.record("e2", "new", 9, "click")
    >>> s.events, s.has_event("e2"), s.has_event("e3")
    ([('a', 5, 'view'), ('new', 9, 'click')], True, False)
    """

    user_id: str
    start_ts: int
    last_ts: int
    state: np.ndarray  # (d,) short-term encoder state of the current segment
    seg_len: int = 0  # known items stepped into `state` since the last boundary
    log: bytearray = field(default_factory=bytearray)  # every event, unknown items too (see `record`)
    ids: array = field(default_factory=lambda: array("q"))  # event id hashes (`event_hash`)
    seen: array = field(default_factory=lambda: array("q"))  # indices of the session's known items
    last_top: str = ""  # raw ids recommended at the previous event, _SEP-joined (online quality)
    model_version: str | None = None  # the model that encoded `state`; another one re-encodes it first
    _id_set: set[int] = field(init=False, repr=False, compare=False)  # `ids`, for O(1) lookups

    def __post_init__(self) -> None:
        self._id_set = set(self.ids)

    def record(self, event_id: str, item_id: str, ts: int, event_type: str) -> None:
        self.log += f"{item_id}{_SEP}{ts}{_SEP}{event_type}{_END}".encode()
        h = event_hash(event_id)
        self.ids.append(h)
        self._id_set.add(h)

    def has_event(self, event_id: str) -> bool:
        return event_hash(event_id) in self._id_set

    @property
    def events(self) -> list[tuple[str, int, str]]:
        """(item_id, ts, event_type) in arrival order."""
        lines = (line.split(_SEP) for line in self.log.decode().split(_END)[:-1])
        return [(item, int(ts), kind) for item, ts, kind in lines]


def event_hash(event_id: str) -> int:
    """A signed 64-bit hash of an event id, stable across processes (``hash`` is salted per process).
    Two ids of one session collide with probability about n^2 / 2^65."""
    return int.from_bytes(blake2b(event_id.encode(), digest_size=8).digest(), "little", signed=True)


# Ids never hold control characters (schemas.events.Id), so these can delimit them.
_SEP, _END = "\x1f", "\x1e"


@dataclass
class SessionTable:
    """The open sessions of one shard (what a Bytewax snapshot of the shard holds).

    It pickles as columns: one joined buffer each for all logs, event id hashes and ``seen`` arrays,
    one matrix of states. Pickling 6,040 sessions one by one took about 100 ms, and packing per-event
    objects into columns still 120 ms for 200k events: a stall of the stream at every snapshot (the
    p99 of ``slsrec bench-stream``). ``FORMAT`` names this layout; a change of it bumps the number, so
    that a flow never resumes from snapshots it cannot read (``flows.recommend``).

    >>> import pickle
    >>> u1 = Session("u1", 5, 9, np.ones(2, np.float32), 1, seen=array("q", [3]), last_top="b\x1fc", model_version="v1")
    >>> u1.record("e1", "a", 5, "view"); u1.record("e2", "new", 9, "view")
    >>> back = pickle.loads(pickle.dumps(SessionTable({"u1": u1, "u2": Session("u2", 7, 7, np.zeros(2))})))
    >>> b1 = back.sessions["u1"]
    >>> b1.events, b1.has_event("e2"), b1.seen, b1.last_top.split("\x1f"), b1.model_version, b1.seg_len
    ([('a', 5, 'view'), ('new', 9, 'view')], True, array('q', [3]), ['b', 'c'], 'v1', 1)
    >>> b1.state, back.sessions["u2"].state, back.sessions["u2"].seen
    (array([1., 1.], dtype=float32), array([0., 0.]), array('q'))
    """

    FORMAT: ClassVar[int] = 2
    sessions: dict[str, Session] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        ss = list(self.sessions.values())
        states = [s.state for s in ss]
        return {
            "user_id": [s.user_id for s in ss], "model_version": [s.model_version for s in ss],
            "last_top": [s.last_top for s in ss],
            "ints": np.array([(s.start_ts, s.last_ts, s.seg_len, len(s.log), len(s.ids), len(s.seen)) for s in ss],
                             dtype=np.int64).reshape(-1, 6),
            "state": states if len({(x.shape, x.dtype) for x in states}) > 1
            else np.stack(states) if ss else [],  # (n, d): one array, not n
            # memcpy, not objects: every session's log, event id hashes and known items, concatenated
            "log": b"".join(s.log for s in ss), "ids": b"".join(s.ids for s in ss), "seen": b"".join(s.seen for s in ss),
        }

    def __setstate__(self, c: dict) -> None:
        log, ids, seen, size = c["log"], c["ids"], c["seen"], array("q").itemsize
        self.sessions, at_log, at_ids, at_seen = {}, 0, 0, 0  # read positions
        for j, (start, last, seg_len, n_log, n_ids, n_seen) in enumerate(c["ints"].tolist()):
            user = c["user_id"][j]
            self.sessions[user] = Session(
                user, start, last, c["state"][j].copy(), seg_len, bytearray(log[at_log:at_log + n_log]),
                array("q", ids[at_ids * size:(at_ids + n_ids) * size]),
                array("q", seen[at_seen * size:(at_seen + n_seen) * size]), c["last_top"][j], c["model_version"][j])
            at_log, at_ids, at_seen = at_log + n_log, at_ids + n_ids, at_seen + n_seen


def session_closed(s: Session) -> SessionClosed:
    return SessionClosed(
        user_id=s.user_id,
        items=[SessionItem(item_id=i, ts=t, event_type=k) for i, t, k in s.events],
        start_ts=s.start_ts,
        end_ts=s.last_ts,
        reason="gap",
    )

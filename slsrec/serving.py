"""Serving math for the stream: per-user sessions and the micro-batched recommender.

No Bytewax here. ``flows/recommend.py`` wires these into named steps; every rule (sessions,
duplicates, unknown items, cold start, exclusion of seen items) is testable on plain lists.

A micro-batch holds events of many users. Events of one user are applied in order: wave ``i`` is
the ``i``-th event of every user in the batch, and each wave costs one batched encoder ``step``, one
``fuse`` and one scoring matmul for all its users.

>>> import torch
>>> from slsrec.data import Vocab
>>> from slsrec.model import SLSRec, SLSRecConfig
>>> torch.manual_seed(0) and None
>>> model = SLSRec(SLSRecConfig(n_users=2, n_items=5, d=8))
>>> rec = Recommender(model, Vocab(list("abcde"), padding=True), lambda users: (None, [None] * len(users)),
...                   model_version="m1", gap_ms=60_000, max_segment=20, top_k=3)
>>> t0 = 1_700_000_000_000
>>> clicks = [click("e1", "u1", "a", t0), click("e2", "u1", "b", t0 + 1000), click("e2", "u1", "b", t0 + 1000),
...           click("e3", "u1", "new-product", t0 + 2000)]
>>> table = SessionTable()
>>> out = rec.process(table, clicks)
>>> [(type(o).__name__, getattr(o, "reason", None)) for o in out]
[('Recommendation', None), ('Recommendation', None), ('DeadLetter', 'duplicate'), ('Recommendation', None)]
>>> sorted(i.item_id for i in out[1].items), out[1].cold_start, out[3].unknown_item  # a, b excluded
(['c', 'd', 'e'], True, True)
>>> closed = rec.close_idle(table, wall_ms=rec.clock.wall_at_max_ms + 60_001)
>>> [i.item_id for i in closed[0].items], table.sessions
(['a', 'b', 'new-product'], {})
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from hashlib import blake2b
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from opentelemetry import metrics, trace

from schemas.drift import DriftAlert
from schemas.events import ClickEvent, DeadLetter, Recommendation, SessionClosed, SessionItem
from slsrec.checkpoint import CONFIG, WEIGHTS, load_run
from slsrec.data import Vocab
from slsrec.drift import DriftMonitor, next_item_quality
from slsrec.errors import CheckpointError, UserError
from slsrec.model import LongState, score
from slsrec.sessions import Boundary, SeqBatch, boundary, segment_starts
from slsrec.settings import Settings
from slsrec.store import CachedLongTerm, LongTerm, LongTermStore, parse_seq
from slsrec.telemetry import ATTR_MODEL_MS, ATTR_REDIS_MS, Telemetry

log = logging.getLogger(__name__)

# user ids -> (long-term version or None, one published LongTerm state or None per user)
LongTermLookup = Callable[[Sequence[str]], tuple["str | None", list["LongTerm | None"]]]


class Published(NamedTuple):
    """A published version's model, loaded and ready to replace the served one in one step."""

    version: str
    model: torch.nn.Module
    items: Vocab
    users: Vocab


# () -> a newer version whose model is loaded, or None; polled before every micro-batch
VersionSource = Callable[[], "Published | None"]


class Origin(NamedTuple):
    """Where an event came from, so that a dead letter names the exact Kafka record."""

    raw: bytes
    topic: str
    partition: int | None
    offset: int | None


def now_ms() -> float:
    return time.time() * 1000.0


def dead_letter(origin: Origin, reason: str) -> DeadLetter:
    return DeadLetter(raw=origin.raw, topic=origin.topic, partition=origin.partition, offset=origin.offset,
                      reason=reason, ts=int(now_ms()))


def click(event_id: str, user_id: str, item_id: str, ts: int, event_type: str = "click",
          topic: str = "clicks", partition: int = 0, offset: int = 0) -> tuple[ClickEvent, Origin]:
    """A click with its origin, as the flow passes it to :meth:`Recommender.process` (for tests)."""
    ev = ClickEvent(event_id=event_id, user_id=user_id, item_id=item_id, ts=ts, event_type=event_type)
    return ev, Origin(ev.model_dump_json().encode(), topic, partition, offset)


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


@dataclass
class Clock:
    """Event time for closing idle sessions: the newest event ts seen plus the wall time since.

    It follows event time while events flow (a replay at any speed) and keeps moving when the stream
    goes quiet. One per worker, shared by its shards, so a shard with few users still sees time pass.
    """

    max_ts: int | None = None
    wall_at_max_ms: float = 0.0

    def observe(self, ts: int, wall_ms: float) -> None:
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts, self.wall_at_max_ms = ts, wall_ms

    def now(self, wall_ms: float) -> int | None:
        if self.max_ts is None:
            return None
        return self.max_ts + int(max(0.0, wall_ms - self.wall_at_max_ms))


@dataclass
class Stats:
    """Counters since start: every event ends as exactly one recommendation or dead letter."""

    events: int = 0
    recommendations: int = 0
    duplicates: int = 0
    unknown_items: int = 0
    cold_starts: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    scored: int = 0  # events scored against the previous top-K of their session
    hits: int = 0  # ... whose item was in it (online HR@K = hits / scored)
    drift_alerts: int = 0
    switches: int = 0  # versions adopted after the start
    reencoded: int = 0  # sessions re-encoded by a new model
    reencode_ms: float = 0.0  # time spent re-encoding them

    @property
    def unknown_item_rate(self) -> float:
        return self.unknown_items / self.events if self.events else 0.0

    @property
    def online_hr(self) -> float:
        return self.hits / self.scored if self.scored else 0.0


def session_closed(s: Session) -> SessionClosed:
    return SessionClosed(
        user_id=s.user_id,
        items=[SessionItem(item_id=i, ts=t, event_type=k) for i, t, k in s.events],
        start_ts=s.start_ts,
        end_ts=s.last_ts,
        reason="gap",
    )


class Recommender:
    """The model in eval mode plus the item table, applied to micro-batches of click events.

    Parameters
    ----------
    model : SLSRec
        Provides ``short_encoder.init_state/step``, ``short_vector``, ``fuse``, ``item_embeddings``.
    items : Vocab
        The model's raw item id <-> index (0 = padding).
    long_term : callable
        ``user_ids -> (version | None, [LongTerm | None, ...])``, one call per micro-batch: each user's
        published long-term state; ``None`` is a cold start (short-term only, flagged).
    model_version : str
        Named in every recommendation.
    gap_ms, max_segment : int
        The session rule of :func:`slsrec.sessions.boundary`.
    top_k : int
    exclude_seen : bool
        Drop the session's items from its ranking.
    device : str
    telemetry : Telemetry, optional
        Counters, latency histogram and one span per micro-batch (no-op by default).
    versions : callable, optional
        Polled before every micro-batch; a :class:`Published` it returns replaces the model, the item
        table and ``model_version`` at once (the long-term lookup moves to the same version). Each open
        session is re-encoded by the new model from the item ids it holds at its user's next event
        (batched with the other users of that micro-batch), so the switch itself does not stall the
        stream and idle sessions cost nothing.
    drift : DriftMonitor, optional
        Fed every recommended event's signals; its alerts join the output after their event's
        recommendation.
    users : Vocab, optional
        The model's user ids: a session longer than one segment folds its closed segments into the
        user's long-term state with the user's embedding as the pooling query. Without it (or for a
        user the model does not know) the published state alone is the long-term input.
    """

    def __init__(self, model: torch.nn.Module, items: Vocab, long_term: LongTermLookup, model_version: str,
                 gap_ms: int, max_segment: int, top_k: int = 10, exclude_seen: bool = True, device: str = "cpu",
                 telemetry: Telemetry | None = None, versions: VersionSource | None = None,
                 drift: DriftMonitor | None = None, users: Vocab | None = None):
        self.long_term = long_term
        self.versions = versions
        self.drift = drift
        self.gap_ms = gap_ms
        self.max_segment = max_segment
        self.top_k = top_k
        self.exclude_seen = exclude_seen
        self.device = device
        self.stats = Stats()
        self.clock = Clock()
        self.telemetry = telemetry or Telemetry(metrics.NoOpMeterProvider(), trace.NoOpTracerProvider())
        self._use(model, items, model_version, users)

    @torch.no_grad()
    def _use(self, model: torch.nn.Module, items: Vocab, model_version: str, users: Vocab | None) -> None:
        """Serve ``model`` from now on (the tables derived from it change with it)."""
        self.model = model.to(self.device).eval()
        self.items = items
        self.users = users
        self.model_version = model_version
        self._item_emb = model.item_embeddings().detach()  # (n_items+1, d)
        self._init_state = model.short_encoder.init_state(1)[0].cpu().numpy()  # (d,)
        self._raw_ids = [None] + [items.raw_of(i) for i in range(1, len(items) + 1)]  # index -> raw id
        self.telemetry.set_versions(model=model_version)
        self._announce = True

    def follow(self) -> None:
        """Adopt a newer published version if its model is loaded. Called before every micro-batch,
        and by the flow's sweep while the stream is quiet."""
        new = self.versions() if self.versions is not None else None
        if new is not None and not hasattr(new.model, "short_encoder"):
            log.warning("version %s holds a %s, which cannot serve the stream: staying on %s",
                        new.version, type(new.model).__name__, self.model_version)
        elif new is not None:
            log.info("serving version %s (was %s); open sessions are re-encoded at their next event",
                     new.version, self.model_version)
            self._use(new.model, new.items, new.version, new.users)
            self.max_segment = new.model.config.max_segment
            self.stats.switches += 1

    @torch.no_grad()
    def reencode(self, sessions: Sequence[Session]) -> None:
        """Rebuild these sessions' states with the served model from the item ids they hold.

        The same rules as :meth:`process` (the boundary rule, unknown items kept but not stepped), so
        a session continues exactly as if the new model had served it from its first event. The
        sessions are stepped together, one batched ``step`` per position of the longest segment.
        """
        t0 = time.perf_counter()
        index = self.items.index
        segments: list[list[tuple[int, float]]] = []  # per session: (item index, dt seconds) of its current segment
        for s in sessions:
            seg: list[tuple[int, float]] = []
            seen, prev = [], None
            for item_id, ts, _ in s.events:
                if prev is not None and len(seg) >= self.max_segment:
                    seg = []  # Boundary.SEGMENT, as process() applies it
                idx = index(item_id)
                if idx is not None:
                    seg.append((idx, 0.0 if prev is None else max(0, ts - prev) / 1000.0))
                    seen.append(idx)
                prev = ts if prev is None else max(prev, ts)
            s.seen, s.seg_len, s.model_version = array("q", seen), len(seg), self.model_version
            s.state = self._init_state.copy()
            segments.append(seg)
        for p in range(max((len(seg) for seg in segments), default=0)):
            rows = [j for j, seg in enumerate(segments) if len(seg) > p]
            state = torch.from_numpy(np.stack([sessions[j].state for j in rows])).to(self.device)  # (b, d)
            item = torch.tensor([segments[j][p][0] for j in rows], device=self.device)  # (b,)
            dt = torch.tensor([segments[j][p][1] for j in rows], device=self.device)  # (b,)
            new = self.model.short_encoder.step(state, item, dt).cpu().numpy()  # (b, d)
            for n, j in enumerate(rows):
                sessions[j].state = new[n]
        self.stats.reencoded += len(sessions)
        self.stats.reencode_ms += (time.perf_counter() - t0) * 1000
        if self._announce:  # once per model: later batches re-encode their own few users the same way
            self._announce = False
            log.info("model %s: re-encoded %d open sessions in %.1f ms", self.model_version, len(sessions),
                     (time.perf_counter() - t0) * 1000)

    @torch.no_grad()
    def process(self, table: SessionTable, clicks: Sequence[tuple[ClickEvent, Origin]],
                wall_ms: float | None = None) -> list[Recommendation | DeadLetter | SessionClosed]:
        """Apply a micro-batch to one shard's sessions; the outputs follow the input order.

        Each event yields one ``Recommendation``, or one ``DeadLetter`` when its event_id is already
        in the user's session (never applied twice); a ``SessionClosed`` precedes the event that
        opens a new session after the gap.
        """
        wall_ms = now_ms() if wall_ms is None else wall_ms
        self.follow()
        out: list[list] = [[] for _ in clicks]
        per_user: dict[str, list[int]] = {}
        for i, (ev, _) in enumerate(clicks):
            per_user.setdefault(ev.user_id, []).append(i)
        stale = [s for u in per_user if (s := table.sessions.get(u)) is not None and s.model_version != self.model_version]
        if stale:
            self.reencode(stale)
        tel, opened, closed = self.telemetry, self.stats.sessions_opened, self.stats.sessions_closed
        with tel.batch_span([ev.event_id for ev, _ in clicks]) as span:
            t0 = time.perf_counter()
            version, vectors = self.long_term(list(per_user))
            t1 = time.perf_counter()
            long_of = dict(zip(per_user, vectors))
            queues = list(per_user.values())
            for w in range(max((len(q) for q in queues), default=0)):
                wave = [q[w] for q in queues if len(q) > w]
                self._apply_wave(table, clicks, wave, long_of, version, out, wall_ms)
            span.set_attribute(ATTR_REDIS_MS, (t1 - t0) * 1000)
            span.set_attribute(ATTR_MODEL_MS, (time.perf_counter() - t1) * 1000)
        results = [o for per_event in out for o in per_event]
        recs = [o for o in results if isinstance(o, Recommendation)]
        tel.recommendations_out.add(len(recs))
        for r in recs:
            tel.e2e_latency.record(r.emit_ts - r.event_ts)
        if len(recs) < len(clicks):
            tel.dead_letters.add(len(clicks) - len(recs), {"reason": "duplicate"})
        for a in results:
            if isinstance(a, DriftAlert):
                tel.drift_alerts.add(1, {"signal": a.signal, "detector": a.detector})
        tel.sessions_active.add((self.stats.sessions_opened - opened) - (self.stats.sessions_closed - closed))
        return results

    def _apply_wave(self, table, clicks, wave, long_of, version, out, wall_ms) -> None:
        rows, dts, known = [], [], []  # events that get a recommendation, their dt, item index
        for i in wave:
            ev, origin = clicks[i]
            self.stats.events += 1
            self.clock.observe(ev.ts, wall_ms)
            s = table.sessions.get(ev.user_id)
            if s is not None and s.has_event(ev.event_id):
                self.stats.duplicates += 1
                out[i].append(dead_letter(origin, "duplicate"))
                continue
            b = boundary(None if s is None else s.last_ts, ev.ts, 0 if s is None else s.seg_len,
                         self.gap_ms, self.max_segment)
            if b is Boundary.SESSION:
                if s is not None:
                    out[i].append(self._close(table, s))
                s = table.sessions[ev.user_id] = Session(ev.user_id, ev.ts, ev.ts, self._init_state.copy(),
                                                         model_version=self.model_version)
                self.stats.sessions_opened += 1
            elif b is Boundary.SEGMENT:
                s.state, s.seg_len = self._init_state.copy(), 0
            dts.append(max(0, ev.ts - s.last_ts) / 1000.0)  # seconds; 0 at a session's first event
            s.last_ts = max(s.last_ts, ev.ts)
            s.record(ev.event_id, ev.item_id, ev.ts, ev.event_type)
            idx = self.items.index(ev.item_id)
            if idx is None:  # a new product: kept in the session for retraining, not stepped
                self.stats.unknown_items += 1
            else:
                s.seen.append(idx)
            known.append(idx)
            rows.append(i)
        if not rows:
            return
        sessions = [table.sessions[clicks[i][0].user_id] for i in rows]
        step = [j for j, k in enumerate(known) if k is not None]
        if step:
            state = torch.from_numpy(np.stack([sessions[j].state for j in step])).to(self.device)  # (b, d)
            item = torch.tensor([known[j] for j in step], device=self.device)  # (b,)
            dt = torch.tensor([dts[j] for j in step], device=self.device)  # (b,)
            new = self.model.short_encoder.step(state, item, dt).cpu().numpy()  # (b, d)
            for n, j in enumerate(step):
                sessions[j].state, sessions[j].seg_len = new[n], sessions[j].seg_len + 1
        longs = [long_of[s.user_id] for s in sessions]
        users, alphas = self._fuse(sessions, longs, dts)  # (B, d), (B,)
        top_scores, top_items = self._rank(users, sessions)  # (B, K), (B, K)
        emit, raw = int(now_ms()), self._raw_ids
        for j, i in enumerate(rows):
            ev, cold = clicks[i][0], longs[j] is None
            self.stats.recommendations += 1
            self.stats.cold_starts += cold
            top = [{"item_id": raw[k], "score": x} for k, x in zip(top_items[j], top_scores[j])
                   if x != -math.inf]  # fewer than K items may be left after exclusion
            # From plain dicts: pydantic validates these faster than it builds nested models.
            out[i].append(Recommendation.model_validate({
                "user_id": ev.user_id,
                "event_id": ev.event_id,
                "items": top,
                "model_version": self.model_version,
                "long_term_version": None if cold else version,
                "cold_start": cold,
                "alpha": alphas[j],
                "unknown_item": known[j] is None,
                "event_ts": ev.ts,
                "emit_ts": emit,
            }))
            out[i] += self._watch(sessions[j], ev, tuple(t["item_id"] for t in top), None if cold else alphas[j],
                                  cold, known[j] is None)

    def _watch(self, s: Session, ev: ClickEvent, top: tuple[str, ...], alpha: float | None, cold: bool,
               unknown: bool) -> list[DriftAlert]:
        """Online quality of the event against its session's previous top-K, and the drift signals."""
        # None: the first event of a session
        q = next_item_quality(ev.item_id, s.last_top.split(_SEP)) if s.last_top else None
        s.last_top = _SEP.join(top)
        if q is not None:
            self.stats.scored += 1
            self.stats.hits += q.hit
        if self.drift is None:
            return []
        signals = {"hit": None if q is None else q.hit, "ndcg": None if q is None else q.ndcg, "alpha": alpha,
                   "cold_start": cold, "unknown_item": unknown}
        alerts = self.drift.update({k: v for k, v in signals.items() if k in self.drift.detectors}, ts=ev.ts,
                                   model_version=self.model_version)
        self.stats.drift_alerts += len(alerts)
        for a in alerts:
            log.warning("drift: %s (%s) moved from %s to %s after %d values", a.signal, a.detector, a.mean_before,
                        a.mean_after, a.n_seen)
        return alerts

    def _long_state(self, sessions: list[Session], longs: list[LongTerm | None]) -> LongState:
        """Each row's long-term input: the published state, with the session's closed segments folded in
        (the model's ``extend_long``; rows of users the model has no embedding for keep the published one)."""
        state = self.model.empty_long(len(sessions))  # (B, d), (B,), (B,)
        warm = [j for j, v in enumerate(longs) if v is not None]
        if warm:
            state.mean[warm] = torch.from_numpy(np.stack([longs[j].vector for j in warm])).to(self.device)
            state.log_z[warm] = torch.tensor([longs[j].log_norm for j in warm], device=self.device)
            state.n[warm] = torch.tensor([float(longs[j].n_items) for j in warm], device=self.device)
        user_of = {} if self.users is None else {j: self.users.index(s.user_id) for j, s in enumerate(sessions)}
        fold = [j for j, s in enumerate(sessions) if len(s.seen) > s.seg_len and user_of.get(j) is not None]
        if not fold:
            return state
        closed = [sessions[j].seen[: len(sessions[j].seen) - sessions[j].seg_len] for j in fold]
        items = torch.zeros(len(fold), max(map(len, closed)), dtype=torch.long, device=self.device)  # (b, K)
        for r, c in enumerate(closed):
            items[r, : len(c)] = torch.tensor(c)  # oldest first, 0-padded at the end
        sub = self.model.extend_long(LongState(state.mean[fold], state.log_z[fold], state.n[fold]), items,
                                     torch.tensor([user_of[j] for j in fold], device=self.device))
        state.mean[fold], state.log_z[fold], state.n[fold] = sub.mean, sub.log_z, sub.n
        return state

    def _fuse(self, sessions: list[Session], longs: list, dts: list[float]) -> tuple[torch.Tensor, list[float]]:
        state = torch.from_numpy(np.stack([s.state for s in sessions])).to(self.device)  # (B, d)
        short = self.model.short_vector(state)  # (B, d)
        long, has_long = self.model.long_vector(self._long_state(sessions, longs))  # (B, d), (B,)
        seg_len = torch.tensor([s.seg_len for s in sessions], device=self.device)  # (B,)
        dt = torch.tensor(dts, device=self.device)  # (B,)
        users, alpha = self.model.fuse(long, short, seg_len, dt, has_long=has_long)
        return users, alpha.clamp(0.0, 1.0).tolist()  # (B, d), B floats

    def _rank(self, users: torch.Tensor, sessions: list[Session]) -> tuple[list, list]:
        """Top-K (scores, item indices) per row; padding and excluded items score -inf."""
        scores = score(users, self._item_emb)  # (B, n_items+1)
        if self.exclude_seen:
            rows = [j for j, s in enumerate(sessions) for _ in s.seen]
            cols = [k for s in sessions for k in s.seen]
            scores[rows, cols] = float("-inf")
        top = torch.topk(scores, min(self.top_k, scores.shape[1] - 1), dim=1)
        return top.values.tolist(), top.indices.tolist()

    def _close(self, table: SessionTable, s: Session) -> SessionClosed:
        del table.sessions[s.user_id]
        self.stats.sessions_closed += 1
        return session_closed(s)

    def observe(self, events: Sequence[ClickEvent], wall_ms: float | None = None) -> None:
        """Advance the clock with events that arrived but may wait in a batch."""
        wall_ms = now_ms() if wall_ms is None else wall_ms
        self.clock.observe(max(ev.ts for ev in events), wall_ms)

    def close_idle(self, table: SessionTable, wall_ms: float | None = None) -> list[SessionClosed]:
        """Close every session idle for longer than the gap (by :class:`Clock`); drop its state."""
        clock = self.clock.now(now_ms() if wall_ms is None else wall_ms)
        if clock is None:
            return []
        idle = [s for s in table.sessions.values() if clock - s.last_ts > self.gap_ms]
        self.telemetry.sessions_active.add(-len(idle))
        return [self._close(table, s) for s in idle]


@torch.no_grad()
def recommend_offline(model: torch.nn.Module, items: Vocab, user: int, history: Sequence[tuple[str, int]],
                      session: Sequence[tuple[str, int]], *, gap_ms: int, max_segment: int, top_k: int = 10,
                      exclude_seen: bool = True) -> tuple[list[str], list[float], float]:
    """The offline answer for one user: the model's full ``forward`` over history + session.

    This is the reference the stream must match (``Recommender`` uses the published long-term
    vector and the incremental ``step`` instead). ``history`` and ``session`` are ``(item_id, ts)``
    pairs of known items, oldest first; the session must start after the gap.

    Returns
    -------
    items, scores, alpha
        The top-K after the last session event, best first, and the fusion gate there.
    """
    seq = list(history) + list(session)
    idx = [items.index(i) for i, _ in seq]
    ts = np.array([t for _, t in seq], dtype=np.int64)
    starts = segment_starts(ts, gap_ms, max_segment)
    # 0 at a session's first event, as in the stream: it drops a user's state when the session
    # closes, so it cannot know how long the user was away.
    dts = np.where(starts == Boundary.SESSION, 0, np.diff(ts, prepend=ts[0])) / 1000.0
    batch = SeqBatch(
        user=torch.tensor([user]),
        items=torch.tensor([idx]),  # (1, T)
        dts=torch.tensor(dts, dtype=torch.float32)[None],  # (1, T)
        seg_start=torch.from_numpy(starts != Boundary.NONE)[None],  # (1, T)
        targets=torch.zeros(1, len(seq), dtype=torch.long),
    )
    out = model.eval()(batch)
    scores = score(out.user[:, -1], model.item_embeddings())[0]  # (n_items+1,)
    if exclude_seen:
        scores[[items.index(i) for i, _ in session]] = float("-inf")
    top = torch.topk(scores, min(top_k, len(scores) - 1))
    keep = torch.isfinite(top.values)
    return ([items.raw_of(int(k)) for k in top.indices[keep]], top.values[keep].tolist(),
            float(out.alpha[0, -1]))


class LongTermReader:
    """The production long-term lookup: the current Redis version, read through the TTL cache.

    ``slsrec:current`` is re-read at most every ``ttl_s``; only a version with a higher sequence number
    than the one in use is taken (versions only move forward). Two modes:

    - ``load`` given (``slsrec serve`` without ``--run``): a new version's model is loaded in a
      background thread (``load(version)``) while the stream goes on with the version in use;
      :meth:`poll` then hands it to the :class:`Recommender`, and the vectors switch with the model.
    - otherwise the served model is fixed (``--run``): new versions published for ``run`` switch the
      vectors only; a version of another run holds vectors of another model, meaningless to this
      one, so the reader stays on the version it has and says a restart without ``--run`` follows it.

    Parameters
    ----------
    store : LongTermStore
    ttl_s : float
        How stale a cached vector (or the current version id) may be.
    run : str, optional
        The served run directory; versions whose ``meta["run"]`` names another run are not used.
    telemetry : Telemetry, optional
    load : callable, optional
        ``version -> Published``; follow every new version, model included.
    version : str, optional
        The version in use at the start (its model already served).
    """

    def __init__(self, store: LongTermStore, ttl_s: float, run: str | None = None, telemetry: Telemetry | None = None,
                 load: Callable[[str], Published] | None = None, version: str | None = None):
        self.store = store
        self.telemetry = telemetry
        self.cache = CachedLongTerm(store, ttl_s)
        self.ttl_s = ttl_s
        self.run = None if run is None else Path(run).resolve()
        self.load = load
        self.version: str | None = None
        self._checked_at = -float("inf")
        self._refused: set[str] = set()
        self._loading: tuple[str, Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="slsrec-load") if load is not None else None
        if version is not None:
            self._use(version)

    def __call__(self, user_ids: Sequence[str]) -> tuple[str | None, list[np.ndarray | None]]:
        self._check()
        if self.version is None:
            return None, [None] * len(user_ids)
        hits, misses, t0 = self.cache.hits, self.cache.misses, time.perf_counter()
        vectors = self.cache.get_many(self.version, user_ids)
        if self.telemetry is not None:
            self.telemetry.cache_hits.add(self.cache.hits - hits)
            self.telemetry.cache_misses.add(self.cache.misses - misses)
            if self.cache.misses > misses:  # one round trip
                self.telemetry.redis_latency.record((time.perf_counter() - t0) * 1000)
        return self.version, vectors

    def poll(self) -> Published | None:
        """A newer version whose model has finished loading (the reader now reads its vectors), or None."""
        self._check()
        if self._loading is None or not self._loading[1].done():
            return None
        version, future = self._loading
        self._loading = None
        try:
            published = future.result()
        except UserError as e:  # expired, or published without model files: keep serving what we have
            self._refused.add(version)
            log.warning("cannot load version %s (%s): staying on %s", version, e, self.version)
            return None
        self._use(version)
        return published

    def _newer(self, version: str | None) -> bool:
        if version is None or version == self.version or version in self._refused:
            return False
        if self.version is None:
            return True
        seq, ours = parse_seq(version), parse_seq(self.version)
        return seq is not None and (ours is None or seq > ours)

    def _check(self) -> None:
        if time.monotonic() - self._checked_at < self.ttl_s:
            return
        self._checked_at = time.monotonic()
        current = self.store.current_version()
        if not self._newer(current):
            return
        if self._pool is not None:
            if self._loading is None:
                log.info("version %s published: loading its model", current)
                self._loading = (current, self._pool.submit(self._timed_load, current))
            return
        published = self.store.meta(current).get("run")
        if self.run is not None and published is not None and Path(published).resolve() != self.run:
            self._refused.add(current)
            log.warning("long-term version %s was published for run %s, not the served %s: staying on %s; "
                        "serve without --run to follow every published version", current, published, self.run,
                        self.version)
            return
        self._use(current)

    def _timed_load(self, version: str) -> Published:
        t0 = time.perf_counter()
        published = self.load(version)
        log.info("version %s: model loaded in %.0f ms (in the background)", version, (time.perf_counter() - t0) * 1000)
        return published

    def _use(self, version: str) -> None:
        log.info("long-term vectors: version %s", version)
        self.version = version
        if self.telemetry is not None:
            self.telemetry.set_versions(long_term=version)


def version_run_dir(store: LongTermStore, version: str, runs_dir: str | Path) -> Path:
    """The run directory of a published version: ``meta["run"]`` when it is on this machine, else its
    model files from Redis written to ``{runs_dir}/published/{version}`` (``load_run`` reads either).

    Raises :class:`CheckpointError` when neither exists (the version expired, or was published
    without model files).
    """
    run = store.meta(version).get("run")
    if run is not None and (Path(run) / WEIGHTS).is_file():
        return Path(run)
    files = store.model_files(version)
    if WEIGHTS not in files or CONFIG not in files:
        raise CheckpointError(f"version {version}: run {run or '(none)'} is not on this machine and Redis holds "
                              "no model files for it")
    out = Path(runs_dir) / "published" / version
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / Path(name).name).write_bytes(data)  # name only: a file name never leaves the directory
    return out


def load_version(store: LongTermStore, runs_dir: str | Path, version: str) -> Published:
    """Load the model published with ``version`` (its run directory, or its model files from Redis)."""
    loaded = load_run(version_run_dir(store, version, runs_dir))
    return Published(version, loaded.model, loaded.items, loaded.users)


def open_recommender(settings: Settings, run: str | Path | None = None, telemetry: Telemetry | None = None,
                     worker_id: str = "0") -> Recommender:
    """The recommender ``slsrec serve`` runs: a model, the Redis long-term lookup, a drift monitor.

    Without ``run``, serves the current Redis version (its run directory, or the model files the
    publisher stored in Redis when that directory is not on this machine) and follows every newer
    version without a restart; ``model_version`` is then the version id. With ``run``, serves that
    run (``model_version`` is its directory name) and reads the versions published for it.
    """
    store = LongTermStore(settings.redis_url)
    reader: LongTermReader
    if run is None:
        version = store.current_version()
        if version is None:
            raise UserError(f"nothing is published in Redis at {store.location} yet: "
                            "run `slsrec publish --run runs/NAME` first, or pass --run")
        published = load_version(store, settings.runs_dir, version)
        model, items, users, model_version = published.model, published.items, published.users, version
        reader = LongTermReader(store, settings.redis_cache_ttl_s, telemetry=telemetry,
                                load=partial(load_version, store, settings.runs_dir), version=version)
        source = store.meta(version).get("run", version)
    else:
        loaded = load_run(run)
        model, items, users, model_version, source = loaded.model, loaded.items, loaded.users, Path(run).name, str(run)
        reader = LongTermReader(store, settings.redis_cache_ttl_s, str(run), telemetry)
    if not hasattr(model, "short_encoder"):
        raise CheckpointError(f"{source}: a {type(model).__name__} model cannot serve the stream; "
                              "train an slsrec model")
    trained_gap = getattr(model.config, "gap_ms", None)
    gap_ms = settings.session_gap_s * 1000
    if trained_gap not in (None, gap_ms):
        log.warning("session gap %d ms differs from the %d ms the model was trained with", gap_ms, trained_gap)
    return Recommender(model, items, reader, model_version=model_version, gap_ms=gap_ms,
                       max_segment=model.config.max_segment, top_k=settings.top_k,
                       exclude_seen=settings.exclude_seen, device=settings.torch_device(), telemetry=telemetry,
                       versions=reader.poll if run is None else None, drift=DriftMonitor(worker_id=worker_id),
                       users=users)

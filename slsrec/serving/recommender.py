"""The recommender: the model in eval mode applied to micro-batches of click events.

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
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from opentelemetry import metrics, trace

from schemas.drift import DriftAlert, HealthEvent
from schemas.events import ClickEvent, DeadLetter, Recommendation, SessionClosed
from slsrec.data import Vocab
from slsrec.drift import DriftMonitor, next_item_quality
from slsrec.model import LongState, score
from slsrec.serving.sessions import _SEP, Session, SessionTable, session_closed
from slsrec.sessions import Boundary, boundary
from slsrec.store import LongTerm
from slsrec.telemetry import ATTR_MODEL_MS, ATTR_REDIS_MS, Telemetry


log = logging.getLogger(__name__)

# user ids -> (long-term version or None, one published LongTerm state or None per user)
# (a third element, when present and true: degraded, i.e. Redis did not answer and the entries come
# from the local cache however old, None where nothing is cached)
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
        published long-term state; ``None`` is a cold start (short-term only, flagged). A third element,
        ``degraded``, says that Redis did not answer: the entries are the cached ones (flagged
        ``long_term="cached"``), ``None`` where none is cached (``"unavailable"``, not a cold start).
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
    events : callable, optional
        Called after every micro-batch; the records it returns (``HealthEvent``) join the output.
    """

    def __init__(self, model: torch.nn.Module, items: Vocab, long_term: LongTermLookup, model_version: str,
                 gap_ms: int, max_segment: int, top_k: int = 10, exclude_seen: bool = True, device: str = "cpu",
                 telemetry: Telemetry | None = None, versions: VersionSource | None = None,
                 drift: DriftMonitor | None = None, users: Vocab | None = None,
                 events: Callable[[], list[HealthEvent]] | None = None):
        self.long_term = long_term
        self.events = events
        self.degraded = False  # the latest micro-batch was served without Redis
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
            answer = self.long_term(list(per_user))
            version, vectors, self.degraded = answer[0], answer[1], len(answer) > 2 and answer[2]
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
        return results + (self.events() if self.events is not None else [])

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
            ev, no_long = clicks[i][0], longs[j] is None
            cold = no_long and not self.degraded  # degraded: whether the user has a vector is unknown
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
                "long_term_version": None if no_long else version,
                "cold_start": cold,
                "long_term": ("unavailable" if no_long else "cached") if self.degraded else "fresh",
                "alpha": alphas[j],
                "unknown_item": known[j] is None,
                "event_ts": ev.ts,
                "emit_ts": emit,
            }))
            out[i] += self._watch(sessions[j], ev, tuple(t["item_id"] for t in top), None if no_long else alphas[j],
                                  None if self.degraded else cold, known[j] is None)

    def _watch(self, s: Session, ev: ClickEvent, top: tuple[str, ...], alpha: float | None, cold: bool | None,
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

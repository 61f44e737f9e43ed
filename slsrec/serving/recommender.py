"""The recommender: the model in eval mode applied to micro-batches of click events.

No Bytewax here. ``flows/recommend.py`` wires these into named steps; every rule (sessions,
duplicates, unknown items, cold start, exclusion of seen items) is testable on plain lists.

A micro-batch holds events of many users. Events of one user are applied in order: wave ``i`` is
the ``i``-th event of every user in the batch, and each wave costs one batched encoder ``step``, one
``fuse`` and one scoring matmul for all its users: :meth:`Recommender.update_many` applies a wave
to the sessions, :meth:`Recommender.recommend_many` ranks for it. Recommendations are
:class:`slsrec.codec.Recommendation` records, serialised once by the flow.

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

import contextlib
import itertools
import logging
import math
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from opentelemetry import metrics, trace
from threadpoolctl import threadpool_limits

from schemas.drift import DriftAlert, HealthEvent
from schemas.events import DeadLetter, SessionClosed
from slsrec.codec import Click, RankedItem, Recommendation, encode
from slsrec.data import Vocab
from slsrec.drift import DriftMonitor, Quality, next_item_quality
from slsrec.explain import score_parts
from slsrec.model import LongState
from slsrec.serving.sessions import Session, SessionTable, event_hash, session_closed
from slsrec.sessions import Boundary, boundary, seconds_since
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


class Fused(NamedTuple):
    """One wave's fusion: the user vectors and the parts they were fused from (for the explanation)."""

    user: torch.Tensor  # (B, d)
    alpha: torch.Tensor  # (B,) in [0, 1]
    long: torch.Tensor  # (B, d), zero where cold
    short: torch.Tensor  # (B, d)


class LongPart(NamedTuple):
    """What a session's row of ``SessionTable.longs`` (its long-term vector) was computed from."""

    long: LongTerm | None  # the published state (by identity: the long-term cache hands out one object per user)
    key: tuple[int, str]  # (closed items of the session, model version)
    has: bool  # False: no long-term input (cold), the row is zero


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
          topic: str = "clicks", partition: int = 0, offset: int = 0) -> tuple[Click, Origin]:
    """A click with its origin, as the flow passes it to :meth:`Recommender.process` (for tests)."""
    ev = Click(event_id, user_id, item_id, ts, event_type)
    return ev, Origin(encode(ev), topic, partition, offset)


@contextlib.contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Limit torch and every BLAS/OpenMP pool in this process (numpy's OpenBLAS scores the items) to
    ``n`` threads while the block runs (``slsrec serve`` runs in it). Their defaults, a thread per core
    each, fight the worker's own thread and Kafka's on a small machine: the serving core ran ~2x
    slower (docs/benchmarks.md).

    >>> with compute_threads(1):
    ...     torch.get_num_threads()
    1
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def numpy_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b)`` of CPU tensors through numpy's BLAS (OpenBLAS), not torch's."""
    return torch.from_numpy(a.numpy() @ b.numpy())


def fastest_mm(table: torch.Tensor, rows: int = 64, repeats: int = 5) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``torch.mm`` or :func:`numpy_mm`, whichever scores ``rows`` users against ``table`` ``(d, n)``
    faster on this CPU (the median of ``repeats`` calls each). Which BLAS wins depends on the CPU:
    numpy's was about 2x faster on an AMD EPYC, torch's 20-35% faster on an Intel Xeon with AVX-512
    (docs/benchmarks.md). Both give the same scores up to float rounding.

    >>> table = torch.randn(8, 100)
    >>> fastest_mm(table) in (torch.mm, numpy_mm)
    True
    >>> users = torch.randn(3, 8)
    >>> torch.allclose(numpy_mm(users, table), torch.mm(users, table), atol=1e-5)
    True
    """
    users = torch.randn(rows, table.shape[0])

    def median_s(mm: Callable) -> float:
        mm(users, table)  # warm caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mm(users, table)
            times.append(time.perf_counter() - t0)
        return sorted(times)[repeats // 2]

    return min((torch.mm, numpy_mm), key=median_s)


Output = Recommendation | DeadLetter | SessionClosed | DriftAlert
TOP_BLOCK = 32  # items per block of `top_k_blocked`


def top_k_blocked(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` for ``scores`` of ``(B, n)``, ``n`` a multiple of TOP_BLOCK.

    The best ``k`` items lie in the ``k`` blocks with the highest maxima (each block holding one of
    them has a maximum at least the k-th score, and at most ``k`` blocks do), so a top-k over block
    maxima and one over those blocks' items replace the top-k over all items: faster on a CPU for
    3,706 items from about 8 rows (up to 2x; 10-40% at 8-512 rows in a slow hour of this VM), while
    below 8 rows the three extra calls cost more (19 against 7 µs for one row).

    >>> s = torch.randn(9, 96)
    >>> all(torch.equal(a, b) for a, b in zip(top_k_blocked(s, 2), torch.topk(s, 2, dim=1)))
    True
    """
    b, n = scores.shape
    if k * TOP_BLOCK >= n or b < 8:
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices
    blocks = scores.view(b, n // TOP_BLOCK, TOP_BLOCK)  # (B, n_blocks, TOP_BLOCK)
    best = torch.topk(blocks.amax(dim=2), k, dim=1).indices  # (B, k)
    candidates = torch.gather(blocks, 1, best[:, :, None].expand(-1, -1, TOP_BLOCK)).reshape(b, -1)  # (B, k*TOP_BLOCK)
    values, at = torch.topk(candidates, k, dim=1)  # (B, k)
    return values, torch.gather(best, 1, at // TOP_BLOCK) * TOP_BLOCK + at % TOP_BLOCK


@dataclass
class Wave:
    """The events of one wave that get a recommendation (at most one per user), column by column."""

    rows: list[int]  # positions in the micro-batch
    sessions: list[Session]
    known: list[int | None]  # the item's index, None for an item the model does not know
    dts: list[float]  # seconds since the session's previous event; 0 at its first
    longs: list[LongTerm | None]  # the published long-term state, None for a cold start


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
    max_open_sessions : int, optional
        Per table (one per worker): past it, the least recently active sessions are closed early after
        each micro-batch (``SessionClosed`` with reason ``"evicted"``). ``None``: no cap.
    max_session_events : int, optional
        A session that holds this many events is closed (reason ``"evicted"``) before its next event,
        which opens a new one. ``None``: no cap.
    events : callable, optional
        Called after every micro-batch; the records it returns (``HealthEvent``) join the output.
    """

    def __init__(self, model: torch.nn.Module, items: Vocab, long_term: LongTermLookup, model_version: str,
                 gap_ms: int, max_segment: int, top_k: int = 10, exclude_seen: bool = True, device: str = "cpu",
                 telemetry: Telemetry | None = None, versions: VersionSource | None = None,
                 drift: DriftMonitor | None = None, users: Vocab | None = None, max_open_sessions: int | None = None,
                 max_session_events: int | None = None, events: Callable[[], list[HealthEvent]] | None = None):
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
        self.max_open_sessions = max_open_sessions
        self.max_session_events = max_session_events
        self.stats = Stats()
        self.clock = Clock()
        self.telemetry = telemetry or Telemetry(metrics.NoOpMeterProvider(), trace.NoOpTracerProvider())
        self._use(model, items, model_version, users)

    @torch.inference_mode()
    def _use(self, model: torch.nn.Module, items: Vocab, model_version: str, users: Vocab | None) -> None:
        """Serve ``model`` from now on (the tables derived from it change with it)."""
        self.model = model.to(self.device).eval()
        self.items = items
        self.users = users
        self.model_version = model_version
        emb = model.item_embeddings().detach()  # (n_items+1, d)
        # Padded to whole blocks of `top_k_blocked`; the padding rows score -inf like index 0.
        self._n_scored = len(emb)
        self._item_emb = torch.cat([emb, emb.new_zeros((-len(emb)) % TOP_BLOCK, emb.shape[1])])  # (n_pad, d)
        self._item_emb_t = self._item_emb.T.contiguous()  # (d, n_pad): either BLAS is faster on it than on a view
        self._mm = fastest_mm(self._item_emb_t) if self.device == "cpu" else torch.mm
        self._init_state = model.short_encoder.init_state(1)[0].cpu().numpy()  # (d,)
        self._raw_ids = [None] + [items.raw_of(i) for i in range(1, len(items) + 1)]  # index -> raw id
        self._raw_np = np.array(self._raw_ids + [None] * (len(self._item_emb) - len(self._raw_ids)), dtype=object)
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

    @torch.inference_mode()
    def reencode(self, table: SessionTable, sessions: Sequence[Session]) -> None:
        """Rebuild these sessions' states with the served model from the item ids they hold.

        The same rules as :meth:`process` (:func:`slsrec.sessions.boundary`, unknown items kept but not
        stepped), so a session continues exactly as if the new model had served it from its first
        event. The sessions are stepped together, one batched ``step`` per position of the longest
        segment.
        """
        t0 = time.perf_counter()
        index = self.items.index
        segments: list[list[tuple[int, float]]] = []  # per session: (item index, dt seconds) of its current segment
        for s in sessions:
            seg: list[tuple[int, float]] = []
            seen, prev = [], None
            for item_id, ts, _ in s.events:
                # One session's events: only the segment rule can cut them (no gap inside a session).
                b = boundary(prev, ts, len(seg), None, self.max_segment)
                if b is Boundary.SEGMENT:
                    seg = []
                idx = index(item_id)
                if idx is not None:
                    seg.append((idx, seconds_since(prev, ts, b)))
                    seen.append(idx)
                prev = ts if prev is None else max(prev, ts)
            s.seen, s.seg_len, s.model_version = array("q", seen), len(seg), self.model_version
            s.saved = None  # `seen` is replaced: the next snapshot writes the session whole
            s.last_top = array("q")  # indices of the old model's items: the next event goes unscored
            table.states[s.slot] = self._init_state
            segments.append(seg)
        for p in range(max((len(seg) for seg in segments), default=0)):
            rows = [j for j, seg in enumerate(segments) if len(seg) > p]
            slots = [sessions[j].slot for j in rows]
            state = torch.from_numpy(table.states[slots]).to(self.device)  # (b, d)
            item = torch.tensor([segments[j][p][0] for j in rows], device=self.device)  # (b,)
            dt = torch.tensor([segments[j][p][1] for j in rows], device=self.device)  # (b,)
            table.states[slots] = self.model.short_encoder.step(state, item, dt).cpu().numpy()  # (b, d)
        self.stats.reencoded += len(sessions)
        self.stats.reencode_ms += (time.perf_counter() - t0) * 1000
        if self._announce:  # once per model: later batches re-encode their own few users the same way
            self._announce = False
            log.info("model %s: re-encoded %d open sessions in %.1f ms", self.model_version, len(sessions),
                     (time.perf_counter() - t0) * 1000)

    @torch.inference_mode()  # cheaper per op than no_grad (no version counters): ~10% at small batches
    def process(self, table: SessionTable, clicks: Sequence[tuple[Click, Origin]],
                wall_ms: float | None = None) -> list[Output]:
        """Apply a micro-batch to one shard's sessions; the outputs follow the input order.

        Each event yields one ``Recommendation`` (:class:`slsrec.codec.Recommendation`, serialised
        with :func:`slsrec.codec.encode`), or one ``DeadLetter`` when its event_id is already in the
        user's session (never applied twice); a ``SessionClosed`` precedes the event that opens a new
        session after the gap. Wave ``i`` is the ``i``-th event of every user in the batch:
        :meth:`update_many` applies it, :meth:`recommend_many` ranks for it.
        """
        if not clicks:
            return []
        wall_ms = now_ms() if wall_ms is None else wall_ms
        self.follow()
        self.clock.observe(max(ev.ts for ev, _ in clicks), wall_ms)
        out: list[list] = [[] for _ in clicks]
        per_user: dict[str, list[int]] = {}
        for i, (ev, _) in enumerate(clicks):
            per_user.setdefault(ev.user_id, []).append(i)
        stale = [s for u in per_user if (s := table.sessions.get(u)) is not None and s.model_version != self.model_version]
        if stale:
            self.reencode(table, stale)
        tel, opened, closed = self.telemetry, self.stats.sessions_opened, self.stats.sessions_closed
        with tel.batch_span([ev.event_id for ev, _ in clicks]) as span:
            t0 = time.perf_counter()
            answer = self.long_term(list(per_user))
            version, vectors, self.degraded = answer[0], answer[1], len(answer) > 2 and answer[2]
            t1 = time.perf_counter()
            long_of = dict(zip(per_user, vectors))
            queues = list(per_user.values())
            for w in range(max(len(q) for q in queues)):
                wave = self.update_many(table, clicks, [q[w] for q in queues if len(q) > w], long_of, out)
                if wave.rows:
                    self.recommend_many(table, wave, clicks, version, out)
            span.set_attribute(ATTR_REDIS_MS, (t1 - t0) * 1000)
            span.set_attribute(ATTR_MODEL_MS, (time.perf_counter() - t1) * 1000)
        for u in sorted(per_user, key=lambda u: per_user[u][-1]):  # the table's order: of each user's last event
            if (s := table.sessions.get(u)) is not None:
                table.touch(s)
        table.changed.update(per_user)
        results = [o for per_event in out for o in per_event] + self.evict(table)
        recs = [o for o in results if type(o) is Recommendation]
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

    def update_many(self, table: SessionTable, clicks: Sequence[tuple[Click, Origin]], positions: list[int],
                    long_of: dict[str, LongTerm | None], out: list[list]) -> Wave:
        """Apply one wave (at most one event per user) to the sessions: duplicates are dead-lettered,
        sessions close and open by :func:`slsrec.sessions.boundary` (or the events cap), and the
        encoder steps every known item in one batched call. Returns the events to recommend for."""
        wave = Wave([], [], [], [], [])
        init, index, sessions = self._init_state, self.items.index, table.sessions
        cap = self.max_session_events
        for i in positions:
            ev, origin = clicks[i]
            s = sessions.get(ev.user_id)
            h = event_hash(ev.event_id)
            if s is not None and h in s.ids:
                self.stats.duplicates += 1
                out[i].append(dead_letter(origin, "duplicate"))
                continue
            b = boundary(None if s is None else s.last_ts, ev.ts, 0 if s is None else s.seg_len, self.gap_ms,
                         self.max_segment)
            full = s is not None and cap is not None and s.n_events >= cap
            if b is Boundary.SESSION or full:
                if s is not None:
                    out[i].append(self._close(table, s, "evicted" if b is not Boundary.SESSION else "gap"))
                    b = Boundary.SESSION
                s = table.open(ev.user_id, ev.ts, init, self.model_version)
                self.stats.sessions_opened += 1
            elif b is Boundary.SEGMENT:
                table.states[s.slot], s.seg_len = init, 0
            wave.dts.append(seconds_since(s.last_ts, ev.ts, b))
            s.last_ts = max(s.last_ts, ev.ts)
            s.record(h, ev.item_id, ev.ts, ev.event_type)
            idx = index(ev.item_id)
            if idx is not None:  # else a new product: kept in the session for retraining, not stepped
                s.seen.append(idx)
            wave.rows.append(i)
            wave.sessions.append(s)
            wave.known.append(idx)
            wave.longs.append(long_of[ev.user_id])
        self.stats.events += len(positions)
        self.stats.unknown_items += wave.known.count(None)
        step = [j for j, k in enumerate(wave.known) if k is not None]
        if step:
            slots = [wave.sessions[j].slot for j in step]
            state = torch.from_numpy(table.states[slots]).to(self.device)  # (b, d)
            item = torch.tensor([wave.known[j] for j in step], device=self.device)  # (b,)
            dt = torch.tensor([wave.dts[j] for j in step], device=self.device)  # (b,)
            table.states[slots] = self.model.short_encoder.step(state, item, dt).cpu().numpy()  # (b, d)
            for j in step:
                wave.sessions[j].seg_len += 1
        return wave

    def recommend_many(self, table: SessionTable, wave: Wave, clicks: Sequence[tuple[Click, Origin]],
                       version: str | None, out: list[list]) -> None:
        """Fuse, rank and write one recommendation per event of the wave (then its drift alerts)."""
        fused = self._fuse(table, wave)
        values, indices = self._rank(fused.user, wave.sessions)  # (B, K), (B, K)
        long_part, short_part = score_parts(fused.long, fused.alpha, self._item_emb[indices], values)  # (B, K)
        indices = indices.cpu()
        names = self._raw_np[indices.numpy()].tolist()  # (B, K) raw item ids, in one C loop
        top_scores, tops, longs, shorts = (t.tolist() for t in (values, indices, long_part, short_part))
        alphas = fused.alpha.tolist()
        emit, raw, model_version = int(now_ms()), self._raw_ids, self.model_version
        # Degraded (Redis did not answer): a user without a cached vector is "unavailable", not cold.
        no_long = [v is None for v in wave.longs]
        cold = [n and not self.degraded for n in no_long]
        source = ["unavailable" if n else "cached" for n in no_long] if self.degraded else ["fresh"] * len(no_long)
        for j, i in enumerate(wave.rows):
            ev, scores, s = clicks[i][0], top_scores[j], wave.sessions[j]
            if scores[-1] == -math.inf:  # fewer than K items were left after exclusion
                n = scores.index(-math.inf)
                tops[j], names[j], scores = tops[j][:n], names[j][:n], scores[:n]
            segment = [raw[k] for k in s.seen[len(s.seen) - s.seg_len:]] if s.seg_len else []  # the GRU state's input
            out[i].append(Recommendation(ev.user_id, ev.event_id, list(map(RankedItem, names[j], scores, longs[j], shorts[j])),
                                         model_version, None if no_long[j] else version, cold[j], source[j],
                                         alphas[j], segment, wave.known[j] is None, ev.ts, emit))
        self.stats.recommendations += len(wave.rows)
        self.stats.cold_starts += sum(cold)
        # degraded: whether a user has a vector is unknown, so no cold-start signal
        for i, alert in self._watch(wave, clicks, tops, alphas, no_long, [None] * len(cold) if self.degraded else cold):
            out[i].append(alert)

    def _watch(self, wave: Wave, clicks: Sequence[tuple[Click, Origin]], tops: list[list[int]],
               alphas: list[float], no_long: list[bool], cold: list[bool | None]) -> list[tuple[int, DriftAlert]]:
        """Online quality of each event against its session's previous top-K, and the drift signals."""
        quality: list[Quality | None] = []
        for s, known, top in zip(wave.sessions, wave.known, tops):
            # None: the first event of a session (an unknown item, index None, is never a hit)
            quality.append(next_item_quality(known, s.last_top) if s.last_top else None)
            s.last_top = array("q", top)
        scored = [q for q in quality if q is not None]
        self.stats.scored += len(scored)
        self.stats.hits += sum(q.hit for q in scored)
        if self.drift is None:
            return []
        signals = {"hit": [None if q is None else q.hit for q in quality],
                   "ndcg": [None if q is None else q.ndcg for q in quality],
                   "alpha": [None if n else a for a, n in zip(alphas, no_long)], "cold_start": cold,
                   "unknown_item": [k is None for k in wave.known]}
        alerts = self.drift.update_many({k: v for k, v in signals.items() if k in self.drift.detectors},
                                        ts=[clicks[i][0].ts for i in wave.rows], model_version=self.model_version)
        self.stats.drift_alerts += len(alerts)
        for _, a in alerts:
            log.warning("drift: %s (%s) moved from %s to %s after %d values", a.signal, a.detector, a.mean_before,
                        a.mean_after, a.n_seen)
        return [(wave.rows[n], a) for n, a in alerts]

    def _long_vectors(self, table: SessionTable, sessions: list[Session],
                      longs: list[LongTerm | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's long-term vector and whether it has one, (B, d) and (B,): ``long_vector`` of
        :meth:`_long_state`. That changes only with the published state, the session's closed items
        (at a segment boundary) or the model, so the table keeps it per session (``longs``, with a
        :class:`LongPart`) and only the rows where one of those changed are computed."""
        keys = [(len(s.seen) - s.seg_len, self.model_version) for s in sessions]
        stale = [j for j, s in enumerate(sessions)
                 if (part := s.long_part) is None or part.long is not longs[j] or part.key != keys[j]]
        if stale:
            long, has = self.model.long_vector(self._long_state([sessions[j] for j in stale], [longs[j] for j in stale]))
            table.longs[[sessions[j].slot for j in stale]] = long.cpu().numpy()  # (b, d)
            for j, flag in zip(stale, has.tolist()):
                sessions[j].long_part = LongPart(longs[j], keys[j], flag)
        return (torch.from_numpy(table.longs[[s.slot for s in sessions]]).to(self.device),
                torch.tensor([s.long_part.has for s in sessions], device=self.device))

    def _long_state(self, sessions: list[Session], longs: list[LongTerm | None]) -> LongState:
        """Each row's long-term input: the published state, with the session's closed segments folded in
        (the model's ``extend_long``; rows of users the model has no embedding for keep the published one)."""
        state = self.model.empty_long(len(sessions))  # (B, d), (B,), (B,)
        warm = [j for j, v in enumerate(longs) if v is not None]
        if warm:
            vectors = np.array([longs[j].vector for j in warm], dtype=np.float32)  # 3x faster than np.stack
            state.mean[warm] = torch.from_numpy(vectors).to(self.device)
            state.log_z[warm] = torch.tensor([longs[j].log_norm for j in warm], device=self.device)
            state.n[warm] = torch.tensor([float(longs[j].n_items) for j in warm], device=self.device)
        user_of = {} if self.users is None else {j: self.users.index(s.user_id) for j, s in enumerate(sessions)
                                                 if len(s.seen) > s.seg_len}
        fold = [j for j, u in user_of.items() if u is not None]
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

    def _fuse(self, table: SessionTable, wave: Wave) -> Fused:
        state = torch.from_numpy(table.states[[s.slot for s in wave.sessions]]).to(self.device)  # (B, d)
        short = self.model.short_vector(state)  # (B, d)
        long, has_long = self._long_vectors(table, wave.sessions, wave.longs)  # (B, d), (B,)
        seg_len = torch.tensor([s.seg_len for s in wave.sessions], device=self.device)  # (B,)
        dt = torch.tensor(wave.dts, device=self.device)  # (B,)
        users, alpha = self.model.fuse(long, short, seg_len, dt, has_long=has_long)
        return Fused(users, alpha.clamp(0.0, 1.0), long, short)

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        """:func:`slsrec.model.score` against the padded item table: ``(B, n_pad)``, -inf at index 0
        and the padding."""
        scores = self._mm(users, self._item_emb_t)  # (B, n_pad)
        scores[:, 0] = scores[:, self._n_scored:] = -math.inf
        return scores

    def _rank(self, users: torch.Tensor, sessions: list[Session]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K (scores, item indices) per row, (B, K) each; padding and excluded items score -inf."""
        scores = self._scores(users)  # (B, n_pad)
        if self.exclude_seen:
            lengths = np.fromiter((len(s.seen) for s in sessions), np.int64, len(sessions))
            cols = np.frombuffer(b"".join(s.seen for s in sessions), np.int64).copy()  # every session's items
            scores[torch.from_numpy(np.repeat(np.arange(len(sessions)), lengths)), torch.from_numpy(cols)] = -math.inf
        return top_k_blocked(scores, min(self.top_k, self._n_scored - 1))

    def _close(self, table: SessionTable, s: Session, reason: str) -> SessionClosed:
        table.close(s)
        self.stats.sessions_closed += 1
        return session_closed(s, reason)

    def observe(self, events: Sequence[Click], wall_ms: float | None = None) -> None:
        """Advance the clock with events that arrived but may wait in a batch."""
        self.clock.observe(max(ev.ts for ev in events), now_ms() if wall_ms is None else wall_ms)

    def close_idle(self, table: SessionTable, wall_ms: float | None = None) -> list[SessionClosed]:
        """Close every session idle for longer than the gap (by :class:`Clock`); drop its state.

        The table is in order of last activity, so the scan stops at the first session still open: a
        sweep costs what it closes, not what is open. (A session whose events arrived out of time
        order may close one sweep later, or at its user's next event by the gap rule.)
        """
        clock = self.clock.now(now_ms() if wall_ms is None else wall_ms)
        if clock is None:
            return []
        idle = list(itertools.takewhile(lambda s: clock - s.last_ts > self.gap_ms, table))
        self.telemetry.sessions_active.add(-len(idle))
        return [self._close(table, s, "gap") for s in idle]

    def evict(self, table: SessionTable) -> list[SessionClosed]:
        """Close the least recently active sessions beyond ``max_open_sessions`` (reason ``"evicted"``)."""
        over = 0 if self.max_open_sessions is None else len(table) - self.max_open_sessions
        if over <= 0:
            return []
        return [self._close(table, s, "evicted") for s in list(itertools.islice(table, over))]

"""Sessions, the long/short split, the leave-one-out split and the training/evaluation batches.

One rule, :func:`boundary`, decides where a segment (the short-term input) starts. Training batches
and the streaming flow both use it, so what the model learns is exactly what it sees online:

- ``SESSION``: the first event, or an inactivity gap longer than ``gap_ms``;
- ``SEGMENT``: same session, but the current segment already holds ``max_segment`` items;
- ``NONE``: the event joins the current segment.

The short-term input of a position is its segment; the long-term input is everything before it
(earlier sessions and the overflow of a long session), capped by the model to the latest L items.

>>> ts = [0, 1_000, 2_000, 3_000, 10_000_000]
>>> [Boundary(b).name for b in segment_starts(ts, gap_ms=1_800_000, max_segment=3)]
['SESSION', 'NONE', 'NONE', 'SEGMENT', 'SESSION']
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from slsrec.data import Interactions

DEFAULT_GAP_MS = 30 * 60 * 1000  # 30 minutes, as Settings.session_gap_s


class Boundary(enum.IntEnum):
    """What an event starts. Non-zero means a new segment starts at the event."""

    NONE = 0
    SEGMENT = 1
    SESSION = 2


def boundary(prev_ts: int | None, ts: int, segment_len: int, gap_ms: int | None, max_segment: int) -> Boundary:
    """The one boundary rule. ``segment_len`` is the number of items already in the current segment.

    ``gap_ms=None`` turns the inactivity rule off: one session per user, cut into fixed windows of
    ``max_segment`` items (the CLSR-style baseline).

    >>> boundary(None, 5, 0, 1800_000, 20).name
    'SESSION'
    >>> boundary(0, 1800_001, 3, 1800_000, 20).name, boundary(0, 1800_000, 3, 1800_000, 20).name
    ('SESSION', 'NONE')
    >>> boundary(0, 1, 20, 1800_000, 20).name
    'SEGMENT'
    >>> boundary(0, 10**12, 3, None, 20).name
    'NONE'
    """
    if prev_ts is None or (gap_ms is not None and ts - prev_ts > gap_ms):
        return Boundary.SESSION
    if segment_len >= max_segment:
        return Boundary.SEGMENT
    return Boundary.NONE


def seconds_since(prev_ts: int | None, ts: int, b: Boundary) -> float:
    """The time input of an event: seconds since the previous event of its session, 0 where a session
    starts (the stream forgets a user when the session closes, so training must not use the gap), never
    negative (an event older than the session's newest counts as 0).

    >>> seconds_since(None, 5_000, Boundary.SESSION), seconds_since(1_000, 3_500, Boundary.NONE)
    (0.0, 2.5)
    >>> seconds_since(9_000, 3_500, Boundary.SEGMENT), seconds_since(0, 10**9, Boundary.SESSION)
    (0.0, 0.0)
    """
    return 0.0 if b is Boundary.SESSION or prev_ts is None else max(0, ts - prev_ts) / 1000.0


def segment_starts(ts, gap_ms: int | None, max_segment: int) -> np.ndarray:
    """:func:`boundary` applied along one user's time-sorted sequence: ``(n,)`` int8 Boundary codes."""
    out = np.zeros(len(ts), dtype=np.int8)
    prev, seg_len = None, 0
    for i, t in enumerate(np.asarray(ts, dtype=np.int64).tolist()):
        b = boundary(prev, t, seg_len, gap_ms, max_segment)
        out[i] = b
        seg_len = 1 if b else seg_len + 1
        prev = t
    return out


def _all_starts(inter: Interactions, gap_ms: int | None, max_segment: int) -> np.ndarray:
    """Boundary codes for every event of every user (aligned with ``inter``'s arrays)."""
    out = np.zeros(len(inter), dtype=np.int8)
    for u in range(inter.n_users):
        s, e = inter.offsets[u], inter.offsets[u + 1]
        out[s:e] = segment_starts(inter.ts[s:e], gap_ms, max_segment)
    return out


@dataclass(eq=False)
class Split:
    """Leave-one-out positions into ``inter``'s arrays (see :func:`leave_one_out`).

    User ``u``'s events are ``inter.offsets[u]:inter.offsets[u+1]``; its training events end (exclusive)
    at ``train_end[u]``; ``valid[u]`` / ``test[u]`` index its validation / test target, ``-1`` when the
    user has fewer than 3 interactions. Each target's input is every event of the user before it.
    """

    inter: Interactions
    train_end: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)  # per (kind, rule, max_len) padded arrays

    @property
    def train(self) -> Interactions:
        """The training events only (what a popularity count or a retrain may see)."""
        pos = np.arange(len(self.inter))
        return self.inter.subset(pos < self.train_end[self.inter.user])


def leave_one_out(inter: Interactions) -> Split:
    """Per user: last event = test target, the one before = validation target, the rest = training.

    Users with fewer than 3 interactions only contribute to training.

    >>> import pandas as pd
    >>> from slsrec.data import Interactions
    >>> df = pd.DataFrame({"user_id": list("aaaab"), "item_id": list("wxyzw"), "timestamp": [1, 2, 3, 4, 1]})
    >>> split = leave_one_out(Interactions.from_frame(df))
    >>> split.train_end.tolist(), split.valid.tolist(), split.test.tolist()
    ([2, 5], [2, -1], [3, -1])
    """
    start, end = inter.offsets[:-1], inter.offsets[1:]
    has_eval = end - start >= 3
    return Split(inter, np.where(has_eval, end - 2, end), np.where(has_eval, end - 2, -1),
                 np.where(has_eval, end - 1, -1))


def seconds_since_previous(ts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """:func:`seconds_since` along time-sorted sequences with their :func:`segment_starts` codes
    (float32); vectorised, as training applies it to every event.

    >>> seconds_since_previous(np.array([0, 1_000, 3_500, 10**9]), np.array([2, 0, 1, 2])).tolist()
    [0.0, 1.0, 2.5, 0.0]
    """
    return np.where(codes == Boundary.SESSION, 0.0, np.maximum(np.diff(ts, prepend=0), 0) / 1000.0).astype(np.float32)


@dataclass
class SeqBatch:
    """A batch of left-padded sequences (padding item 0). Shapes: B users, T positions.

    ``dts`` is seconds since the user's previous event (0 where a session starts and at padding);
    ``seg_start`` marks where a segment starts (always at the first real position of a row);
    ``targets`` is the next item per position, 0 where there is no loss.
    """

    user: torch.Tensor  # (B,) int64
    items: torch.Tensor  # (B, T) int64
    dts: torch.Tensor  # (B, T) float32
    seg_start: torch.Tensor  # (B, T) bool
    targets: torch.Tensor  # (B, T) int64

    def to(self, device: str | torch.device) -> SeqBatch:
        return SeqBatch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.user)


def batch_from(seqs, users=None, *, T: int | None = None, gap_ms: int | None = DEFAULT_GAP_MS,
               max_segment: int = 20) -> SeqBatch:
    """A SeqBatch from a few ``(items, ts_ms)`` sequences, one per user (oldest first), cut by
    :func:`boundary` and left-padded to ``T`` (default: the longest) as the training batches are.
    ``users`` defaults to 0..B-1; ``targets`` are all 0.

    >>> b = batch_from([([3, 4, 5], [0, 1_000, 2_000]), ([7], [0])], max_segment=2)
    >>> b.items.tolist(), b.seg_start.tolist(), b.dts.tolist()[0]
    ([[3, 4, 5], [0, 0, 7]], [[True, False, True], [False, False, True]], [0.0, 1.0, 1.0])
    """
    T = T or max(len(items) for items, _ in seqs)
    items = np.zeros((len(seqs), T), dtype=np.int64)
    dts = np.zeros((len(seqs), T), dtype=np.float32)
    seg_start = np.zeros((len(seqs), T), dtype=bool)
    for row, (its, ts) in enumerate(seqs):
        if len(its):
            ts = np.asarray(ts, dtype=np.int64)
            codes = segment_starts(ts, gap_ms, max_segment)
            items[row, T - len(its):] = its
            dts[row, T - len(its):] = seconds_since_previous(ts, codes)
            seg_start[row, T - len(its):] = codes != Boundary.NONE
    users = torch.as_tensor(range(len(seqs)) if users is None else users, dtype=torch.long)
    return SeqBatch(users, torch.from_numpy(items), torch.from_numpy(dts), torch.from_numpy(seg_start),
                    torch.zeros(len(seqs), T, dtype=torch.long))


def _train_rows(split: Split, max_len: int, window: str, rng: np.random.Generator | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows ``(user, stop, target_from)``: a row's inputs are the user's events
    ``[stop - max_len, stop)`` (those before the user's first are padding), and only inputs from
    ``target_from`` on carry a loss.

    - ``last``: one row per user, its latest ``max_len`` inputs.
    - ``random``: one row per user, ending at a random position (drawn anew each epoch).
    - ``all``: windows from the user's first event on, each ``max_len // 2`` further than the last and the
      final one ending at the latest event; a row trains on the inputs the previous row did not reach.
      Every training event is then a target exactly once per epoch, with at least ``max_len // 2``
      events of context where the history has them. A user with ``n`` inputs gets
      ``1 + ceil((n - T) / (T/2))`` rows.

    >>> import pandas as pd
    >>> from slsrec.data import Interactions
    >>> df = pd.DataFrame({"user_id": ["a"] * 11, "item_id": list("abcdefghijk"), "timestamp": range(11)})
    >>> split = leave_one_out(Interactions.from_frame(df))  # 9 training events: inputs at 0..7
    >>> users, stop, target_from = _train_rows(split, 4, "all", None)  # rows: inputs 0..3, 2..5, 4..7
    >>> stop.tolist(), target_from.tolist()  # the later rows train on inputs 4, 5 and 6, 7
    ([4, 6, 8], [0, 4, 6])
    """
    start = split.inter.offsets[:-1]
    stop = split.train_end - 1  # inputs seq[:-1], targets seq[1:]
    users = np.flatnonzero(stop > start)  # users with at least one input position
    start, stop = start[users], stop[users]
    if window == "random":  # a window end in [start + max_len, stop] where the sequence is longer
        shortest = np.minimum(start + max_len, stop)
        stop = shortest + (rng.random(len(stop)) * (stop - shortest + 1)).astype(np.int64)
    elif window == "all":
        stride = max(1, max_len // 2)
        rows = 1 + np.maximum(0, -(-(stop - start - max_len) // stride))  # (N,) rows per user
        k = np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)  # 0..rows-1 per user
        users, start, stop = np.repeat(users, rows), np.repeat(start, rows), np.repeat(stop, rows)
        ends = np.minimum(start + max_len + k * stride, stop)  # the last row ends at the latest input
        previous = np.where(k > 0, np.minimum(start + max_len + (k - 1) * stride, stop), start)
        return users, ends, previous
    return users, stop, start


def _padded(split: Split, kind: str, max_len: int, gap_ms: int | None, max_segment: int,
            window: str = "last", rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Left-padded (n_rows, max_len) arrays for ``kind`` in {train, valid, test}; cached, except the
    ``random`` training windows, which are drawn anew from ``rng`` on every call."""
    key = (kind, window, max_len, gap_ms, max_segment)
    if key in split._cache:
        return split._cache[key]
    inter = split.inter
    codes_key = ("codes", gap_ms, max_segment)
    if codes_key not in split._cache:
        split._cache[codes_key] = _all_starts(inter, gap_ms, max_segment)
    codes = split._cache[codes_key]
    dts = seconds_since_previous(inter.ts, codes)

    if kind == "train":
        users, stop, target_from = _train_rows(split, max_len, window, rng)
    else:
        stop = getattr(split, kind)
        users = np.flatnonzero(stop > inter.offsets[:-1])
        stop = stop[users]
    start = inter.offsets[users]
    pos = stop[:, None] - max_len + np.arange(max_len)  # (N, T) event index of each column
    real = pos >= start[:, None]
    pos = np.where(real, pos, 0)
    first = real & ~np.concatenate([np.zeros((len(users), 1), bool), real[:, :-1]], axis=1)
    out = {
        "user": users.astype(np.int64),
        "items": np.where(real, inter.item[pos], 0),
        "dts": np.where(real, dts[pos], 0.0).astype(np.float32),
        "seg_start": real & ((codes[pos] != Boundary.NONE) | first),
    }
    if kind == "train":
        has_loss = real & (pos >= target_from[:, None])
        out["targets"] = np.where(has_loss, inter.item[np.minimum(pos + 1, len(inter) - 1)], 0)
    else:
        out["targets"] = np.zeros_like(out["items"])
        out["targets"][:, -1] = inter.item[stop]
    if window != "random":
        split._cache[key] = out
    return out


def _batches(arrays: dict[str, np.ndarray], order: np.ndarray, batch_size: int) -> Iterator[SeqBatch]:
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        yield SeqBatch(*(torch.from_numpy(arrays[f][rows]) for f in SeqBatch.__dataclass_fields__))


def train_batches(split: Split, *, batch_size: int, max_len: int, gap_ms: int | None, max_segment: int,
                  rng: np.random.Generator, window: Literal["all", "last", "random"] = "all") -> Iterator[SeqBatch]:
    """One epoch of training batches, rows shuffled by ``rng``.

    Per user the training sequence gives inputs ``seq[:-1]`` and targets ``seq[1:]``, cut into rows of
    ``max_len`` positions by ``window`` (see :func:`_train_rows`): ``all`` makes every training event a
    target once per epoch; ``last`` and ``random`` keep one row per user (the latest span, or a random
    one drawn anew every epoch), so longer histories are only partly trained on.
    """
    arrays = _padded(split, "train", max_len, gap_ms, max_segment, window, rng)
    yield from _batches(arrays, rng.permutation(len(arrays["user"])), batch_size)


def eval_batches(split: Split, which: Literal["valid", "test"], *, batch_size: int, max_len: int,
                 gap_ms: int | None, max_segment: int) -> Iterator[SeqBatch]:
    """Evaluation batches in user order: inputs are the history before the target; ``targets[:, -1]``."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', not {which!r}")
    arrays = _padded(split, which, max_len, gap_ms, max_segment)
    yield from _batches(arrays, np.arange(len(arrays["user"])), batch_size)


def split_report(inter: Interactions, gap_ms: int | None, max_segment: int, max_long: int) -> dict[str, float | int]:
    """How the long/short split behaves on a dataset.

    Prediction positions are every event that has a next event (the last one of each user does not).
    A position's long-term input is empty when it lies in the user's first segment; without the
    overflow rule (long-term = earlier sessions only) it is empty anywhere in the first session.
    """
    codes = _all_starts(inter, gap_ms, max_segment)
    start, end = inter.offsets[:-1], inter.offsets[1:]
    active = end > start
    start, end = start[active], end[active]
    n_events = end - start
    user_start = np.repeat(start, n_events)  # (n,) index of each event's user's first event
    seg, ses = codes != Boundary.NONE, codes == Boundary.SESSION
    sessions = np.add.reduceat(ses, start)
    span_days = (inter.ts[end - 1] - inter.ts[start]) / 86_400_000
    session_lengths = np.diff(np.append(np.flatnonzero(ses), len(inter)))

    # Every user's first event starts a segment and a session, so running counts never cross users.
    seg_no = np.cumsum(seg) - np.cumsum(seg)[user_start] + 1  # 1 = the user's first segment
    ses_no = np.cumsum(ses) - np.cumsum(ses)[user_start] + 1
    seg_begin = np.maximum.accumulate(np.where(seg, np.arange(len(inter)), 0))
    long_len = np.minimum(seg_begin - user_start, max_long)  # events before the current segment
    is_pred = np.ones(len(inter), bool)
    is_pred[end - 1] = False

    same_ts = np.zeros(len(inter), bool)
    dup = (np.diff(inter.ts) == 0) & (np.diff(inter.user) == 0)
    same_ts[1:] |= dup
    same_ts[:-1] |= dup
    pct = np.percentile(span_days, [10, 25, 50, 75, 90]) if len(span_days) else [float("nan")] * 5
    return {
        "users": int(active.sum()),
        "items": inter.n_items,
        "events": len(inter),
        "events per user (median)": float(np.median(n_events)),
        "sessions per user (mean)": round(float(sessions.mean()), 2),
        "sessions per user (median)": float(np.median(sessions)),
        "user span days p10": round(float(pct[0]), 3),
        "user span days p25": round(float(pct[1]), 3),
        "user span days p50": round(float(pct[2]), 3),
        "user span days p75": round(float(pct[3]), 3),
        "user span days p90": round(float(pct[4]), 3),
        "session length (median events)": float(np.median(session_lengths)),
        "session length (mean events)": round(float(session_lengths.mean()), 2),
        "sessions longer than max_segment": round(float((session_lengths > max_segment).mean()), 4),
        "events sharing a timestamp (same user)": round(float(same_ts.mean()), 4),
        "events at the same timestamp as the previous": round(float(dup.sum() / max(len(inter), 1)), 4),
        "prediction positions": int(is_pred.sum()),
        "empty long-term input, with overflow": round(float((seg_no[is_pred] == 1).mean()), 4),
        "empty long-term input, sessions only": round(float((ses_no[is_pred] == 1).mean()), 4),
        "long-term input length (mean, capped)": round(float(long_len[is_pred].mean()), 2),
    }

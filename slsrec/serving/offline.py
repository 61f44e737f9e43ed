"""The offline reference: the model's full ``forward`` over a user's history, which the stream must match."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from slsrec.data import Vocab
from slsrec.explain import score_parts
from slsrec.model import score
from slsrec.sessions import Boundary, SeqBatch, seconds_since_previous, segment_starts


class Offline(NamedTuple):
    """The offline answer after the last session event: what a ``Recommendation`` carries."""

    items: list[str]  # the top-K, best first
    scores: list[float]
    alpha: float  # the fusion gate
    long_scores: list[float]  # each score's long-term part (slsrec.explain)
    short_scores: list[float]  # and its short-term part
    short_term_items: list[str]  # the current segment's items: the short-term vector's input


@torch.no_grad()
def recommend_offline(model: torch.nn.Module, items: Vocab, user: int, history: Sequence[tuple[str, int]],
                      session: Sequence[tuple[str, int]], *, gap_ms: int, max_segment: int, top_k: int = 10,
                      exclude_seen: bool = True) -> Offline:
    """The offline answer for one user: the model's full ``forward`` over history + session.

    This is the reference the stream must match (``Recommender`` uses the published long-term
    vector and the incremental ``step`` instead). ``history`` and ``session`` are ``(item_id, ts)``
    pairs of known items, oldest first; the session must start after the gap.

    Returns
    -------
    Offline
        The top-K after the last session event, best first, the fusion gate there, and the explanation.
    """
    seq = list(history) + list(session)
    idx = [items.index(i) for i, _ in seq]
    ts = np.array([t for _, t in seq], dtype=np.int64)
    starts = segment_starts(ts, gap_ms, max_segment)
    dts = seconds_since_previous(ts, starts)
    batch = SeqBatch(
        user=torch.tensor([user]),
        items=torch.tensor([idx]),  # (1, T)
        dts=torch.from_numpy(dts)[None],  # (1, T)
        seg_start=torch.from_numpy(starts != Boundary.NONE)[None],  # (1, T)
        targets=torch.zeros(1, len(seq), dtype=torch.long),
    )
    out = model.eval()(batch)
    scores = score(out.user[:, -1], model.item_embeddings())[0]  # (n_items+1,)
    if exclude_seen:
        scores[[items.index(i) for i, _ in session]] = float("-inf")
    top = torch.topk(scores, min(top_k, len(scores) - 1))
    keep = torch.isfinite(top.values)
    ranked = top.indices[keep]  # (K,)
    long_part, short_part = score_parts(out.long[:, -1], out.alpha[:, -1], model.item_embeddings()[ranked][None],
                                        top.values[keep][None])  # (1, K) each
    segment = int(np.flatnonzero(starts != Boundary.NONE)[-1])  # where the last segment begins
    return Offline([items.raw_of(int(k)) for k in ranked], top.values[keep].tolist(), float(out.alpha[0, -1]),
                   long_part[0].tolist(), short_part[0].tolist(), [i for i, _ in seq[segment:]])

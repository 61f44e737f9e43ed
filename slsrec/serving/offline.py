"""The offline reference: the model's full ``forward`` over a user's history, which the stream must match."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from slsrec.data import Vocab
from slsrec.model import score
from slsrec.sessions import Boundary, SeqBatch, segment_starts


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

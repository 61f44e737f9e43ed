"""Full-ranking metrics (HR@k, NDCG@k, MRR) with a River-style accumulator.

The rank of a target is the number of *other* items scoring at least as high as it, so ties count
against the target: a constant scorer gets the worst rank, never a lucky one.

Evaluation protocol: before ranking, :func:`mask_seen` removes the user's own history (and the
padding column) from the candidates, as is usual for full-ranking evaluation on MovieLens. A target
that repeats an item from its own history then cannot be ranked (it gets the worst rank), so apply
the mask only to data where users meet an item once (MovieLens, the synthetic generator).

>>> import torch
>>> m = RankingMetrics(ks=(1, 2))
>>> m.update(torch.tensor([[0.0, 0.9, 0.5, 0.1], [0.0, 0.2, 0.2, 0.9]]), torch.tensor([2, 1]))
>>> m.result(digits=4)
{'HR@1': 0.0, 'HR@2': 0.5, 'NDCG@1': 0.0, 'NDCG@2': 0.3155, 'MRR': 0.4167}
"""

from __future__ import annotations

import math

import torch


def ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all columns: count of other columns scoring >= it. ``(B,)``.

    A NaN score counts as -inf, so a broken model cannot score hits.
    """
    scores = scores.nan_to_num(nan=float("-inf"))  # (B, V)
    target_score = scores.gather(1, targets[:, None])  # (B, 1)
    return (scores >= target_score).sum(dim=1) - 1  # (B,) the target itself always counts once


def mask_seen(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Copy of ``scores`` (B, V) with each row's history ``items`` (B, T) and column 0 set to -inf.

    >>> mask_seen(torch.zeros(1, 4), torch.tensor([[0, 3]])).tolist()
    [[-inf, 0.0, 0.0, -inf]]
    """
    out = scores.scatter(1, items, float("-inf"))  # (B, V); padding 0 in items masks column 0 too
    out[:, 0] = float("-inf")
    return out


class RankingMetrics:
    """Accumulate HR@k, NDCG@k (one relevant item: 1/log2(rank+2) inside the top k) and MRR.

    Call ``update(scores, targets)`` per batch and read ``result()``: means over all updated rows.
    Rows whose target is 0 (padding) are skipped.

    Parameters
    ----------
    ks
        Cut-offs for HR and NDCG.
    """

    def __init__(self, ks: tuple[int, ...] = (5, 10, 20)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self._n = 0
        self._hr = {k: 0.0 for k in self.ks}
        self._ndcg = {k: 0.0 for k in self.ks}
        self._rr = 0.0

    @property
    def n(self) -> int:
        """Number of targets seen so far."""
        return self._n

    @torch.no_grad()
    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        keep = targets != 0
        r = ranks(scores[keep].float(), targets[keep]).double()  # (B',)
        self._n += len(r)
        for k in self.ks:
            hit = r < k
            self._hr[k] += hit.sum().item()
            self._ndcg[k] += torch.where(hit, 1.0 / torch.log2(r + 2), 0.0).sum().item()
        self._rr += (1.0 / (r + 1)).sum().item()

    def result(self, digits: int | None = None) -> dict[str, float]:
        """``{'HR@k': .., 'NDCG@k': .., 'MRR': ..}``, rounded when ``digits`` is given; NaN before any update."""
        n = self._n or math.nan
        out = {f"HR@{k}": self._hr[k] / n for k in self.ks}
        out |= {f"NDCG@{k}": self._ndcg[k] / n for k in self.ks}
        out["MRR"] = self._rr / n
        return out if digits is None else {k: round(v, digits) for k, v in out.items()}

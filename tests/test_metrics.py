import math

import pytest
import torch

from slsrec.metrics import RankingMetrics, mask_seen, ranks


def test_hand_computed_ranks_and_metrics():
    # Column 0 is padding (masked). Targets land at ranks 0, 1 and 5.
    scores = torch.tensor([
        [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # target 1: best -> rank 0
        [0.0, 1.0, 9.0, 8.0, 3.0, 4.0, 5.0, 6.0],  # target 3: only item 2 above -> rank 1
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # target 2: items 3..7 above -> rank 5
    ])
    targets = torch.tensor([1, 3, 2])
    scores = mask_seen(scores, torch.zeros(3, 1, dtype=torch.long))
    assert ranks(scores, targets).tolist() == [0, 1, 5]
    m = RankingMetrics(ks=(1, 5, 10))
    m.update(scores, targets)
    r = m.result()
    assert r["HR@1"] == pytest.approx(1 / 3)
    assert r["HR@5"] == pytest.approx(2 / 3)
    assert r["HR@10"] == pytest.approx(1.0)
    assert r["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert r["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 3)
    assert r["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 6) / 3)
    assert m.n == 3


def test_ties_count_against_the_target():
    V = 21
    scores = mask_seen(torch.zeros(4, V), torch.zeros(4, 1, dtype=torch.long))  # constant scorer
    m = RankingMetrics(ks=(5, 10))
    m.update(scores, torch.tensor([1, 4, 7, 20]))
    r = m.result()
    assert r["HR@10"] == 0.0 and r["NDCG@10"] == 0.0  # worst rank: all 19 other real items tie
    assert r["MRR"] == pytest.approx(1 / 20)


def test_accumulating_batches_equals_one_big_batch():
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(64, 50, generator=g), torch.randint(1, 50, (64,), generator=g)
    whole, parts = RankingMetrics(), RankingMetrics()
    whole.update(scores, targets)
    for i in range(0, 64, 10):
        parts.update(scores[i:i + 10], targets[i:i + 10])
    assert parts.result() == pytest.approx(whole.result())


def test_mask_seen_excludes_history_and_padding_without_touching_the_input():
    scores = torch.arange(6, dtype=torch.float32).repeat(2, 1)  # (2, 6)
    history = torch.tensor([[0, 0, 5], [2, 3, 5]])  # left-padded
    masked = mask_seen(scores, history)
    assert masked[0].tolist() == [-math.inf, 1, 2, 3, 4, -math.inf]
    assert masked[1].tolist() == [-math.inf, 1, -math.inf, -math.inf, 4, -math.inf]
    assert scores[0, 5] == 5  # a copy
    # Item 4 is now the best unseen item of row 1; a target that was already seen ranks last.
    assert ranks(masked, torch.tensor([4, 3])).tolist() == [0, 5]


def test_padding_targets_are_skipped_and_empty_result_is_nan():
    m = RankingMetrics(ks=(1,))
    assert math.isnan(m.result()["HR@1"])
    m.update(torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 1]))
    assert m.n == 1 and m.result() == {"HR@1": 1.0, "NDCG@1": 1.0, "MRR": 1.0}
    m.reset()
    assert m.n == 0


def test_nan_scores_never_count_as_hits():
    scores = torch.tensor([[float("-inf"), float("nan"), 1.0, 2.0]])
    assert ranks(scores, torch.tensor([1])).tolist() == [3]

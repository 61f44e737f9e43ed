"""Long-term vectors for publishing: one batched pass equals the model's per-user answer; unknown
items are skipped, unknown users get no vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slsrec.data import Interactions, Vocab
from slsrec.errors import CheckpointError
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.publish import long_term_vectors
from slsrec.registry import build_model
from slsrec.sessions import SeqBatch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> SLSRec:
    torch.manual_seed(0)
    return SLSRec(SLSRecConfig(n_users=6, n_items=12, d=8, long_len=5)).eval()


USERS = Vocab([f"u{i}" for i in range(6)], padding=False)
ITEMS = Vocab([f"i{i}" for i in range(1, 13)], padding=True)  # i1 has index 1, ...


def _history(rows: list[tuple[str, str]]) -> Interactions:
    """(user_id, item_id) rows in time order, with vocabularies in first-seen order (not the model's)."""
    users = list(dict.fromkeys(u for u, _ in rows))
    items = list(dict.fromkeys(i for _, i in rows))
    return Interactions([users.index(u) for u, _ in rows], [items.index(i) + 1 for _, i in rows],
                        np.arange(len(rows)) * 1000, Vocab(users, padding=False), Vocab(items, padding=True))


def _one(model, user: str, items: list[str]) -> np.ndarray:
    """The model's long-term vector for one user, unpadded and unbatched."""
    idx = torch.tensor([[ITEMS.index(i) for i in items]])  # (1, T)
    zeros = torch.zeros(idx.shape)
    batch = SeqBatch(torch.tensor([USERS.index(user)]), idx, zeros, zeros.bool(), torch.zeros_like(idx))
    with torch.no_grad():
        return model.long_term(batch)[0].numpy()  # (d,)


def test_batched_vectors_equal_the_per_user_answer(model):
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": [f"i{k}" for k in rng.integers(1, 13, size=n)] for u, n in enumerate([1, 3, 5, 9, 20, 2])}
    rows = [(u, i) for u, items in seqs.items() for i in items]
    rng.shuffle(rows)  # interleaved users; per-user order is what counts
    per_user = {u: [i for v, i in rows if v == u] for u in seqs}
    vectors = long_term_vectors(model, USERS, ITEMS, _history(rows), batch_size=4)  # 2 batches, mixed padding

    assert sorted(vectors) == sorted(seqs)
    for user, items in per_user.items():
        expected = _one(model, user, items[-model.config.long_len:])  # only the L most recent count
        np.testing.assert_allclose(vectors[user], expected, atol=1e-6)
        assert vectors[user].dtype == np.float32


def test_unknown_items_are_skipped_and_unknown_users_get_no_vector(model):
    rows = [("u1", "i3"), ("u1", "brand-new"), ("u1", "i4"), ("u2", "brand-new"), ("stranger", "i3")]
    vectors = long_term_vectors(model, USERS, ITEMS, _history(rows))
    assert sorted(vectors) == ["u1"]  # u2 knows only an unknown item; stranger has no user embedding
    np.testing.assert_allclose(vectors["u1"], _one(model, "u1", ["i3", "i4"]), atol=1e-6)


def test_models_without_long_term_vectors_are_refused():
    with pytest.raises(CheckpointError, match="no long-term vector"):
        long_term_vectors(build_model("sasrec", 6, 12, d=8), USERS, ITEMS, _history([("u1", "i3")]))

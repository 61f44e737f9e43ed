"""Every registered model: shapes, padding, causality, the registry; Popularity and SASRec specifics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slsrec.errors import UserError
from slsrec.model import score
from slsrec.registry import MODEL_NAMES, build_model
from test_model import N_ITEMS, N_USERS, SEQS, make_batch

NEURAL = [n for n in MODEL_NAMES if n != "pop"]


def build(name, **kw):
    torch.manual_seed(0)
    m = build_model(name, N_USERS, N_ITEMS, **{"d": 16, "max_len": 20, **kw})
    if name == "pop":
        m.fit(make_batch(SEQS).items)
    return m.eval()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_and_scores(name):
    m = build(name)
    b = make_batch(SEQS)
    out = m(b)
    B, T = b.items.shape
    d = m.item_embeddings().shape[1]
    assert out.user.shape == (B, T, d) and out.aux_loss.shape == ()
    assert out.alpha is None or out.alpha.shape == (B, T)
    s = score(out.user, m.item_embeddings())  # (B, T, n_items+1)
    assert s.shape == (B, T, N_ITEMS + 1) and (s[..., 0] == float("-inf")).all() and torch.isfinite(s[..., 1:]).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_never_changes_a_result(name):
    m = build(name)
    b = make_batch(SEQS)
    out, out_p = m(b), m(make_batch(SEQS, T=b.items.shape[1] + 4))
    torch.testing.assert_close(out_p.user[:, 4:], out.user, atol=1e-5, rtol=0)
    for i, seq in enumerate(SEQS):  # alone, unpadded
        alone = m(make_batch([seq], users=[i]))
        torch.testing.assert_close(out_p.user[i, -len(seq[0]):], alone.user[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NEURAL)
def test_outputs_never_see_later_items(name):
    m = build(name)
    items, ts = SEQS[0]
    out = m(make_batch([(items, ts)]))
    later = m(make_batch([(items[:5] + [30] * 4, ts)]))
    torch.testing.assert_close(later.user[0, :5], out.user[0, :5], atol=1e-6, rtol=0)
    assert (later.user[0, 5:] - out.user[0, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_states_its_batch_geometry_and_rebuilds_from_its_config(name):
    m = build(name)
    cfg = m.config
    assert cfg.max_len == 20 and cfg.max_segment >= 1 and (cfg.gap_ms is None or cfg.gap_ms > 0)
    again = build_model(name, **dataclasses.asdict(cfg))
    assert type(again) is type(m) and again.config == cfg


def test_variants_differ_only_where_they_should():
    cfg = {n: build(n).config for n in MODEL_NAMES if n.startswith(("slsrec", "clsr"))}
    assert (cfg["slsrec"].fusion, cfg["slsrec"].contrastive) == ("gate", "infonce")
    assert (cfg["slsrec-long"].fusion, cfg["slsrec-short"].fusion) == ("long", "short")
    assert cfg["slsrec-nocl"].contrastive == "none" and cfg["slsrec-fixed"].fixed_alpha == 0.5
    assert cfg["clsr"].gap_ms is None and cfg["clsr"].contrastive == "bpr"


def test_registry_errors_name_the_choices():
    with pytest.raises(UserError, match="unknown model 'bert4rec'; valid: pop, gru4rec, sasrec, clsr, slsrec"):
        build_model("bert4rec", 2, 3)
    with pytest.raises(UserError, match=r"unknown SASRecConfig option\(s\) n_layer; valid: .*n_layers"):
        build_model("sasrec", 2, 3, n_layer=3)
    with pytest.raises(UserError, match="contrastive='nce' is not one of infonce, bpr, none"):
        build_model("slsrec", 2, 3, contrastive="nce")


def test_popularity_ranks_by_training_counts():
    m = build_model("pop", 1, 5).fit(torch.tensor([[0, 3, 3, 1], [3, 1, 5, 0]]))
    b = make_batch([([2, 4], [0, 1000])])
    s = score(m(b).user[0, -1], m.item_embeddings())  # (n_items+1,)
    assert s.argsort(descending=True)[:3].tolist() == [3, 1, 5]
    with pytest.raises(UserError, match="out of range"):
        m.fit(torch.tensor([6]))
    assert "counts" in m.state_dict()  # saved with the checkpoint


def test_sasrec_rejects_sequences_longer_than_its_positions():
    with pytest.raises(UserError, match="exceeds SASRec max_len=5"):
        build("sasrec", max_len=5)(make_batch(SEQS))


def test_baselines_train():
    """One optimiser step on the full-softmax loss lowers it: gradients reach every parameter."""
    b = make_batch(SEQS)
    b.targets[:, :-1] = b.items[:, 1:]
    for name in ("gru4rec", "sasrec"):
        m = build(name, dropout=0.0).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        losses = []
        for _ in range(2):
            logits = score(m(b).user, m.item_embeddings())[b.targets > 0]  # (n, n_items+1)
            loss = torch.nn.functional.cross_entropy(logits, b.targets[b.targets > 0])
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in m.parameters()), name
            opt.step()
            losses.append(loss.item())
        assert losses[1] < losses[0], name

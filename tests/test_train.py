"""The training loop on small synthetic worlds: it learns, keeps the best weights, evaluates every model
alike, and SLSRec's two representations recover the planted taste (long) and intent (short)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slsrec.data import Interactions
from slsrec.sessions import Boundary, SeqBatch, leave_one_out, segment_starts
from slsrec.synthetic import WorldConfig, generate
from slsrec.train import NegativeSampler, TrainConfig, evaluate, history_items, train

# Small enough for seconds of CPU, big enough to learn from: ~9.5k events, 300 users, 200 items.
WORLD = WorldConfig(n_users=300, n_items=200, n_clusters=8, seed=3)
FAST = dict(lr=1e-2, batch_size=32, threads=1)


@pytest.fixture(scope="module")
def world():
    return generate(WORLD)


@pytest.fixture(scope="module")
def inter(world):
    return Interactions.from_frame(world.events)


@pytest.fixture(scope="module")
def slsrec_run(inter):
    """SLSRec trained briefly (shared by the tests that need a trained model)."""
    cfg = TrainConfig(dataset="synthetic-test", model="slsrec", epochs=8, patience=8,
                      max_len=50, model_options={"d": 32}, **FAST)
    return train(cfg, inter=inter, progress=False)


def test_loss_decreases_and_beats_popularity(inter, slsrec_run):
    losses = [h["train_loss"] for h in slsrec_run.history]
    assert losses[-1] < losses[0] - 0.5, losses
    pop = train(TrainConfig(dataset="synthetic-test", model="pop"), inter=inter, progress=False)
    assert pop.history[0]["train_loss"] is None  # no epochs, same evaluation
    assert slsrec_run.metrics["test"]["masked"]["NDCG@10"] > 2 * pop.metrics["test"]["masked"]["NDCG@10"]


def test_best_weights_are_kept(inter, slsrec_run):
    best = max(h["valid"]["masked"]["NDCG@10"] for h in slsrec_run.history)
    assert slsrec_run.metrics["valid"]["masked"]["NDCG@10"] == best
    again = evaluate(slsrec_run.model, leave_one_out(inter), "valid")
    assert again["masked"]["NDCG@10"] == pytest.approx(best, abs=1e-9)


def test_metrics_record_timings_and_alpha(slsrec_run):
    m = slsrec_run.metrics
    assert set(m["test"]) == {"masked", "strict"} and set(m["test"]["strict"]) == {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"}
    assert 1 <= m["best_epoch"] <= m["epochs_run"] == len(slsrec_run.history)
    assert 0 < m["time_to_convergence_s"] <= m["total_s"] and m["seconds_per_epoch"] > 0
    alpha = m["alpha"]
    assert 0 <= alpha["mean"] <= 1 and alpha["std"] >= 0
    assert sum(b["n"] for b in alpha["by_segment_length"].values()) == round(alpha["n"] * (1 - alpha["cold_fraction"]))


def test_early_stopping_stops_after_patience(inter):
    # A learning rate of 0 never improves after epoch 1: patience 2 stops at epoch 3.
    res = train(TrainConfig(dataset="synthetic-test", model="gru4rec", epochs=10, patience=2, lr=0.0,
                            max_len=20, model_options={"d": 8}), inter=inter, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.metrics["best_epoch"] == 1


def test_lr_decays_after_each_epoch_without_improvement(inter):
    # Halved after exactly the epochs that did not beat the best validation so far (lr 0.5 is too
    # large to improve steadily, so the run plateaus).
    res = train(TrainConfig(dataset="synthetic-test", model="gru4rec", epochs=6, patience=6, lr=0.5, lr_decay=0.5,
                            max_len=20, threads=1, model_options={"d": 8}), inter=inter, progress=False)
    ndcg, lr = [h["valid"]["masked"]["NDCG@10"] for h in res.history], [h["lr"] for h in res.history]
    for e in range(1, len(lr)):
        improved = ndcg[e - 1] > max(ndcg[:e - 1], default=-1.0)
        assert lr[e] == pytest.approx(lr[e - 1] * (1.0 if improved else 0.5))
    assert lr[-1] < lr[0]  # this run did hit a plateau, so the check above saw a decay


def test_seeded_training_is_reproducible(inter):
    cfg = TrainConfig(dataset="synthetic-test", model="sasrec", epochs=1, max_len=20, model_options={"d": 8},
                      **FAST)
    a, b = (train(cfg, inter=inter, progress=False) for _ in range(2))
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.metrics["test"] == b.metrics["test"]


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_sampled_softmax_learns(inter, power):
    res = train(TrainConfig(dataset="synthetic-test", model="gru4rec", epochs=5, loss="sampled", negatives=64,
                            negative_power=power, max_len=50, model_options={"d": 16}, **FAST),
                inter=inter, progress=False)
    pop = train(TrainConfig(dataset="synthetic-test", model="pop"), inter=inter, progress=False)
    assert res.metrics["test"]["masked"]["NDCG@10"] > pop.metrics["test"]["masked"]["NDCG@10"]


def test_sampled_softmax_with_logq_estimates_the_full_softmax():
    # With many draws, the corrected sampled loss approaches the full cross-entropy.
    torch.manual_seed(0)
    n_items, d = 50, 8
    counts = np.repeat(np.arange(1, n_items + 1), np.arange(1, n_items + 1))  # skewed popularity
    sampler = NegativeSampler(counts, n_items, seed=0)
    user, items = torch.randn(16, d), torch.randn(n_items + 1, d)
    target = torch.randint(1, n_items + 1, (16,))
    full_logits = user @ items.T
    full_logits[:, 0] = float("-inf")
    full = F.cross_entropy(full_logits, target)
    sampled = F.cross_entropy(*sampler.logits(user, items, target, negatives=20_000))
    assert sampled.item() == pytest.approx(full.item(), rel=0.05)
    logits, _ = sampler.logits(user, items, target, negatives=2_000)
    assert torch.isinf(logits[:, 1:]).any(), "a negative equal to the target must be masked out"


def test_history_mask_covers_the_whole_history_not_only_max_len(inter):
    split = leave_one_out(inter)
    users = np.flatnonzero(split.test >= 0)[:5]
    hist = history_items(split, "test", users)
    for row, u in zip(hist, users):
        expected = inter.item[inter.offsets[u]:split.test[u]]
        assert sorted(row[row > 0].tolist()) == sorted(expected.tolist())


def test_long_and_short_representations_recover_taste_and_intent(world, inter, slsrec_run):
    """Rank items with each representation alone: the short-term vector's top items fall in the
    current session's planted intent cluster, the long-term vector's in the user's planted taste."""
    model = slsrec_run.model.eval()
    split = leave_one_out(inter)
    cluster = np.zeros(inter.n_items + 1, dtype=int)
    cluster[1:] = world.truth.item_cluster.loc[inter.items.raw].to_numpy()
    session_of = dict(zip(zip(world.events.user_id, world.events.item_id), world.truth.event_session))
    intents = world.truth.sessions["intent"].to_numpy()
    E = model.item_embeddings().detach()  # (V, d)
    intent_hit = {"long": [], "short": []}
    taste_mass = {"long": [], "short": []}
    for u in np.flatnonzero(split.test >= 0):
        items, ts = inter.item[inter.offsets[u]:split.test[u]], inter.ts[inter.offsets[u]:split.test[u]]
        codes = segment_starts(ts, model.config.gap_ms, model.config.max_segment)
        dts = np.where(codes == Boundary.SESSION, 0.0, np.diff(ts, prepend=ts[0]) / 1000.0)  # as in training
        first = np.flatnonzero(codes)[-1]
        if first == 0:
            continue  # no long-term input
        with torch.no_grad():
            hist = torch.from_numpy(items[None, :first])  # (1, L)
            zeros = torch.zeros(hist.shape)
            long = model.long_term(SeqBatch(torch.tensor([u]), hist, zeros, zeros.bool(), zeros.long()))[0]
            state = model.short_encoder.init_state(1)
            for item, dt in zip(items[first:], dts[first:]):
                state = model.short_encoder.step(state, torch.tensor([int(item)]), torch.tensor([dt], dtype=torch.float32))
            short = model.short_vector(state)[0]
        user_id = inter.users.raw_of(int(u))
        taste = world.truth.taste.loc[user_id].to_numpy()
        intent = intents[session_of[(user_id, inter.items.raw_of(int(items[-1])))]]
        for name, vec in (("long", long), ("short", short)):
            scores = (E @ vec).numpy()
            scores[0], scores[items] = -np.inf, -np.inf
            top = np.argsort(-scores)[:10]
            intent_hit[name].append(np.mean(cluster[top] == intent))
            taste_mass[name].append(np.mean(taste[cluster[top]]))
    assert len(intent_hit["long"]) > 100
    assert np.mean(intent_hit["short"]) > np.mean(intent_hit["long"]) + 0.2, intent_hit
    assert np.mean(taste_mass["long"]) > np.mean(taste_mass["short"]) + 0.05, taste_mass


class Killed(Exception):
    pass


def test_a_run_cut_off_mid_epoch_resumes_to_the_same_result(inter, tmp_path, monkeypatch):
    import slsrec.train as train_module

    cfg = TrainConfig(dataset="synthetic-test", model="slsrec", epochs=3, patience=3, max_len=20,
                      model_options={"d": 8}, **FAST)
    steps, real_step = [], train_module.train_step

    def counted(*args):
        steps.append(1)
        if kill_at and len(steps) == kill_at:
            raise Killed  # what a kill -9 half-way through epoch 2 leaves behind
        return real_step(*args)

    monkeypatch.setattr(train_module, "train_step", counted)
    kill_at = None
    whole = train(cfg, tmp_path / "whole", inter=inter, progress=False)
    kill_at, per_epoch = len(steps) // 3 * 3 // 2, len(steps) // 3
    steps.clear()
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", inter=inter, progress=False)
    assert (tmp_path / "cut" / "progress").is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    steps.clear()
    kill_at = None
    resumed = train(cfg, tmp_path / "cut", inter=inter, progress=False)

    assert len(steps) == 2 * per_epoch  # epochs 2 and 3 only
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert resumed.metrics["test"] == whole.metrics["test"]
    assert not (tmp_path / "cut" / "progress").exists()  # a finished run keeps only its files


@pytest.mark.timeout(300)
def test_ml100k_quick_check_trains_on_every_event_and_reports_both_protocols():
    """The quick real-data check: a short SLSRec run on MovieLens-100K (read from the installed package)."""
    cfg = TrainConfig(dataset="ml-100k", model="slsrec", epochs=2, patience=2, max_len=50, threads=1)
    res = train(cfg, progress=False)
    pop = train(TrainConfig(dataset="ml-100k", model="pop"), progress=False)
    assert res.metrics["targets_per_epoch"] == 97_171  # every training event of ML-100K, once per epoch
    assert res.metrics["precision"] == "fp32"  # the measured CPU choice
    masked, strict = res.metrics["test"]["masked"], res.metrics["test"]["strict"]
    assert masked["NDCG@10"] > 1.5 * pop.metrics["test"]["masked"]["NDCG@10"]
    assert strict["NDCG@10"] < masked["NDCG@10"]  # the history competes for the top slots

"""The demo's shipped drifted clickstream: what its documented generator makes, and really drifted."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from slsrec import synthetic
from slsrec.data import read_clickstream
from slsrec.demo import DRIFT_CLICKS
from slsrec.synthetic import drift_sample

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_drift_sample_is_what_the_generator_produces_now():
    sample = drift_sample()
    assert (ROOT / DRIFT_CLICKS).read_text(encoding="utf-8") == synthetic.sample_jsonl(sample), (
        f"regenerate with: python -m slsrec.synthetic --drift-sample {DRIFT_CLICKS}")
    pd.testing.assert_frame_equal(read_clickstream(ROOT / DRIFT_CLICKS), sample)
    assert 4000 <= len(sample) <= 5000 and sample["user_id"].nunique() >= 100


def test_drift_sample_users_have_new_tastes_and_are_not_in_the_first_sample():
    sample = drift_sample()
    assert not set(sample["user_id"]) & set(synthetic.live_sample()["user_id"])
    world = synthetic.default_world()
    history = world.events[world.events["timestamp"] < synthetic.default_cut_ms(world.events)]
    assert set(sample["user_id"]) <= set(history["user_id"])  # known users: the demo model has their history
    cluster = world.truth.item_cluster
    # Each user's clicks follow the new taste, not the one the demo model learnt (the default world's).
    old = world.truth.taste.to_numpy()
    users = world.truth.taste.index
    shares = pd.crosstab(sample["user_id"], cluster[sample["item_id"]].to_numpy(), normalize="index")
    shares = shares.reindex(columns=range(old.shape[1]), fill_value=0.0)
    overlap_with_old = (shares.to_numpy() * old[users.get_indexer(shares.index)]).sum(axis=1).mean()
    before = world.events[world.events["user_id"].isin(sample["user_id"])]
    shares_before = pd.crosstab(before["user_id"], cluster[before["item_id"]].to_numpy(), normalize="index")
    shares_before = shares_before.reindex(columns=range(old.shape[1]), fill_value=0.0)
    overlap_before = (shares_before.to_numpy() * old[users.get_indexer(shares_before.index)]).sum(axis=1).mean()
    assert overlap_with_old < 0.7 * overlap_before

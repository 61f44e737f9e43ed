from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slsrec import synthetic
from slsrec.data import read_clickstream
from slsrec.sessions import Boundary, segment_starts
from slsrec.synthetic import DAY_MS, HOUR_MS, MINUTE_MS, WorldConfig, generate

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "clicks.sample.jsonl"
SMALL = WorldConfig(n_users=300, n_items=400, n_clusters=8, seed=3)


@pytest.fixture(scope="module")
def world():
    return generate(SMALL)


def test_same_seed_same_world_other_seed_other_world(world):
    pd.testing.assert_frame_equal(generate(SMALL).events, world.events)
    assert not generate(WorldConfig(n_users=300, n_items=400, n_clusters=8, seed=4)).events.equals(world.events)


def test_session_items_mostly_come_from_the_intent(world):
    t = world.truth
    in_intent = t.item_cluster[world.events["item_id"]].to_numpy() == t.sessions["intent"].to_numpy()[t.event_session]
    assert in_intent.mean() > SMALL.p_intent  # p_intent, plus taste draws that hit the intent


def test_intent_often_differs_from_the_top_taste(world):
    t = world.truth
    top = t.taste.to_numpy().argmax(axis=1)[t.taste.index.get_indexer(t.sessions["user_id"])]
    differs = (t.sessions["intent"].to_numpy() != top).mean()
    assert 0.4 < differs < 0.95


def test_long_term_taste_is_visible_in_a_users_clusters(world):
    # Outside their intent, a user's items follow the taste: the user's most frequent cluster
    # is usually the top of the taste mixture.
    t = world.truth
    ev = world.events.assign(cluster=t.item_cluster[world.events["item_id"]].to_numpy())
    most = ev.groupby("user_id")["cluster"].agg(lambda c: c.value_counts().idxmax())
    top = t.taste.loc[most.index].to_numpy().argmax(axis=1)
    assert (most.to_numpy() == top).mean() > 0.4  # chance would be about 1/8


def test_thirty_minute_rule_recovers_the_planted_sessions(world):
    ev, t = world.events, world.truth
    for user, rows in ev.groupby("user_id", sort=False).indices.items():
        codes = segment_starts(ev["timestamp"].to_numpy()[rows], 30 * MINUTE_MS, max_segment=10**9)
        planted = t.event_session[rows]
        np.testing.assert_array_equal(codes == Boundary.SESSION, np.r_[True, np.diff(planted) != 0])


def test_timing_event_types_and_no_repeats(world):
    ev = world.events.sort_values(["user_id", "timestamp"], kind="stable")
    same_user = ev["user_id"].to_numpy()[1:] == ev["user_id"].to_numpy()[:-1]
    gaps = np.diff(ev["timestamp"].to_numpy())[same_user]
    assert gaps.min() >= 0 and not ((gaps > 20 * MINUTE_MS) & (gaps < HOUR_MS)).any()
    assert np.median(gaps[gaps < HOUR_MS]) < 2 * MINUTE_MS  # seconds to minutes within a session
    assert HOUR_MS < np.median(gaps[gaps >= HOUR_MS]) < 3 * DAY_MS  # hours to days between sessions
    years = pd.to_datetime(ev["timestamp"], unit="ms").dt.year
    assert years.between(2024, 2026).all()
    share = ev["event_type"].value_counts(normalize=True)
    assert list(share.index) == list(synthetic.EVENT_TYPES) and share["view"] > 0.6 and share["purchase"] < 0.06
    assert not ev.duplicated(["user_id", "item_id"]).any()


def test_taste_shift_changes_only_what_comes_after_it(world):
    shift = int(np.median(world.events["timestamp"]))
    config = WorldConfig(n_users=300, n_items=400, n_clusters=8, seed=3, shift_at_ms=shift)
    shifted = generate(config)
    early = [w.events[w.events["timestamp"] < shift].reset_index(drop=True) for w in (shifted, world)]
    pd.testing.assert_frame_equal(*early)
    s, t = shifted.truth.sessions, shifted.truth
    assert (s["shifted"] == (s["start_ms"] >= shift)).all()
    # After the shift, intents drawn from the taste follow the new mixture, not the old one.
    after = s[s["shifted"]]
    new = t.taste_after.loc[after["user_id"]].to_numpy()[np.arange(len(after)), after["intent"]]
    old = t.taste.loc[after["user_id"]].to_numpy()[np.arange(len(after)), after["intent"]]
    assert new.mean() > 2 * old.mean()


def test_default_world_splits_into_training_and_live_parts():
    train, live = synthetic.default_split()
    world = synthetic.default_world()
    assert len(train) + len(live) == len(world.events)
    assert train["timestamp"].max() < live["timestamp"].min()
    assert world.config == synthetic.DEFAULT and world.events["user_id"].nunique() == synthetic.DEFAULT.n_users


def test_shipped_sample_is_what_the_generator_produces_now():
    sample = synthetic.live_sample()
    assert SAMPLE.read_text(encoding="utf-8") == synthetic.sample_jsonl(sample), (
        "regenerate with: python -m slsrec.synthetic --sample data/clicks.sample.jsonl")
    assert SAMPLE.stat().st_size < 1_000_000 and len(sample) <= 5000 and sample["user_id"].nunique() >= 100
    pd.testing.assert_frame_equal(read_clickstream(SAMPLE), sample)

"""Drift: online quality, golden alarm indices on seeded streams, and a taste shift in the synthetic world.

Run as a script to measure detection delay and false alarms over several seeds (docs/benchmarks.md)::

    .venv/bin/python tests/test_drift.py
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import numpy as np
import pandas as pd
import pytest
from river.drift import ADWIN, PageHinkley

from schemas.drift import DriftAlert
from slsrec.drift import DriftMonitor, OnlineQuality, default_detectors
from slsrec.synthetic import WorldConfig, generate

K = 10
DELAY_BOUND = 2500  # events of the whole stream from the first shifted event to the alert


# --- online quality -------------------------------------------------------------------------------


def test_online_quality_scores_against_the_previous_list_of_the_same_user():
    q = OnlineQuality(k=3)
    assert q.update("u1", "a", ["x", "y", "z"]) is None
    assert q.update("u2", "x", ["a"]) is None  # u1's list says nothing about u2
    assert q.update("u1", "x", ["b"]) == (True, 1.0)  # rank 0
    assert q.update("u1", "c", ["q", "r", "s", "c"]) == (False, 0.0)  # b was the list
    assert q.update("u1", "c", []) == (False, 0.0)  # c was 4th: beyond k=3
    hit, ndcg = q.update("u2", "a", [])
    assert hit and ndcg == 1.0
    assert (q.n, q.hr) == (4, 0.5)
    assert q.ndcg == pytest.approx(0.5)


def test_online_quality_refuses_k_zero():
    with pytest.raises(ValueError, match="k must be at least 1"):
        OnlineQuality(k=0)


# --- the monitor ----------------------------------------------------------------------------------


def alarms(monitor: DriftMonitor, signal: str, values) -> list[tuple[int, DriftAlert]]:
    out = []
    for i, x in enumerate(values):
        out += [(i, a) for a in monitor.update({signal: x}, ts=1_000 * i, model_version="v1")]
    return out


def test_golden_cold_start_rate_jump():
    """The cold-start rate goes from 5% to 30% at event 2000 (a wave of new users)."""
    rng = np.random.default_rng(0)
    stream = np.r_[rng.random(2000) < 0.05, rng.random(2000) < 0.30]
    got = alarms(DriftMonitor(worker_id="w3"), "cold_start", stream)
    assert [i for i, _ in got] == [2047]
    a = got[0][1]
    assert (a.signal, a.detector, a.worker_id, a.ts, a.model_version) == ("cold_start", "ADWIN", "w3", 2_047_000, "v1")
    assert a.n_seen == 2048 and a.window == 50
    assert a.mean_before == pytest.approx(0.05, abs=0.01) and a.mean_after > 0.2
    assert a.params == ADWIN(delta=0.002)._get_params()


def test_golden_alpha_shift():
    """The fusion gate leans towards the short term (mean 0.6 -> 0.45) at event 1500."""
    rng = np.random.default_rng(0)
    stream = np.r_[rng.beta(6, 4, 1500), rng.beta(4.5, 5.5, 1500)]  # means 0.6 and 0.45, sd ~0.15
    got = alarms(DriftMonitor(), "alpha", stream)
    assert [i for i, _ in got] == [1558]
    assert got[0][1].detector == "PageHinkley"
    assert got[0][1].mean_before == pytest.approx(0.6, abs=0.02)
    assert got[0][1].mean_after == pytest.approx(0.45, abs=0.05)


@pytest.mark.parametrize("seed", range(3))
def test_stationary_signals_raise_nothing(seed):
    rng = np.random.default_rng(seed)
    n = 20_000
    monitor = DriftMonitor()
    signals = {"hit": rng.random(n) < 0.1, "alpha": rng.beta(6, 4, n),
               "cold_start": rng.random(n) < 0.05, "unknown_item": rng.random(n) < 0.01}
    for i in range(n):
        assert monitor.update({name: values[i] for name, values in signals.items()}, ts=0) == []


def test_missing_values_are_skipped_and_unknown_signals_refused():
    monitor = DriftMonitor(detectors={"hit": ADWIN()})
    assert monitor.update({"hit": None}, ts=0) == []
    with pytest.raises(ValueError, match=r"no detector for signal\(s\) \['alpha'\]"):
        monitor.update({"alpha": 0.5}, ts=0)


def test_nan_is_refused():
    with pytest.raises(ValueError, match="signal 'alpha' is NaN"):
        DriftMonitor().update({"alpha": float("nan")}, ts=0)


def test_a_restored_monitor_continues_where_it_stopped():
    """The flow's state snapshots pickle the monitor; a restored one raises the same alerts."""
    rng = np.random.default_rng(2)
    stream = np.r_[rng.random(1500) < 0.4, rng.random(1500) < 0.1]
    whole = [i for i, _ in alarms(DriftMonitor(), "hit", stream)]
    first = DriftMonitor()
    assert alarms(first, "hit", stream[:1200]) == []
    restored = pickle.loads(pickle.dumps(first))
    assert [1200 + i for i, _ in alarms(restored, "hit", stream[1200:])] == whole != []


def test_monitors_do_not_share_state_with_their_prototypes():
    proto = {"hit": ADWIN()}
    a, b = DriftMonitor(detectors=proto), DriftMonitor(detectors=proto)
    rng = np.random.default_rng(1)
    stream = np.r_[rng.random(1000) < 0.5, rng.random(1000) < 0.05]
    first = [i for i, _ in alarms(a, "hit", stream)]
    assert len(first) == 1
    assert proto["hit"].width == 0  # the prototype was never fed
    assert [i for i, _ in alarms(b, "hit", stream)] == first  # nor did a's stream reach b


def test_defaults_are_fresh_each_call():
    assert default_detectors()["hit"] is not default_detectors()["hit"]


# --- a taste shift in the synthetic world -----------------------------------------------------------


def taste_shift_stream(seed: int, shift: bool) -> tuple[pd.DataFrame, int | None]:
    """The live part of a synthetic world, with the online hit of a recommender frozen before it.

    The world keeps its users active all along (30 sessions each, all starting within 2 days), so
    the population, and with it the hit rate, is steady unless tastes shift. The timeline is cut at
    quantiles of the stationary world's event times (the same seed draws the same times with or
    without a shift): the recommender learns from the first 30%, the live stream runs from there to
    80%, and tastes shift at 55%.

    The recommender is the long-term half of the model, frozen: each user's most frequent cluster
    before the cut, its items ranked by popularity before the cut, minus what the user has met.

    Returns the live events with a ``hit`` column (NaN at a user's first event) and the index of the
    first live event of a shifted session (``None`` without a shift).
    """
    config = WorldConfig(seed=seed, n_users=300, n_items=3000, mean_sessions=30, spread_days=2.0)
    t = generate(config).events["timestamp"]
    cut, end, shift_at = (int(t.quantile(f)) for f in (0.3, 0.8, 0.55))
    world = generate(dataclasses.replace(config, shift_at_ms=shift_at if shift else None))
    ev, truth = world.events, world.truth
    shifted = truth.sessions["shifted"].to_numpy()[truth.event_session]

    train, live_mask = ev[ev["timestamp"] < cut], (ev["timestamp"] >= cut) & (ev["timestamp"] < end)
    live = ev[live_mask].reset_index(drop=True)
    popular = train["item_id"].value_counts().index  # most popular first
    by_cluster = pd.Series(popular).groupby(truth.item_cluster[popular].to_numpy()).agg(list)
    top_cluster = train.groupby("user_id")["item_id"].agg(lambda s: truth.item_cluster[s].value_counts().index[0])
    seen = train.groupby("user_id")["item_id"].agg(set).to_dict()

    quality, hits = OnlineQuality(k=K), []
    for user, item in zip(live["user_id"], live["item_id"]):
        met = seen.setdefault(user, set())
        met.add(item)
        candidates = by_cluster[top_cluster[user]] if user in top_cluster else popular
        q = quality.update(user, item, list(itertools.islice((i for i in candidates if i not in met), K)))
        hits.append(np.nan if q is None else q.hit)
    live["hit"] = hits
    first_shifted = np.flatnonzero(shifted[live_mask.to_numpy()])
    return live, (int(first_shifted[0]) if len(first_shifted) else None)


def alarm_indices(live: pd.DataFrame, monitor: DriftMonitor) -> list[int]:
    """Indices of the live events at which the monitor raised a ``hit`` alert."""
    out = []
    for i, (hit, ts) in enumerate(zip(live["hit"], live["timestamp"])):
        if monitor.update({"hit": None if np.isnan(hit) else hit}, ts=int(ts)):
            out.append(i)
    return out


@pytest.fixture(scope="module")
def streams():
    """(shifted, first shifted index, stationary), cut to the same length (dropped repeats differ)."""
    shifted, first = taste_shift_stream(seed=0, shift=True)
    stationary, _ = taste_shift_stream(seed=0, shift=False)
    n = min(len(shifted), len(stationary))
    return shifted.iloc[:n], first, stationary.iloc[:n]


def test_taste_shift_is_detected_soon_after_it(streams):
    live, first_shifted, _ = streams
    got = alarm_indices(live, DriftMonitor())
    assert len(got) >= 1
    assert got[0] >= first_shifted, f"alert at {got[0]} before the shift at {first_shifted}"
    assert got[0] - first_shifted <= DELAY_BOUND


def test_stationary_world_of_the_same_length_raises_nothing(streams):
    shifted, _, stationary = streams
    assert len(stationary) == len(shifted) > 20_000
    assert alarm_indices(stationary, DriftMonitor()) == []


# --- measurement (docs/benchmarks.md) ----------------------------------------------------------------


def measure(seeds=range(10), deltas=(0.02, 0.002, 0.0002)) -> pd.DataFrame:
    """Detection delay and false alarms of ADWIN on the online hit stream, per seed and delta."""
    rows = []
    for seed in seeds:
        shifted, first = taste_shift_stream(seed, shift=True)
        stationary, _ = taste_shift_stream(seed, shift=False)
        n = min(len(shifted), len(stationary))
        shifted, stationary = shifted.iloc[:n], stationary.iloc[:n]
        for delta in deltas:
            got = alarm_indices(shifted, DriftMonitor(detectors={"hit": ADWIN(delta=delta)}))
            after = [i for i in got if i >= first]
            rows.append({
                "seed": seed, "delta": delta, "events": len(shifted), "shift_at": first,
                "hr_before": shifted["hit"].iloc[:first].mean(), "hr_after": shifted["hit"].iloc[first:].mean(),
                "delay": after[0] - first if after else None,
                "false_before_shift": len(got) - len(after),
                "false_stationary": len(alarm_indices(stationary, DriftMonitor(detectors={"hit": ADWIN(delta=delta)}))),
            })
    return pd.DataFrame(rows)


def measure_alpha(seeds=range(10), n_stationary=100_000, change_at=3000) -> pd.DataFrame:
    """Page-Hinkley on a simulated gate (Beta, mean 0.6, sd 0.15): delay after a mean step, false alarms."""
    candidates = {
        "default (delta=0.02, threshold=10, alpha=1)": lambda: default_detectors()["alpha"],
        "delta=0.02, threshold=5, alpha=1": lambda: PageHinkley(min_instances=100, delta=0.02, threshold=5, alpha=1.0),
        "River's defaults with min_instances=100, threshold=10": lambda: PageHinkley(100, threshold=10),
    }
    rows = []
    for name, make in candidates.items():
        for seed in seeds:
            rng = np.random.default_rng(seed)
            row = {"detector": name, "seed": seed}
            stationary = rng.beta(6, 4, n_stationary)
            row["false_stationary"] = len(alarms(DriftMonitor(detectors={"alpha": make()}), "alpha", stationary))
            for label, (a, b) in {"down_0.15": (4.5, 5.5), "up_0.05": (6.5, 3.5)}.items():
                stream = np.r_[rng.beta(6, 4, change_at), rng.beta(a, b, change_at)]
                got = [i for i, _ in alarms(DriftMonitor(detectors={"alpha": make()}), "alpha", stream)]
                after = [i - change_at for i in got if i >= change_at]
                row[f"delay_{label}"] = after[0] if after else None
                row["false_stationary"] += len(got) - len(after)
            rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    pd.set_option("display.width", 200)
    table = measure()
    print(table.round(4).to_string(index=False))
    print(table.groupby("delta").agg(delay_median=("delay", "median"), delay_max=("delay", "max"),
                                     false_before_shift=("false_before_shift", "sum"),
                                     false_stationary=("false_stationary", "sum")).to_string())
    table = measure_alpha()
    print(table.groupby("detector", sort=False).agg(
        delay_down_median=("delay_down_0.15", "median"), delay_down_max=("delay_down_0.15", "max"),
        delay_up_median=("delay_up_0.05", "median"), delay_up_max=("delay_up_0.05", "max"),
        false_alarms=("false_stationary", "sum")).to_string())

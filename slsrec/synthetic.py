"""A seeded synthetic clickstream with planted long- and short-term structure.

Items belong to clusters. Each user has a stable long-term *taste*, a Dirichlet mixture over the
clusters concentrated on a few. Each session has a short-term *intent*, one cluster (drawn from the
taste half of the time, else uniformly, so it often differs from the user's top cluster). Within a
session most items come from the intent, the rest from the taste. Timing is realistic: seconds to
minutes between events of a session (never more than 20 minutes, so the 30-minute rule recovers the
planted sessions), hours to days between sessions. A user meets an item at most once, as in
MovieLens, so the full-ranking protocol (which ranks unseen items only) applies unchanged.

``shift_at_ms`` moves users' tastes at a point in time (drift tests): sessions starting at or after it
draw from a new taste.

The *default world* (:data:`DEFAULT`) is cut in time: :func:`default_split` gives the first 85% of
its events (``load_dataset('synthetic')``) and the rest, the live stream the demo replays.
``data/clicks.sample.jsonl`` is a trimmed live part, written by::

    python -m slsrec.synthetic --sample data/clicks.sample.jsonl

>>> w = generate(WorldConfig(n_users=50, n_items=100, n_clusters=5, seed=1))
>>> list(w.events.columns)
['user_id', 'item_id', 'timestamp', 'event_type']
>>> bool(w.events["timestamp"].is_monotonic_increasing)
True
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
CUT_FRACTION = 0.85  # the default world's training part: the first 85% of its events in time


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_users: int = 2000
    n_items: int = 1000
    n_clusters: int = 20
    taste_concentration: float = 0.15  # Dirichlet alpha: small puts a user's taste on a few clusters
    mean_sessions: float = 8.0  # per user (at least 2, so most users have a long-term history)
    mean_session_len: float = 6.0  # planted events per session (at least 2, geometric tail)
    p_intent: float = 0.8  # share of a session's items drawn from its intent cluster
    p_intent_from_taste: float = 0.5  # else the intent is uniform over clusters
    start_ms: int = 1_740_960_000_000  # 2025-03-03T00:00Z
    spread_days: float = 60.0  # users' first sessions are spread over this many days
    gap_median_ms: float = DAY_MS  # between sessions (log-normal), clipped to [1 h, 14 d]
    dt_median_ms: float = 30_000  # between events of a session (log-normal), clipped to [1 s, 20 min]
    event_probs: tuple[float, ...] = (0.70, 0.20, 0.07, 0.03)  # view, click, add_to_cart, purchase
    shift_at_ms: int | None = None  # sessions starting from here use a new taste (drift)
    shift_fraction: float = 1.0  # share of users whose taste shifts


@dataclass(eq=False)
class Truth:
    """The planted structure.

    ``item_cluster``: item_id -> cluster. ``taste`` / ``taste_after``: user_id x cluster mixture
    before / after the shift (``taste_after`` is None without a shift; unshifted users keep theirs).
    ``sessions``: one row per session with ``user_id, session`` (0-based index within the user),
    ``intent, shifted, start_ms, n_events``. ``event_session``: for each events row, its sessions row.
    """

    item_cluster: pd.Series
    taste: pd.DataFrame
    taste_after: pd.DataFrame | None
    sessions: pd.DataFrame
    event_session: np.ndarray


@dataclass(eq=False)
class World:
    events: pd.DataFrame  # user_id, item_id (str), timestamp (int64 ms), event_type (str); time order
    truth: Truth
    config: WorldConfig


def _ids(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}{i:0{len(str(n))}d}" for i in range(1, n + 1)])


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (N, K)."""
    u = rng.random(len(probs))
    return np.minimum((probs.cumsum(axis=1) < u[:, None]).sum(axis=1), probs.shape[1] - 1)


def _within_user_index(owner: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Position of each element within its owner's run (elements grouped by owner, runs in order)."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(len(owner)) - starts


def generate(config: WorldConfig = WorldConfig()) -> World:
    """Generate a world: events in time order plus the planted ground truth."""
    c, rng = config, np.random.default_rng(config.seed)
    K = c.n_clusters

    # Items: equal-sized clusters, log-normal popularity within a cluster. Sampling an item of
    # cluster k is a search for k + u in the per-cluster cumulative popularity laid end to end.
    item_cluster = rng.permutation(np.arange(c.n_items) % K)
    order = np.argsort(item_cluster, kind="stable")
    pop = rng.lognormal(0.0, 0.7, c.n_items)[order]
    cl = item_cluster[order]
    group_total = np.bincount(cl, weights=pop, minlength=K)
    key = np.cumsum(pop) - np.repeat(np.cumsum(group_total) - group_total, np.bincount(cl, minlength=K))
    key = cl + key / group_total[cl]
    key[np.r_[np.flatnonzero(np.diff(cl)), len(cl) - 1]] = np.unique(cl) + 1.0  # exact group ends

    def sample_items(clusters: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(key, clusters + rng.random(len(clusters)), side="right")]

    # Users: a taste, and for drift a second one.
    taste = rng.dirichlet(np.full(K, c.taste_concentration), size=c.n_users)
    shifts = rng.random(c.n_users) < c.shift_fraction
    taste_after = np.where(shifts[:, None], rng.dirichlet(np.full(K, c.taste_concentration), c.n_users), taste)

    # Sessions and timing.
    n_sess = 2 + rng.poisson(max(c.mean_sessions - 2, 0), c.n_users)
    s_user = np.repeat(np.arange(c.n_users), n_sess)
    s_len = np.minimum(1 + rng.geometric(1 / max(c.mean_session_len - 1, 1), len(s_user)), 60)
    e_sess = np.repeat(np.arange(len(s_user)), s_len)
    dts = np.clip(rng.lognormal(np.log(c.dt_median_ms), 1.0, len(e_sess)), 1000, 20 * MINUTE_MS).astype(np.int64)
    dts[np.cumsum(s_len) - s_len] = 0  # a session's first event
    duration = np.add.reduceat(dts, np.cumsum(s_len) - s_len)
    gap = np.clip(rng.lognormal(np.log(c.gap_median_ms), 1.0, len(s_user)), HOUR_MS, 14 * DAY_MS).astype(np.int64)
    advance = duration + gap  # from a session's start to the next one's
    first = np.cumsum(n_sess) - n_sess
    before = np.cumsum(advance) - advance  # exclusive running sum ...
    s_start = before - before[first][s_user]  # ... restarted for every user
    s_start += c.start_ms + (rng.random(c.n_users) * c.spread_days * DAY_MS).astype(np.int64)[s_user]
    s_shifted = np.zeros(len(s_user), bool) if c.shift_at_ms is None else (s_start >= c.shift_at_ms) & shifts[s_user]
    s_taste = np.where(s_shifted[:, None], taste_after[s_user], taste[s_user])  # (S, K)
    intent = np.where(rng.random(len(s_user)) < c.p_intent_from_taste,
                      _categorical(rng, s_taste), rng.integers(0, K, len(s_user)))

    # Events: the intent cluster with probability p_intent, else the session's taste.
    from_intent = rng.random(len(e_sess)) < c.p_intent
    cluster = np.where(from_intent, intent[e_sess], _categorical(rng, s_taste[e_sess]))
    item = sample_items(cluster)
    e_type = rng.choice(len(EVENT_TYPES), size=len(e_sess), p=np.asarray(c.event_probs) / sum(c.event_probs))

    # A user meets an item once: drop repeats, keeping each kept event's own delay, so sessions only
    # get shorter (their start times, hence the shift, are unchanged and gaps stay under 20 minutes).
    keep = ~pd.DataFrame({"u": s_user[e_sess], "i": item}).duplicated().to_numpy()
    e_sess, item, e_type, dts = e_sess[keep], item[keep], e_type[keep], dts[keep]
    kept_len = np.bincount(e_sess, minlength=len(s_user))
    dts[np.cumsum(kept_len)[kept_len > 0] - kept_len[kept_len > 0]] = 0
    ts = s_start[e_sess] + _cumsum_within(dts, e_sess)

    users, items = _ids("u", c.n_users), _ids("i", c.n_items)
    events = pd.DataFrame({"user_id": users[s_user[e_sess]], "item_id": items[item],
                           "timestamp": ts, "event_type": np.asarray(EVENT_TYPES)[e_type]})
    by_time = np.argsort(ts, kind="stable")
    events = events.iloc[by_time].reset_index(drop=True)

    # Sessions whose every item was a repeat vanish; renumber the rest.
    alive = kept_len > 0
    new_row = np.cumsum(alive) - 1
    sessions = pd.DataFrame({
        "user_id": users[s_user[alive]],
        "session": _within_user_index(s_user[alive], np.bincount(s_user[alive], minlength=c.n_users)),
        "intent": intent[alive], "shifted": s_shifted[alive], "start_ms": s_start[alive], "n_events": kept_len[alive],
    })
    clusters = pd.RangeIndex(K, name="cluster")
    truth = Truth(
        item_cluster=pd.Series(item_cluster, index=pd.Index(items, name="item_id"), name="cluster"),
        taste=pd.DataFrame(taste, index=pd.Index(users, name="user_id"), columns=clusters),
        taste_after=None if c.shift_at_ms is None else pd.DataFrame(taste_after, index=pd.Index(users, name="user_id"),
                                                                   columns=clusters),
        sessions=sessions,
        event_session=new_row[e_sess][by_time],
    )
    return World(events, truth, config)


def _cumsum_within(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Running sum of ``values`` restarted at every new ``group`` (groups contiguous)."""
    total = np.cumsum(values)
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    offset = np.repeat(total[starts] - values[starts], np.diff(np.r_[starts, len(values)]))
    return total - offset


DEFAULT = WorldConfig()


@functools.lru_cache(maxsize=1)
def default_world() -> World:
    """The default world (seed 0). Cached: treat its frames as read-only."""
    return generate(DEFAULT)


def default_cut_ms(events: pd.DataFrame, fraction: float = CUT_FRACTION) -> int:
    """The time before which ``fraction`` of ``events`` happened (a quantile, robust to the long tail)."""
    return int(np.quantile(events["timestamp"].to_numpy(), fraction))


def default_split() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training part, live part) of the default world, cut in time after :data:`CUT_FRACTION` of its events."""
    events = default_world().events
    before = events["timestamp"].to_numpy() < default_cut_ms(events)
    return events[before].reset_index(drop=True), events[~before].reset_index(drop=True)


def live_sample(max_users: int = 300, max_events: int = 5000, seed: int = 0) -> pd.DataFrame:
    """A small slice of the default world's live part: whole users, picked in seeded random order."""
    return _whole_users(default_split()[1], max_events, seed, max_users=max_users)


DRIFT_P_INTENT = 0.4  # after the shift, sessions follow one intent less (0.8 before)


def drift_sample(max_events: int = 5000, seed: int = 1) -> pd.DataFrame:
    """The default world's live part, changed: every user's taste is redrawn at the cut and sessions
    stray more from their intent (:data:`DRIFT_P_INTENT`); whole users who have a history before the
    cut (so none is a cold start) and are not in :func:`live_sample` (so the two replays do not
    interleave). Same seed and catalogue, so items, clusters and the users' old tastes are the
    default world's, which a model trained on ``load_dataset("synthetic")`` learnt.
    """
    events = default_world().events
    cut = default_cut_ms(events)
    shifted = generate(replace(DEFAULT, shift_at_ms=cut, p_intent=DRIFT_P_INTENT)).events
    live = shifted[shifted["timestamp"] >= cut]
    live = live[live["user_id"].isin(events.loc[events["timestamp"] < cut, "user_id"])]
    return _whole_users(live, max_events, seed, exclude=set(live_sample()["user_id"]))


def _whole_users(live: pd.DataFrame, max_events: int, seed: int, max_users: int | None = None,
                 exclude: set = frozenset()) -> pd.DataFrame:
    """Whole users of ``live`` in seeded random order until ``max_events`` (or ``max_users``) is reached."""
    counts = live["user_id"].value_counts()
    chosen, total = [], 0
    for u in np.random.default_rng(seed).permutation(np.sort(live["user_id"].unique())):
        if u in exclude:
            continue
        if len(chosen) == max_users or total + counts[u] > max_events:
            break
        chosen.append(u)
        total += counts[u]
    return live[live["user_id"].isin(chosen)].reset_index(drop=True)


def sample_jsonl(events: pd.DataFrame) -> str:
    """JSON Lines text of ``events`` (fields user_id, item_id, timestamp, event_type)."""
    return "".join(json.dumps({"user_id": r.user_id, "item_id": r.item_id, "timestamp": int(r.timestamp),
                               "event_type": r.event_type}) + "\n" for r in events.itertuples(index=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slsrec.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, help="write the live sample (JSON Lines) here")
    parser.add_argument("--drift-sample", type=Path, help="write the drifted live sample (JSON Lines) here")
    args = parser.parse_args(argv)
    if not (args.sample or args.drift_sample):
        parser.error("give --sample PATH and/or --drift-sample PATH")
    for path, make in ((args.sample, live_sample), (args.drift_sample, drift_sample)):
        if path:
            sample = make()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(sample_jsonl(sample), encoding="utf-8")
            print(f"wrote {path}: {len(sample)} events, {sample['user_id'].nunique()} users")


if __name__ == "__main__":
    main()

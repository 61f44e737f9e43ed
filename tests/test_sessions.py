import numpy as np
import pandas as pd
import pytest
import torch

from slsrec.data import Interactions, load_dataset
from slsrec.sessions import (
    Boundary,
    boundary,
    eval_batches,
    leave_one_out,
    segment_starts,
    split_report,
    train_batches,
)

GAP = 30 * 60 * 1000
MIN = 60_000


def frame(rows):
    return Interactions.from_frame(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))


@pytest.mark.parametrize(
    ("prev_ts", "ts", "seg_len", "expected"),
    [
        (None, 10, 0, Boundary.SESSION),  # first event
        (0, GAP + 1, 3, Boundary.SESSION),  # gap just over the limit
        (0, GAP, 3, Boundary.NONE),  # gap exactly at the limit stays in the session
        (0, 1, 4, Boundary.SEGMENT),  # segment full (S = 4)
        (0, 1, 3, Boundary.NONE),
        (0, GAP + 1, 4, Boundary.SESSION),  # a gap wins over a full segment
        (5_000, 1_000, 1, Boundary.NONE),  # late (out-of-order) event joins the session
    ],
)
def test_boundary_rule(prev_ts, ts, seg_len, expected):
    assert boundary(prev_ts, ts, seg_len, GAP, 4) is expected


def test_without_a_gap_rule_only_fixed_windows_remain():
    codes = segment_starts([0, 10 * GAP, 20 * GAP, 30 * GAP, 40 * GAP], gap_ms=None, max_segment=2)
    assert [Boundary(c).name for c in codes] == ["SESSION", "NONE", "SEGMENT", "NONE", "SEGMENT"]


def test_segment_starts_matches_the_rule_on_random_sequences():
    rng = np.random.default_rng(0)
    S = 3
    for _ in range(50):
        gaps = rng.choice([0, MIN, GAP, GAP + 1, 10 * GAP], size=rng.integers(1, 30))
        ts = np.cumsum(gaps)
        codes = segment_starts(ts, GAP, S)
        assert codes[0] == Boundary.SESSION
        new_session = np.r_[True, np.diff(ts) > GAP]
        np.testing.assert_array_equal(codes == Boundary.SESSION, new_session)
        # Within a session, segments are consecutive runs of exactly S items (the last may be shorter).
        for start, end in zip(np.flatnonzero(new_session), np.r_[np.flatnonzero(new_session)[1:], len(ts)]):
            expected = np.zeros(end - start, bool)
            expected[::S] = True
            np.testing.assert_array_equal(codes[start:end] != Boundary.NONE, expected)


@pytest.fixture
def small():
    # user a: 6 events, two sessions (the second after 2 h); b: 2 events (training only); c: 3 events.
    h = 60 * MIN
    rows = [("a", f"i{k}", t) for k, t in enumerate([0, MIN, 2 * MIN, 2 * h, 2 * h + MIN, 2 * h + 2 * MIN], 1)]
    rows += [("b", "i1", 0), ("b", "i2", 10)] + [("c", "i3", 0), ("c", "i4", 1000), ("c", "i5", 3000)]
    return leave_one_out(frame(rows))


def test_leave_one_out_positions(small):
    inter = small.inter
    a, b, c = (inter.users.index(u) for u in "abc")
    assert inter.items.raw_of(inter.item[small.test[a]]) == "i6"
    assert inter.items.raw_of(inter.item[small.valid[a]]) == "i5"
    assert small.valid[b] == -1 and small.test[b] == -1
    train = small.train
    assert [inter.items.raw_of(i) for i in train.item[train.user == a]] == ["i1", "i2", "i3", "i4"]
    assert (train.user == b).sum() == 2 and (train.user == c).sum() == 1


def test_batches_are_left_padded_with_targets_and_segment_starts(small):
    kw = dict(max_len=5, gap_ms=GAP, max_segment=2)
    inter = small.inter
    a = inter.users.index("a")
    idx = {inter.items.raw_of(i): i for i in range(1, inter.n_items + 1)}

    (train,) = train_batches(small, batch_size=10, rng=np.random.default_rng(0), **kw)
    row = train.user.tolist().index(a)
    # Training sequence of a is i1..i4: inputs i1..i3, targets i2..i4, left-padded to 5.
    assert train.items[row].tolist() == [0, 0, idx["i1"], idx["i2"], idx["i3"]]
    assert train.targets[row].tolist() == [0, 0, idx["i2"], idx["i3"], idx["i4"]]
    assert train.dts[row].tolist() == [0, 0, 0, 60, 60]
    assert train.seg_start[row].tolist() == [False, False, True, False, True]  # S=2 cuts after 2 items
    # c has a single training event: no input position, so no row.
    assert inter.users.index("c") not in train.user.tolist()

    (test,) = eval_batches(small, "test", batch_size=10, **kw)
    row = test.user.tolist().index(a)
    assert test.items[row].tolist() == [idx[f"i{k}"] for k in range(1, 6)]  # i1..i5, target i6
    assert test.targets[row].tolist() == [0, 0, 0, 0, idx["i6"]]
    # i4 starts the second session: a new segment, and dt 0 (the stream forgets the gap).
    assert test.seg_start[row].tolist() == [True, False, True, True, False]
    assert test.dts[row].tolist() == [0, 60, 60, 0, 60]
    assert sorted(test.user.tolist()) == sorted(inter.users.index(u) for u in "ac")


def test_truncation_keeps_the_latest_positions_and_marks_a_segment_start(small):
    (valid,) = eval_batches(small, "valid", batch_size=10, max_len=2, gap_ms=GAP, max_segment=10)
    inter = small.inter
    row = valid.user.tolist().index(inter.users.index("a"))
    assert [inter.items.raw_of(i) for i in valid.items[row].tolist()] == ["i3", "i4"]
    assert valid.seg_start[row].tolist() == [True, True]  # window start, then the new session


def test_no_target_leakage_on_movielens():
    split = leave_one_out(load_dataset("ml-100k"))
    inter = split.inter
    for which in ("valid", "test"):
        target_pos = getattr(split, which)
        for batch in eval_batches(split, which, batch_size=256, max_len=50, gap_ms=GAP, max_segment=20):
            assert (batch.targets[:, :-1] == 0).all()
            for u, items, target in zip(batch.user.tolist(), batch.items, batch.targets[:, -1].tolist()):
                p, start = target_pos[u], inter.offsets[u]
                assert target == inter.item[p]
                history = inter.item[max(start, p - 50):p]
                real = items[items != 0].numpy()
                np.testing.assert_array_equal(real, history)  # exactly the events before the target
    # Training never sees a validation or test target position.
    pos = np.arange(len(inter))
    train_mask = pos < split.train_end[inter.user]
    assert not train_mask[split.valid[split.valid >= 0]].any()
    assert not train_mask[split.test[split.test >= 0]].any()


def test_last_windows_cover_each_user_once_in_a_seeded_order():
    split = leave_one_out(load_dataset("ml-100k"))
    kw = dict(batch_size=100, max_len=20, gap_ms=GAP, max_segment=20, window="last")

    def order(seed):
        return torch.cat([b.user for b in train_batches(split, rng=np.random.default_rng(seed), **kw)])

    first, again, other = order(1), order(1), order(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(split.inter.n_users))
    batch = next(train_batches(split, rng=np.random.default_rng(1), **kw))
    assert batch.to("cpu").items.shape == (100, 20)
    assert ((batch.items == 0) == (batch.targets == 0)).all()  # every real input has a target


def test_all_windows_make_every_training_event_a_target_once_with_its_own_history():
    split = leave_one_out(load_dataset("ml-100k"))
    inter, T = split.inter, 20
    batch = next(train_batches(split, batch_size=10**6, max_len=T, gap_ms=GAP, max_segment=20,
                               rng=np.random.default_rng(0)))  # window="all", the default
    targets = []
    for u, items, tg in zip(batch.user.tolist(), batch.items.numpy(), batch.targets.numpy()):
        seq = inter.item[inter.offsets[u]:split.train_end[u]]  # the user's training events
        real = items[items != 0]
        at = next(k for k in range(len(seq) - len(real) + 1) if (seq[k:k + len(real)] == real).all())
        has = tg[items != 0] != 0
        # Each target is the event right after its input, and has at least T/2 events of context
        # unless the user has fewer before it.
        np.testing.assert_array_equal(tg[items != 0][has], seq[at + 1:at + 1 + len(real)][has])
        context = at + np.flatnonzero(has) + 1  # events up to and including the input
        assert (np.minimum(context, T // 2) <= np.flatnonzero(has) + 1).all()
        targets += [(u, at + 1 + i) for i in np.flatnonzero(has)]
    expected = [(u, i) for u in range(inter.n_users) for i in range(1, split.train_end[u] - inter.offsets[u])]
    assert sorted(targets) == expected  # every training event but each user's first, exactly once
    long_users = (split.train_end - inter.offsets[:-1] - 1 > T).sum()
    assert len(batch) > inter.n_users + long_users - 1  # long histories got more than one row


def test_random_windows_reach_older_history_and_never_a_held_out_target():
    split = leave_one_out(load_dataset("ml-100k"))
    inter, T = split.inter, 20
    kw = dict(batch_size=10_000, max_len=T, gap_ms=GAP, max_segment=20)

    def one_epoch(seed: int, window: str) -> torch.Tensor:  # (users, T) inputs, rows in user order
        batch = next(train_batches(split, rng=np.random.default_rng(seed), window=window, **kw))
        order = batch.user.argsort()
        for u, items, targets in zip(batch.user[order].tolist(), batch.items[order], batch.targets[order]):
            # A contiguous span of the user's TRAINING events, each input followed by its target.
            real, seq = items[items != 0].numpy(), inter.item[inter.offsets[u]:split.train_end[u]]
            at = next(k for k in range(len(seq) - len(real) + 1) if (seq[k:k + len(real)] == real).all())
            np.testing.assert_array_equal(targets[items != 0].numpy(), seq[at + 1:at + 1 + len(real)])
        return batch.items[order]

    last, first, second = one_epoch(1, "last"), one_epoch(1, "random"), one_epoch(2, "random")
    long_history = torch.from_numpy(split.train_end - inter.offsets[:-1] > 2 * T)
    assert (first[long_history] != last[long_history]).any(dim=1).float().mean() > 0.9  # older spans too
    assert not torch.equal(first, second)  # drawn anew every epoch


def test_split_report_hand_example():
    # One user, S=2: events at 0, 1, 2 min (session 1: segments [0,1],[2]), then 2 h later 2 events.
    h = 60 * MIN
    inter = frame([("a", f"i{k}", t) for k, t in enumerate([0, MIN, 2 * MIN, 2 * h, 2 * h + 1], 1)])
    r = split_report(inter, GAP, max_segment=2, max_long=3)
    assert r["sessions per user (mean)"] == 2
    assert r["prediction positions"] == 4
    # Positions 0,1 are in the first segment; 0,1,2 in the first session.
    assert r["empty long-term input, with overflow"] == 0.5
    assert r["empty long-term input, sessions only"] == 0.75
    assert r["long-term input length (mean, capped)"] == (0 + 0 + 2 + 3) / 4  # 3 at pos 3 (cap L=3)
    assert r["session length (median events)"] == 2.5


def test_movielens_needs_the_overflow_rule():
    r = split_report(load_dataset("ml-100k"), GAP, max_segment=20, max_long=200)
    assert r["user span days p50"] < 1  # users rate in one burst
    assert r["empty long-term input, sessions only"] > 0.5
    assert r["empty long-term input, with overflow"] < 0.25

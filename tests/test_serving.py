"""The serving math on plain lists: the stream's answers equal the offline model's, batched or not."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from schemas.events import DeadLetter, Recommendation, SessionClosed
from slsrec.data import Vocab
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.serving import Recommender, SessionTable, click, recommend_offline
from slsrec.sessions import SeqBatch
from slsrec.store import LongTerm

GAP_MS = 30 * 60 * 1000
T0 = 1_700_000_000_000
N_ITEMS, N_USERS = 40, 6


@pytest.fixture(scope="module")
def model() -> SLSRec:
    torch.manual_seed(7)
    m = SLSRec(SLSRecConfig(n_users=N_USERS, n_items=N_ITEMS, d=16, hidden=16, max_segment=5, long_len=8))
    # Random weights leave the gate near 0.5 and the item vectors spread out: a fair consistency test.
    return m.eval()


@pytest.fixture(scope="module")
def items() -> Vocab:
    return Vocab([f"i{k}" for k in range(1, N_ITEMS + 1)], padding=True)


def long_term_vector(model: SLSRec, items: Vocab, user: int, history: list[str]) -> LongTerm:
    """What `slsrec publish` writes for a user: the model's long-term state of the history."""
    idx = torch.tensor([[items.index(i) for i in history]])
    batch = SeqBatch(torch.tensor([user]), idx, torch.zeros(idx.shape), torch.zeros(idx.shape, dtype=torch.bool),
                     torch.zeros_like(idx))
    with torch.no_grad():
        state = model.long_state(batch)
    return LongTerm(state.mean[0].numpy().astype(np.float32), float(state.log_z[0]), int(state.n[0]))


def random_state(seed: int, d: int = 16) -> LongTerm:
    """A published state of arbitrary items: any mean, one log-normaliser, a few items."""
    return LongTerm(np.random.default_rng(seed).normal(size=d).astype(np.float32), 0.5, 5)


def make(model, items, vectors: dict[str, np.ndarray], **kw) -> Recommender:
    def lookup(users):
        return "v1", [vectors.get(u) for u in users]

    args = dict(model_version="m", gap_ms=GAP_MS, max_segment=model.config.max_segment, top_k=10)
    return Recommender(model, items, lookup, **{**args, **kw})


def rank(r: Recommendation) -> tuple[list[str], np.ndarray]:
    return [i.item_id for i in r.items], np.array([i.score for i in r.items])


@pytest.mark.parametrize("user", [0, 3])
def test_stream_equals_offline_forward(model, items, user):
    rng = np.random.default_rng(user)
    hist_items = [f"i{k}" for k in rng.integers(1, N_ITEMS + 1, 12)]
    hist = [(it, T0 + 60_000 * n) for n, it in enumerate(hist_items)]
    start = hist[-1][1] + 2 * GAP_MS  # the session opens after the gap
    session = [(f"i{k}", start + 7_000 * n + int(rng.integers(0, 5000))) for n, k in
               enumerate(rng.choice(np.arange(1, N_ITEMS + 1), 5, replace=False))]
    uid = f"u{user}"
    rec = make(model, items, {uid: long_term_vector(model, items, user, hist_items)})
    table = SessionTable()
    for n, (it, ts) in enumerate(session):
        (out,) = rec.process(table, [click(f"e{n}", uid, it, ts)])
        want_items, want_scores, want_alpha = recommend_offline(
            model, items, user, hist, session[: n + 1], gap_ms=GAP_MS, max_segment=model.config.max_segment)
        got_items, got_scores = rank(out)
        assert got_items == want_items
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-4)
        assert out.alpha == pytest.approx(want_alpha, abs=1e-4) and 0 < out.alpha < 1
        assert not out.cold_start and out.long_term_version == "v1"
        assert not set(got_items) & {it for it, _ in session[: n + 1]}  # the session's items are excluded


def test_cold_start_equals_offline_without_history(model, items):
    session = [("i3", T0), ("i9", T0 + 4_000), ("i1", T0 + 9_000)]
    rec = make(model, items, {})
    outs = rec.process(SessionTable(), [click(f"e{n}", "new-user", it, ts) for n, (it, ts) in enumerate(session)])
    want_items, want_scores, want_alpha = recommend_offline(
        model, items, 0, [], session, gap_ms=GAP_MS, max_segment=model.config.max_segment)
    assert rank(outs[-1])[0] == want_items
    np.testing.assert_allclose(rank(outs[-1])[1], want_scores, atol=1e-4)
    assert all(o.cold_start and o.long_term_version is None and o.alpha == 0.0 for o in outs)
    assert want_alpha == 0.0 and rec.stats.cold_starts == 3


def random_stream(n_events: int, n_users: int, seed: int) -> list:
    """Interleaved users, some unknown items, some long pauses (new sessions), some duplicates."""
    rng = np.random.default_rng(seed)
    t = {f"u{u}": T0 for u in range(n_users)}
    out = []
    for n in range(n_events):
        u = f"u{rng.integers(n_users)}"
        t[u] += int(rng.choice([1_000, 30_000, 3 * GAP_MS], p=[0.6, 0.3, 0.1]))
        item = f"i{rng.integers(1, N_ITEMS + 1)}" if rng.random() > 0.1 else f"brand-new-{n}"
        out.append(click(f"e{n}", u, item, t[u]))
        if rng.random() < 0.05:
            out.append(out[-1])  # the producer retried
    return out


def test_micro_batches_equal_event_by_event(model, items):
    stream = random_stream(300, 8, seed=1)
    vectors = {f"u{u}": random_state(u) for u in range(0, 8, 2)}
    one = make(model, items, vectors)
    t1 = SessionTable()
    expected = [o for c in stream for o in one.process(t1, [c])]
    many = make(model, items, vectors)
    t2 = SessionTable()
    got = [o for k in range(0, len(stream), 64) for o in many.process(t2, stream[k:k + 64])]

    assert [type(o) for o in got] == [type(o) for o in expected]
    for g, e in zip(got, expected):
        if isinstance(g, Recommendation):
            assert (g.event_id, rank(g)[0], g.cold_start, g.unknown_item) == (e.event_id, rank(e)[0], e.cold_start,
                                                                              e.unknown_item)
            np.testing.assert_allclose(rank(g)[1], rank(e)[1], atol=1e-5)
            assert g.alpha == pytest.approx(e.alpha, abs=1e-5)
        else:
            assert g.model_dump(exclude={"ts"}) == e.model_dump(exclude={"ts"})
    # Every event is answered exactly once: a recommendation or a dead letter.
    answered = sum(isinstance(o, (Recommendation, DeadLetter)) for o in got)
    assert answered == len(stream) == many.stats.events
    assert many.stats.duplicates == sum(isinstance(o, DeadLetter) for o in got) > 0
    assert t1.sessions.keys() == t2.sessions.keys()


def test_duplicate_is_dead_lettered_and_never_applied_twice(model, items):
    rec = make(model, items, {})
    a, b, c = click("e1", "u", "i1", T0), click("e2", "u", "i2", T0 + 1000), click("e3", "u", "i3", T0 + 2000)
    with_dup = rec.process(SessionTable(), [a, b, b, c])
    without = rec.process(SessionTable(), [a, b, c])
    assert isinstance(with_dup[2], DeadLetter) and with_dup[2].reason == "duplicate"
    assert with_dup[2].raw == b[1].raw and with_dup[2].topic == "clicks"
    assert rank(with_dup[3])[0] == rank(without[2])[0]
    np.testing.assert_allclose(rank(with_dup[3])[1], rank(without[2])[1], atol=1e-6)


def test_a_restored_snapshot_continues_the_sessions_exactly(model, items):
    """A restart resumes from a pickled table: same recommendations, duplicates still caught."""
    rec = make(model, items, {})
    first = [click(f"e{k}", u, f"i{k}", T0 + k * 1000) for k, u in enumerate("ababa", 1)]
    rest = [click("e3", "a", "i3", T0 + 9000), click("e6", "a", "i6", T0 + 10_000)]  # a duplicate, a new event
    live = SessionTable()
    rec.process(live, first)
    restored = pickle.loads(pickle.dumps(live))
    out_live, out_restored = rec.process(live, rest), rec.process(restored, rest)
    assert [type(o) for o in out_restored] == [DeadLetter, Recommendation]
    assert out_restored[0].reason == "duplicate"
    assert rank(out_restored[1])[0] == rank(out_live[1])[0]
    np.testing.assert_allclose(rank(out_restored[1])[1], rank(out_live[1])[1], atol=1e-6)
    assert restored.sessions["a"].events == live.sessions["a"].events


def test_unknown_item_is_kept_flagged_and_not_stepped(model, items):
    rec = make(model, items, {})
    table = SessionTable()
    first, unknown = rec.process(table, [click("e1", "u", "i5", T0), click("e2", "u", "sku-unseen", T0 + 500)])
    assert unknown.unknown_item and not first.unknown_item
    # A cold user's vector is its short-term state, which the unknown item did not move.
    assert rank(unknown)[0] == rank(first)[0]
    np.testing.assert_allclose(rank(unknown)[1], rank(first)[1], atol=1e-6)
    assert table.sessions["u"].seg_len == 1 and rec.stats.unknown_item_rate == 0.5
    (closed,) = rec.close_idle(table, wall_ms=rec.clock.wall_at_max_ms + GAP_MS + 1)
    assert [i.item_id for i in closed.items] == ["i5", "sku-unseen"]  # the retrain sees the new item


def test_gap_closes_the_session_and_drops_its_state(model, items):
    rec = make(model, items, {})
    table = SessionTable()
    rec.process(table, [click("e1", "a", "i1", T0), click("e2", "a", "i2", T0 + 1000), click("e3", "b", "i1", T0 + 2000)])
    # `a` comes back after the gap: its old session is closed first, and i1/i2 may be recommended again.
    closed, r = rec.process(table, [click("e4", "a", "i7", T0 + 1000 + GAP_MS + 1)])
    assert isinstance(closed, SessionClosed) and closed.reason == "gap"
    assert (closed.user_id, [i.item_id for i in closed.items], closed.start_ts, closed.end_ts) == (
        "a", ["i1", "i2"], T0, T0 + 1000)
    assert isinstance(r, Recommendation) and list(table.sessions["a"].seen) == [items.index("i7")]
    # `b` idles: the clock (newest event + wall time since) passes its gap and the sweep drops it.
    assert rec.close_idle(table, wall_ms=rec.clock.wall_at_max_ms) == []
    assert set(table.sessions) == {"a", "b"}
    (idle,) = rec.close_idle(table, wall_ms=rec.clock.wall_at_max_ms + 1000)
    assert idle.user_id == "b" and set(table.sessions) == {"a"}
    assert rec.stats.sessions_closed == 2


def test_segment_boundary_resets_the_short_term_state(model, items):
    s = model.config.max_segment
    rec = make(model, items, {})
    table = SessionTable()
    rec.process(table, [click(f"e{n}", "u", f"i{n + 1}", T0 + n * 1000) for n in range(s)])
    assert table.sessions["u"].seg_len == s
    rec.process(table, [click("next", "u", "i30", T0 + s * 1000)])
    assert table.sessions["u"].seg_len == 1 and len(table.sessions["u"].seen) == s + 1


class Versioned:
    """A long-term lookup with per-version vectors, switched as the Redis reader switches on poll()."""

    def __init__(self, vectors: dict[str, dict[str, np.ndarray]], version: str):
        self.vectors, self.version, self.next = vectors, version, None

    def __call__(self, users):
        return self.version, [self.vectors[self.version].get(u) for u in users]

    def poll(self):
        new, self.next = self.next, None
        if new is not None:
            self.version = new.version
        return new


def test_a_new_version_re_encodes_open_sessions_as_if_it_had_served_them_all_along(model, items):
    """The switch keeps session state: after it, answers equal a recommender that ran v2 from the start,
    also across a segment boundary (the closed segment folds into the long-term state) and for an item
    only v2 knows (its vocabulary grew)."""
    from slsrec.serving import Published

    torch.manual_seed(8)
    items2 = Vocab([f"i{k}" for k in range(1, N_ITEMS + 1)] + ["sku-new"], padding=True)
    model2 = SLSRec(SLSRecConfig(n_users=N_USERS, n_items=N_ITEMS + 1, d=16, hidden=16, max_segment=4,
                                 long_len=8)).eval()
    users = Vocab([f"u{u}" for u in range(N_USERS)], padding=False)  # u3 has no published state: it folds from empty
    vectors = {v: {f"u{u}": random_state(10 * k + u) for u in range(3)} for k, v in enumerate(("v1", "v2"))}
    stream = []
    for n in range(7):  # 7 events per user: 4 before the switch, 3 after; v2's segments hold 4 items
        for u in range(4):  # u3 is cold
            item = "sku-new" if (n, u) == (1, 0) else f"i{(5 * u + n) % N_ITEMS + 1}"
            stream.append(click(f"u{u}-{n}", f"u{u}", item, T0 + 10_000 * n + u))
    before, after = stream[:16], stream[16:]

    lookup = Versioned(vectors, "v1")
    rec = Recommender(model, items, lookup, "v1", GAP_MS, model.config.max_segment, versions=lookup.poll, users=users)
    table = SessionTable()
    old = rec.process(table, before)
    lookup.next = Published("v2", model2, items2, users)
    new = rec.process(table, after)

    reference = Recommender(model2, items2, Versioned(vectors, "v2"), "v2", GAP_MS, 4, users=users)
    want = reference.process(SessionTable(), stream)[16:]
    assert all(r.model_version == "v1" and r.long_term_version in ("v1", None) for r in old)
    assert all(r.model_version == "v2" and r.long_term_version in ("v2", None) for r in new)
    assert [r.long_term_version is None for r in new] == [r.user_id == "u3" for r in new]
    for g, w in zip(new, want):
        assert (g.event_id, rank(g)[0]) == (w.event_id, rank(w)[0])
        np.testing.assert_allclose(rank(g)[1], rank(w)[1], atol=1e-5)
        assert g.alpha == pytest.approx(w.alpha, abs=1e-5)
    assert rec.stats.switches == 1 and rec.stats.reencoded == 4
    assert {s.model_version for s in table.sessions.values()} == {"v2"}
    assert "sku-new" not in rank(new[0])[0]  # seen before the switch, excluded after it


# --- measurement (docs/benchmarks.md) ----------------------------------------------------------------


def measure_switch(sessions=(6_040, 20_000), events_per_session: int = 12, repeats: int = 3) -> None:
    """The stream's pause at a version switch: re-encoding every open session of a worker with the new
    model (the model itself loads in the background first). SLSRec of ML-1M size, random weights.
    Wall and CPU time: the CPU time does not depend on what else runs on the machine."""
    import gc
    import time

    from slsrec.serving import Published

    torch.set_num_threads(1)
    config = dict(n_users=6040, n_items=3706, d=64, hidden=64, max_segment=20)
    items = Vocab([f"i{k}" for k in range(1, 3707)], padding=True)
    old, new = SLSRec(SLSRecConfig(**config)), SLSRec(SLSRecConfig(**config))
    rng = np.random.default_rng(0)
    for n in sessions:
        pauses = []
        for _ in range(repeats):
            lookup = Versioned({"v1": {}, "v2": {}}, "v1")
            rec = Recommender(old, items, lookup, "v1", GAP_MS, 20, versions=lookup.poll)
            table = SessionTable()
            for k in range(events_per_session):
                rec.process(table, [click(f"u{u}-{k}", f"u{u}", f"i{rng.integers(1, 3707)}", T0 + 1000 * k + u)
                                    for u in range(n)])
            gc.collect()
            gc.freeze()  # as `slsrec serve` does: the collector does not walk the long-lived sessions
            cost = []
            for switch in (False, True):  # the same micro-batch of 512 users' next events, then after a switch
                lookup.next = Published("v2", new, items, None) if switch else None
                batch = [click(f"u{u}-{k}-{switch}", f"u{u}", f"i{rng.integers(1, 3707)}", T0 + 100_000 + u)
                         for u in range(512)]
                c0 = time.process_time()
                rec.process(table, batch)
                cost.append((time.process_time() - c0) * 1000)
            assert rec.stats.reencoded == 512
            pauses.append(cost)
            gc.unfreeze()
        plain, switched = min(p[0] for p in pauses), min(p[1] for p in pauses)
        print(f"{n:>6} open sessions x {events_per_session} events: a batch of 512 events costs {plain:.0f} ms CPU, "
              f"{switched:.0f} ms right after a switch (re-encoding its 512 users; best of {repeats}, 1 thread)")


if __name__ == "__main__":
    measure_switch()


def test_a_long_session_folds_its_closed_segment_into_the_long_term_state_as_forward_does(model, items):
    """Past a SEGMENT boundary the long-term input is the history plus the session's closed segment
    (within L = 8 items here, so the fold is exact)."""
    users = Vocab([f"u{u}" for u in range(N_USERS)], padding=False)
    hist_items = ["i3", "i17"]
    hist = [("i3", T0), ("i17", T0 + 60_000)]
    start = T0 + 3 * GAP_MS
    session = [(f"i{k}", start + 5_000 * n) for n, k in enumerate([5, 9, 11, 2, 30, 21, 7, 14])]  # S = 5: 2 segments
    rec = make(model, items, {"u2": long_term_vector(model, items, 2, hist_items)}, users=users)
    outs = rec.process(SessionTable(), [click(f"e{n}", "u2", it, ts) for n, (it, ts) in enumerate(session)])
    for n in (4, 5, 7):  # the last event of the first segment, the first and last of the second
        want_items, want_scores, want_alpha = recommend_offline(
            model, items, 2, hist, session[: n + 1], gap_ms=GAP_MS, max_segment=model.config.max_segment)
        assert rank(outs[n])[0] == want_items, n
        np.testing.assert_allclose(rank(outs[n])[1], want_scores, atol=1e-4)
        assert outs[n].alpha == pytest.approx(want_alpha, abs=1e-4)


def test_serving_never_imports_training():
    """The flow must start without the training code: no module of slsrec/serving/ imports it."""
    import ast
    from pathlib import Path

    import slsrec.serving

    training = {"slsrec.train", "slsrec.retrain", "slsrec.benchmark", "slsrec.tune"}
    files = sorted(Path(slsrec.serving.__file__).parent.glob("*.py"))
    assert len(files) >= 5, files  # the package, not a stray module
    for path in files:
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & training, (path.name, imported & training)

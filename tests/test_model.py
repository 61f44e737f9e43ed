"""SLSRec: shapes, padding, the streaming step = batch identity, the long/short split, fusion modes,
and the contrastive loss."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from slsrec.errors import UserError
from slsrec.model import SLSRec, SLSRecConfig, contrastive_loss, long_window, segments, window_mean
from slsrec.sessions import Boundary, batch_from, segment_starts

N_USERS, N_ITEMS = 6, 30
MIN = 60_000  # ms
GAP, S = 30 * MIN, 4  # the session rule of these tests: S = max_segment

make_batch = partial(batch_from, gap_ms=GAP, max_segment=S)  # (items, ts_ms) per user -> SeqBatch


def sessions(*lengths, start=0):
    """Timestamps of consecutive sessions of the given lengths: a minute apart inside, 3 h between."""
    ts, t = [], start
    for k in lengths:
        ts += [t + i * MIN for i in range(k)]
        t = ts[-1] + 180 * MIN
    return ts


def model(**kw) -> SLSRec:
    torch.manual_seed(0)
    kw = {"d": 16, "max_segment": 4, "long_len": 6, **kw}
    return SLSRec(SLSRecConfig(n_users=N_USERS, n_items=N_ITEMS, **kw)).eval()


SEQS = [([3, 4, 5, 6, 7, 8, 9, 10, 11], sessions(2, 5, 2)),  # a long session overflows into 2 segments
        ([12, 13, 14], sessions(3)),  # first segment only: cold
        ([1, 2, 3, 4, 5, 6], sessions(1, 1, 1, 3)),
        ([20] * 7, sessions(7))]


def test_shapes_and_padding_outputs():
    b = make_batch(SEQS)
    out = model()(b)
    B, T = b.items.shape
    assert out.user.shape == (B, T, 16) and out.alpha.shape == (B, T) and out.aux_loss.shape == ()
    pad = b.items == 0
    assert (out.user[pad] == 0).all() and (out.alpha[pad] == 0).all()


@pytest.mark.parametrize("overrides", [{}, {"fusion": "fixed"}, {"contrastive": "bpr"}, {"gap_ms": None}])
def test_padding_never_changes_a_result(overrides):
    m = model(**overrides)
    b = make_batch(SEQS)
    padded = make_batch(SEQS, T=b.items.shape[1] + 5)
    out, out_p = m(b), m(padded)
    torch.testing.assert_close(out_p.user[:, 5:], out.user, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_p.alpha[:, 5:], out.alpha, atol=1e-6, rtol=0)
    train = model(dropout=0.0, **overrides).train()  # aux_loss is computed in training only
    torch.testing.assert_close(train(padded).aux_loss, train(b).aux_loss)
    # Each user alone (no padding at all) gets the same vectors as inside the padded batch.
    for i, seq in enumerate(SEQS):
        alone = m(make_batch([seq], users=[i]))
        torch.testing.assert_close(out_p.user[i, -len(seq[0]):], alone.user[0], atol=1e-5, rtol=0)


def test_step_by_step_equals_batch_encoding():
    m = model()
    b = make_batch(SEQS)
    seg = segments(b.items, b.seg_start)
    with torch.no_grad():
        batch = m.short_encoder(m.item_emb(b.items), b.dts, seg)  # (B, T, d)
        state = m.short_encoder.init_state(len(b))
        for t in range(b.items.shape[1]):
            reset = seg.start[:, t].unsqueeze(-1)
            state = torch.where(reset, m.short_encoder.init_state(len(b)), state)
            state = m.short_encoder.step(state, b.items[:, t], b.dts[:, t])
            real = seg.real[:, t]
            assert (state[real] - batch[real, t]).abs().max() < 1e-5, t


def streamed(m: SLSRec, user: int, items: list[int], ts: list[int]) -> list[tuple]:
    """The flow's path, event by event: at a SESSION boundary the state published for the history
    so far (none for a new user); at a SEGMENT boundary that state with the session's items so far
    folded in; GRU steps inside the segment; fuse. Returns (user vector, alpha, long, has_long) per
    position."""
    codes = segment_starts(ts, GAP, S)
    u, out = torch.tensor([user]), []
    with torch.no_grad():
        for p, (item, code) in enumerate(zip(items, codes)):
            if code == Boundary.SESSION:
                start = p
                published = m.long_state(make_batch([(items[:p], ts[:p])], users=[user])) if p else m.empty_long(1)
                long = published
            elif code == Boundary.SEGMENT:
                long = m.extend_long(published, torch.tensor([items[start:p]]), u)
            if code != Boundary.NONE:
                segment, state = [], m.short_encoder.init_state(1)
            dt = torch.tensor([0.0 if code == Boundary.SESSION else (ts[p] - ts[p - 1]) / 1000])
            state = m.short_encoder.step(state, torch.tensor([item]), dt)
            segment.append(item)
            vec, has = m.long_vector(long)
            user_vec, alpha = m.fuse(vec, m.short_vector(state), torch.tensor([len(segment)]), dt, has_long=has)
            out.append((user_vec[0], alpha[0], vec[0], has[0]))
    return out


# Sessions longer than S: 2, 3 and 4 segments, after history or from a cold start.
LONG_SESSIONS = [([3, 4, 5, 6, 7, 8, 9, 10, 11], sessions(2, 5, 2)),
                 ([1, 2, 3] + list(range(10, 20)), sessions(3, 10)),
                 ([20, 21, 22, 23, 24, 25, 26], sessions(7)),  # cold start overflows: warm in-session
                 (list(range(5, 19)) + [2, 3], sessions(14, 2))]


@pytest.mark.parametrize("fusion", ["gate", "long"])
def test_streaming_path_reproduces_forward(fusion):
    """Published state + folded overflow segments + GRU steps + fuse = forward, at every position,
    while the long-term input stays within long_len (the long-term part itself is checked too)."""
    m = model(long_len=20, fusion=fusion, contrastive="none")
    for i, (items, ts) in enumerate(LONG_SESSIONS):
        b = make_batch([(items, ts)], users=[i])
        with torch.no_grad():
            expected = m(b)
        got = streamed(m, i, items, ts)
        seg = segments(b.items, b.seg_start)
        assert (seg.first[0] > 0).any(), "the test must reach a position with long-term input"
        for p, (user_vec, alpha, long, has) in enumerate(got):
            torch.testing.assert_close(user_vec, expected.user[0, p], atol=1e-5, rtol=0)
            torch.testing.assert_close(alpha, expected.alpha[0, p], atol=1e-6, rtol=0)
            assert bool(has) == bool(seg.first[0, p] > 0)  # cold exactly in the first segment
            if fusion == "long":  # user vector = the long-term part forward uses
                torch.testing.assert_close(long, expected.user[0, p], atol=1e-5, rtol=0)


@pytest.mark.parametrize("history", [[7] * 5, [1, 2, 3, 4, 5]])
def test_folding_past_long_len_keeps_the_latest_items(history):
    """Past long_len, forward drops the oldest items, which a pooled state cannot single out: the fold
    counts the published state as the items left in the window. Exact when the session alone fills
    the window or when the dropped items equal the kept ones; otherwise closer to forward than
    keeping everything."""
    m = model(long_len=6, fusion="long", contrastive="none")
    items, ts = history + list(range(10, 20)), sessions(5, 10)  # segments [history] [10..13] [14..17] [18 19]
    b = make_batch([(items, ts)], users=[2])
    with torch.no_grad():
        expected = m(b).user[0]  # (T, d)
        got = [long for _, _, long, _ in streamed(m, 2, items, ts)]
        m.long_encoder.long_len = 100  # folding without the window: everything kept
        everything = [long for _, _, long, _ in streamed(m, 2, items, ts)]
    for p in (13, 14):  # long input items[7:13], all in the session
        torch.testing.assert_close(got[p], expected[p], atol=1e-5, rtol=0)
    for p in range(9, 13):  # long input [4 5 10 11 12 13]: the three oldest history items dropped
        if len(set(history)) == 1:
            torch.testing.assert_close(got[p], expected[p], atol=1e-5, rtol=0)
        else:
            assert 1e-4 < (got[p] - expected[p]).norm() < (everything[p] - expected[p]).norm()


def test_extend_long_is_exact_and_order_free():
    """Within long_len, folding in pieces = pooling all at once (any split or order, padding ignored);
    nothing folded = cold."""
    m = model()
    u = torch.tensor([0, 3])
    items = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 1, 2, 3]])  # row 1 left-padded
    with torch.no_grad():
        whole = m.extend_long(m.empty_long(2), items, u)
        parts = m.extend_long(m.extend_long(m.empty_long(2), items[:, :2], u), items[:, 2:], u)
        reversed_ = m.extend_long(m.empty_long(2), items.flip(1), u)
        empty = m.extend_long(m.empty_long(2), torch.zeros(2, 3, dtype=torch.long), u)
        torch.testing.assert_close(m.long_vector(parts)[0], m.long_vector(whole)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(m.long_vector(reversed_)[0], m.long_vector(whole)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(m.long_vector(whole)[0], m.long_term(make_batch(
            [(items[0].tolist(), sessions(5)), ([1, 2, 3], sessions(3))], users=[0, 3])), atol=1e-6, rtol=0)
    assert torch.isneginf(empty.log_z).all() and (empty.mean == 0).all() and not m.long_vector(empty)[1].any()
    assert torch.isfinite(whole.log_z).all() and whole.n.tolist() == [5, 3] and empty.n.tolist() == [0, 0]


def test_long_term_ignores_the_current_segment_and_is_zero_when_cold():
    m = model(fusion="long", contrastive="none")  # user vector = long-term vector
    items, ts = SEQS[0]  # segments: [3 4] [5 6 7 8] [9] [10 11]
    out = m(make_batch([(items, ts)]))
    changed_now = m(make_batch([(items[:-2] + [29, 30], ts)]))
    changed_before = m(make_batch([(items[:1] + [1] + items[2:], ts)]))
    changed_too_old = m(make_batch([([1] + items[1:], ts)]))  # beyond long_len=6 items back
    torch.testing.assert_close(changed_now.user[0, -1], out.user[0, -1])
    torch.testing.assert_close(changed_too_old.user[0, -1], out.user[0, -1])
    assert (changed_before.user[0, -1] - out.user[0, -1]).abs().max() > 1e-4  # the test can fail
    assert (out.user[0, :2] == 0).all() and (out.user[0, 2:].abs().sum(-1) > 0).all()
    cold = m(make_batch([SEQS[1]]))
    assert (cold.user == 0).all()
    # long_term() over a whole history caps it to the latest long_len items.
    lt = m.long_term(make_batch([(items, ts)]))
    lt_recent = m.long_term(make_batch([(items[-6:], ts[-6:])]))
    torch.testing.assert_close(lt, lt_recent)
    assert m.long_term(make_batch([([0], [0])])).abs().sum() == 0  # an empty history


def test_long_term_window_and_proxies_by_hand():
    b = make_batch([SEQS[0]], T=11)  # 2 padding, then segments [3 4] [5 6 7 8] [9] [10 11]
    seg = segments(b.items, b.seg_start)
    assert seg.first[0, 2:].tolist() == [2, 2, 4, 4, 4, 4, 8, 9, 9]
    lo, mask = long_window(seg, long_len=3)
    keys = [torch.nonzero(row).flatten().tolist() for row in mask[0]]
    assert keys == [[], [], [], [], [2, 3], [2, 3], [2, 3], [2, 3], [5, 6, 7], [6, 7, 8], [6, 7, 8]]
    x = torch.arange(11.0).view(1, 11, 1) * (b.items > 0).unsqueeze(-1)  # value = position at real items
    long_proxy = window_mean(x, seg.real, lo, seg.first)[0, :, 0]
    assert long_proxy.tolist() == [0, 0, 0, 0, 2.5, 2.5, 2.5, 2.5, 6, 7, 7]
    t = torch.arange(1, 12).unsqueeze(0)  # last k=2 items of the segment, up to and including t
    short_proxy = window_mean(x, seg.real, torch.maximum(seg.first, t - 2), t)[0, :, 0]
    assert short_proxy.tolist() == [0, 0, 2, 2.5, 4, 4.5, 5.5, 6.5, 8, 9, 9.5]


def test_fusion_modes_give_the_expected_alpha():
    b = make_batch(SEQS)
    seg = segments(b.items, b.seg_start)
    has_long = seg.real & (seg.first > (b.items == 0).sum(1, keepdim=True))  # not in the first segment
    alpha = {mode: model(fusion=mode, contrastive="none" if mode in ("long", "short") else "infonce")(b).alpha
             for mode in ("gate", "fixed", "long", "short")}
    assert (alpha["short"] == 0).all()
    assert (alpha["long"][seg.real] == 1).all()
    assert (alpha["fixed"][has_long] == 0.5).all() and (alpha["fixed"][~has_long] == 0).all()
    gate = alpha["gate"][has_long]
    assert ((gate > 0) & (gate < 1)).all() and gate.std() > 0  # learned, input-dependent
    assert (alpha["gate"][~has_long] == 0).all()  # cold start
    # streaming fuse: None = all cold; has_long marks cold rows inside a batch
    m = model()
    short, n = torch.randn(3, 16), torch.tensor([2.0, 1, 5])
    assert (m.fuse(None, short, n, n)[1] == 0).all()
    user, a = m.fuse(torch.randn(3, 16), short, n, n, has_long=torch.tensor([True, False, True]))
    assert a[1] == 0 and (a[[0, 2]] > 0).all()
    torch.testing.assert_close(user[1], short[1])


@pytest.mark.parametrize("kind", ["infonce", "bpr"])
def test_contrastive_loss_is_finite_and_trains_both_encoders(kind):
    m = model(contrastive=kind, contrastive_weight=1.0).train()
    out = m(make_batch(SEQS))
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.aux_loss.backward()
    for part in (m.long_encoder, m.short_encoder, m.user_emb):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert model(contrastive="none").train()(make_batch(SEQS)).aux_loss == 0
    assert model(contrastive=kind)(make_batch(SEQS)).aux_loss == 0  # eval mode: no training loss


@pytest.mark.parametrize("negatives", [32, 1])
def test_contrastive_losses_match_their_definitions(negatives):
    torch.manual_seed(0)
    ul, us, pl, ps = (torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1) for _ in range(4))
    valid = torch.tensor([[True, False], [True, True], [False, True]])
    sim = lambda a, b: float(a @ b)  # noqa: E731
    nce, bpr = [], []
    for b, t in valid.nonzero().tolist():
        others = [c for c in range(min(3, negatives + 1)) if valid[c, t] and c != b] + [b]
        for anchor, own, other in ((ul, pl, ps), (us, ps, pl)):
            logits = torch.tensor([sim(anchor[b, t], own[c, t]) for c in others] + [sim(anchor[b, t], other[b, t])]) / 0.5
            nce.append(torch.logsumexp(logits, 0) - logits[-2])
        for a, pos, neg in ((ul, pl, ps), (us, ps, pl), (pl, ul, us), (ps, us, ul)):
            bpr.append(torch.nn.functional.softplus(torch.tensor(sim(a[b, t], neg[b, t]) - sim(a[b, t], pos[b, t]))))
    n = int(valid.sum())
    torch.testing.assert_close(contrastive_loss("infonce", ul, us, pl, ps, valid, 0.5, negatives), sum(nce) / n)
    torch.testing.assert_close(contrastive_loss("bpr", ul, us, pl, ps, valid, 0.5), sum(bpr) / n)


def test_contrastive_weight_scales_aux_loss():
    b = make_batch(SEQS)
    a1, a3 = (model(contrastive_weight=w, dropout=0.0).train()(b).aux_loss for w in (1.0, 3.0))
    torch.testing.assert_close(a3, 3 * a1)


def test_config_mistakes_are_clear_errors():
    with pytest.raises(UserError, match="fusion='avg' is not one of gate, fixed, long, short"):
        SLSRecConfig(n_users=1, n_items=1, fusion="avg")
    with pytest.raises(UserError, match="set contrastive='none'"):
        SLSRecConfig(n_users=1, n_items=1, fusion="short")
    with pytest.raises(UserError, match="fixed_alpha"):
        SLSRecConfig(n_users=1, n_items=1, fusion="fixed", fixed_alpha=2)


def test_long_window_is_the_trained_window():
    # Training at T=50 shows at most 49 long-term items: publishing must not pool 200.
    assert SLSRecConfig(n_users=3, n_items=10, max_len=50).long_len == 49
    assert SLSRecConfig(n_users=3, n_items=10, max_len=300).long_len == 200

"""SLSRec: disentangled long- and short-term interest, fused by a learned gate.

Read bottom-up: the config, the batch geometry (segments and masks), the long-term encoder (CLSR
attention pooling), the short-term encoder (a GRU that resets at every segment start), the
contrastive proxies, the fusion gate, and the model that wires them together.

>>> import torch
>>> from types import SimpleNamespace
>>> torch.manual_seed(0) and None
>>> m = SLSRec(SLSRecConfig(n_users=3, n_items=10, d=8)).eval()
>>> b = SimpleNamespace(user=torch.tensor([0, 2]), items=torch.tensor([[0, 4, 5, 6], [1, 2, 3, 4]]),
...     dts=torch.tensor([[0.0, 0, 60, 9000], [0, 5, 5, 5]]),
...     seg_start=torch.tensor([[False, True, False, True], [True, False, False, False]]))
>>> out = m(b)
>>> tuple(out.user.shape), tuple(out.alpha.shape), m.item_embeddings().shape[0]
((2, 4, 8), (2, 4), 11)
>>> out.alpha[0].tolist()[:3]  # padding and the first segment have no long-term input
[0.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slsrec.errors import UserError


@dataclass
class SeqConfig:
    """What every sequential model shares, including the batch geometry the trainer must build."""

    n_users: int = 1
    n_items: int = 1  # real items are 1..n_items, 0 is padding
    d: int = 64  # embedding width; 64 is the usual ML-1M setting (SASRec, CLSR)
    max_len: int = 200  # T: most recent events per training sequence (SASRec uses 200 on ML-1M)
    gap_ms: int | None = 30 * 60 * 1000  # inactivity (ms) opening a session; None = fixed windows only
    max_segment: int = 20  # S: a segment (the short-term input) holds at most S items
    dropout: float = 0.2  # on input embeddings; ML-1M overfits quickly without it

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.n_users < 1:
            raise UserError(f"need at least one user and one item, got n_users={self.n_users} n_items={self.n_items}")
        if self.max_len < 1 or self.max_segment < 1:
            raise UserError(f"max_len and max_segment must be >= 1, got {self.max_len}, {self.max_segment}")


@dataclass
class SLSRecConfig(SeqConfig):
    long_len: int = 200  # L: long-term input = the L most recent items before the current segment
    proxy_k: int = 5  # short-term proxy = mean of the last k items of the current segment
    hidden: int = 64  # width of the CLSR scorer MLP and of the gate MLP
    fusion: Literal["gate", "fixed", "long", "short"] = "gate"  # long/short/fixed are ablations
    fixed_alpha: float = 0.5  # alpha used by fusion="fixed"
    contrastive: Literal["infonce", "bpr", "none"] = "infonce"  # bpr is the CLSR pairwise form
    contrastive_weight: float = 0.1  # weight of aux_loss next to the recommendation loss
    temperature: float = 0.2  # InfoNCE softmax temperature on cosine similarities
    negatives: int = 32  # InfoNCE in-batch negatives per anchor; cost grows with it ((T, B, m) logits)

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"fusion": ("gate", "fixed", "long", "short"), "contrastive": ("infonce", "bpr", "none")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(valid)}")
        # The contrastive loss contrasts the two representations; an ablation that drops one cannot.
        if self.fusion in ("long", "short") and self.contrastive != "none":
            raise UserError(f"fusion={self.fusion!r} uses one representation only: set contrastive='none'")
        if not 0.0 <= self.fixed_alpha <= 1.0:
            raise UserError(f"fixed_alpha must be in [0, 1], got {self.fixed_alpha}")
        if min(self.long_len, self.proxy_k, self.hidden, self.negatives) < 1 or self.temperature <= 0:
            raise UserError("long_len, proxy_k, hidden and negatives must be >= 1 and temperature > 0")
        # Training never shows more than max_len - 1 long-term items; publishing and serving must pool
        # the window the model was trained on (a wider one measured worse on ML-100K).
        self.long_len = max(1, min(self.long_len, self.max_len - 1))


def config_from(cls: type[SeqConfig], **kwargs) -> SeqConfig:
    """Build a config, rejecting unknown keys with the list of valid ones (fail fast)."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return cls(**kwargs)


class Output(NamedTuple):
    user: Tensor  # (B, T, d) user vector after each position; score items with user @ E.T
    alpha: Tensor | None  # (B, T) weight of the long-term vector, None for models without fusion
    aux_loss: Tensor  # scalar, already weighted, 0 in eval mode; add it to the recommendation loss
    long: Tensor | None = None  # (B, T, d) the long-term vector the gate fused (zero where cold), for explanations
    short: Tensor | None = None  # (B, T, d) the short-term vector it fused


def score(user: Tensor, items: Tensor) -> Tensor:
    """Scores of every item: ``user @ items.T`` with the padding column at -inf.

    >>> score(torch.ones(1, 2), torch.tensor([[0.0, 0], [1, 2], [3, 4]])).tolist()
    [[-inf, 3.0, 7.0]]
    """
    s = user @ items.T  # (..., n_items+1)
    s[..., 0] = float("-inf")
    return s


# ---- batch geometry -------------------------------------------------------------------------------


class Segments(NamedTuple):
    real: Tensor  # (B, T) bool, not padding
    start: Tensor  # (B, T) bool, first position of a segment (padding never starts one)
    first: Tensor  # (B, T) long, index of the current segment's first position
    length: Tensor  # (B, T) float, items in the current segment so far (1 at its start)


def segments(items: Tensor, seg_start: Tensor) -> Segments:
    """Where each position's segment begins. The first real item always starts one, so left
    padding can never leak into a segment even if a caller forgets to flag it."""
    real = items > 0  # (B, T)
    prev_real = F.pad(real[:, :-1], (1, 0), value=False)  # (B, T)
    start = real & (seg_start | ~prev_real)  # (B, T)
    idx = torch.arange(items.shape[1], device=items.device).expand_as(items)  # (B, T)
    first = torch.where(start, idx, 0).cummax(dim=1).values  # (B, T)
    return Segments(real, start, first, (idx - first + 1).float())


def long_window(seg: Segments, long_len: int) -> tuple[Tensor, Tensor]:
    """Each position's long-term input: the real positions in [lo, first), i.e. before its segment,
    at most long_len of them. Returns lo (B,T) and the mask (B,T,T) over key positions."""
    lo = (seg.first - long_len).clamp(min=0)  # (B, T)
    j = torch.arange(seg.real.shape[1], device=lo.device)  # (T,) key positions
    in_window = (j >= lo.unsqueeze(-1)) & (j < seg.first.unsqueeze(-1))  # (B, T, T)
    return lo, in_window & seg.real.unsqueeze(1) & seg.real.unsqueeze(-1)


def window_mean(x: Tensor, real: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Mean of x over the real positions lo <= j < hi of each row (zero where there are none),
    via prefix sums: O(B T d) instead of a (B, T, T) mask. x (B,T,d), real/lo/hi (B,Tq) -> (B,Tq,d)."""
    B, T, d = x.shape
    csum = F.pad(x.cumsum(1), (0, 0, 1, 0)).flatten(0, 1)  # (B*(T+1), d)
    ccnt = F.pad(real.float().cumsum(1), (1, 0))  # (B, T+1)
    n = ccnt.gather(1, hi) - ccnt.gather(1, lo)  # (B, Tq)
    row = torch.arange(B, device=x.device).unsqueeze(1) * (T + 1)  # (B, 1)
    at = lambda i: csum.index_select(0, (i + row).flatten()).view(*i.shape, d)  # noqa: E731  rows: faster than gather
    return (at(hi) - at(lo)) / n.clamp(min=1).unsqueeze(-1)  # (B, Tq, d)


# ---- long-term encoder ----------------------------------------------------------------------------


class LongState(NamedTuple):
    """The long-term input in pooled form, which new items extend (the streaming path). The query
    is per user, so each key's score does not depend on the others: the pooling is a softmax-weighted
    mean, and keeping its normaliser is enough to add keys later, exactly up to long_len items."""

    mean: Tensor  # (B, d) softmax-weighted mean of the item embeddings, before the layer norm; 0 if none
    log_z: Tensor  # (B,) logsumexp of the keys' scores; -inf = no long-term input yet (cold)
    n: Tensor  # (B,) float, items pooled (at most long_len)


class LongTermEncoder(nn.Module):
    """CLSR attention pooling: each key is scored by an MLP over [key, query, key-query, key*query]
    with the user embedding as query. The query does not depend on the position, so each key is
    scored once, (B, T), and positions only differ by which keys their mask lets in."""

    def __init__(self, config: SLSRecConfig):
        super().__init__()
        d, h = config.d, config.hidden
        self.fc, self.out = nn.Linear(4 * d, h), nn.Linear(h, 1)  # the scorer MLP
        self.norm = nn.LayerNorm(d)  # a pooled mean of embeddings is small: put it on the short vector's scale
        self.long_len = config.long_len

    def score(self, keys: Tensor, query: Tensor) -> Tensor:
        """keys (B,T,d), query (B,d) -> (B,T). The first layer on the concatenation, split by block:
        W[k, q, k-q, k*q] = (Wk+Wd)k + (Wq-Wd)q + Wp(k*q), so the query part is computed once per user."""
        wk, wq, wd, wp = self.fc.weight.split(keys.shape[-1], 1)  # (h, d) each
        per_user = F.linear(query, wq - wd, self.fc.bias).unsqueeze(1)  # (B, 1, h)
        hid = F.linear(keys, wk + wd) + F.linear(keys * query.unsqueeze(1), wp) + per_user  # (B, T, h)
        return self.out(torch.relu(hid)).squeeze(-1)  # (B, T)

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """keys (B,T,d), query (B,d), mask (B,Tq,T) -> pooled (B,Tq,d) (zero if empty), has (B,Tq)."""
        # A finite fill keeps rows without keys finite (uniform); they are zeroed through `has`.
        att = self.score(keys, query).unsqueeze(1).masked_fill(~mask, -1e9)  # (B, Tq, T)
        has = mask.any(-1)  # (B, Tq)
        return self.norm(torch.softmax(att, -1) @ keys) * has.unsqueeze(-1), has  # (B, Tq, d)

    def extend(self, state: LongState, keys: Tensor, query: Tensor, real: Tensor) -> LongState:
        """Fold keys (B,K,d), oldest first (``real`` (B,K) marks the present ones), into a pooled state.

        A softmax-weighted mean extends like one more key whose score is the log-normaliser: exact
        while the state and the keys hold at most long_len items. Past that, forward keeps only the
        latest long_len: the state's items cannot be told apart any more, so the state counts as
        the `keep` items left (its weight scaled by keep/n), i.e. its oldest are assumed average.
        """
        real = real & (real.flip(1).cumsum(1).flip(1) <= self.long_len)  # (B, K) the latest long_len keys
        keep = (self.long_len - real.sum(1)).clamp(min=0).minimum(state.n)  # (B,) state items still in the window
        old = torch.where(keep > 0, state.log_z + keep.log() - state.n.log(), float("-inf"))  # (B,)
        scores = torch.cat([old.unsqueeze(1), self.score(keys, query).masked_fill(~real, float("-inf"))], 1)  # (B, 1+K)
        log_z = torch.logsumexp(scores, 1)  # (B,), -inf while there is no key at all
        w = torch.exp(scores - log_z.nan_to_num(neginf=0.0).unsqueeze(1))  # (B, 1+K), all 0 without keys
        mean = (w.unsqueeze(1) @ torch.cat([state.mean.unsqueeze(1), keys], 1)).squeeze(1)  # (B, d)
        return LongState(mean, log_z, keep + real.sum(1))

    def vector(self, state: LongState) -> tuple[Tensor, Tensor]:
        """What ``forward`` returns for the same keys: normed mean (B,d) (zero if empty), has (B,)."""
        has = torch.isfinite(state.log_z)  # (B,)
        return self.norm(state.mean) * has.unsqueeze(-1), has  # (B, d)


# ---- short-term encoder ---------------------------------------------------------------------------


class ShortTermEncoder(nn.Module):
    """A GRU over the current segment, with log1p(dt) as an extra input feature.

    One set of weights: ``forward`` runs the ``nn.GRU``, ``step`` its cell (``torch.gru_cell``, the
    same arithmetic without the sequence machinery: 34 against 266 µs for one row on CPU, which every
    micro-batch of the stream pays). ``forward`` cuts the batch
    into its segments and runs them as one batch of short right-padded sequences: the state resets
    at every segment start, trailing padding cannot reach a real position, and there is no Python
    loop over positions (measured 2.5x faster than packing, ~10x faster than a cell loop, on CPU).
    """

    def __init__(self, config: SLSRecConfig, item_emb: nn.Embedding):
        super().__init__()
        self.__dict__["item_emb"] = item_emb  # shared with SLSRec; not registered twice in state_dict
        self.gru = nn.GRU(config.d + 1, config.d, batch_first=True)  # input: [item; log1p(dt)]
        self.d = config.d

    def init_state(self, batch_size: int) -> Tensor:
        return self.gru.weight_hh_l0.new_zeros(batch_size, self.d)  # (B, d)

    def _input(self, e: Tensor, dt: Tensor) -> Tensor:
        return torch.cat([e, torch.log1p(dt.float().clamp(min=0)).unsqueeze(-1)], -1)  # (..., d+1)

    def step(self, state: Tensor, item: Tensor, dt: Tensor) -> Tensor:
        """Advance the segment state by one event: state (B,d), item (B,), dt (B,) seconds."""
        g = self.gru
        x = self._input(self.item_emb(item), dt)  # (B, d+1)
        return torch.gru_cell(x, state, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)  # (B, d)

    def forward(self, e: Tensor, dts: Tensor, seg: Segments) -> Tensor:
        """e (B,T,d) item embeddings -> state after each position (B,T,d), zero at padding."""
        B, T, _ = e.shape
        where = seg.real.nonzero(as_tuple=True)  # real positions, row-major
        sid = (seg.start.flatten().cumsum(0) - 1).view(B, T)[where]  # (n,) segment number in the batch
        off = (torch.arange(T, device=e.device) - seg.first)[where]  # (n,) position inside the segment
        if sid.numel() == 0:
            return e.new_zeros(B, T, self.d)
        lengths = torch.bincount(sid)  # (N,)
        x = self._input(e, dts)[where]  # (n, d+1)
        padded = x.new_zeros(len(lengths), int(lengths.max()), x.shape[-1]).index_put((sid, off), x)  # (N, S, d+1)
        h, _ = self.gru(padded)  # (N, S, d)
        return h.new_zeros(B, T, self.d).index_put(where, h[sid, off])  # (B, T, d), GRU dtype under autocast


# ---- contrastive disentanglement ------------------------------------------------------------------


def contrastive_loss(kind: str, ul: Tensor, us: Tensor, pl: Tensor, ps: Tensor, valid: Tensor, tau: float,
                     negatives: int = 32) -> Tensor:
    """Pull each representation towards its own proxy and away from the other's (cosine similarity).

    ul/us: long/short representations, pl/ps: their proxies, all (B,T,d); valid (B,T) bool.
    ``infonce``: positive = own proxy; negatives = the other proxy at the same position, and the
    same kind of proxy at the same position of the users among the batch's first ``negatives + 1``
    (batches are shuffled) other than the anchor. ``bpr``: CLSR's four pairwise terms, e.g. softplus(sim(ul,ps) - sim(ul,pl)) and
    softplus(sim(pl,us) - sim(pl,ul)).
    """
    ul, us, pl, ps = (F.normalize(x, dim=-1) for x in (ul, us, pl, ps))
    sim = lambda a, b: (a * b).sum(-1)  # noqa: E731
    l_pl, l_ps, s_ps, s_pl = sim(ul, pl), sim(ul, ps), sim(us, ps), sim(us, pl)  # (B, T): the only pairs either loss uses
    if kind == "bpr":  # anchors ul, us, pl, ps in turn
        loss = F.softplus(l_ps - l_pl) + F.softplus(s_pl - s_ps) + F.softplus(s_pl - l_pl) + F.softplus(l_ps - s_ps)
    else:
        B, m = valid.shape[0], min(negatives + 1, valid.shape[0])  # +1: an anchor among them is skipped
        own = torch.eye(B, m, dtype=torch.bool, device=valid.device)  # (B, m) the anchor itself
        bias = ((~valid[:m]).T.unsqueeze(1) | own) * -1e4  # (T, B, m): finite, so grads stay finite

        def in_batch(a: Tensor, p: Tensor) -> Tensor:  # logsumexp over the other users' proxies
            a, p = a.transpose(0, 1) / tau, p[:m].transpose(0, 1)  # (T, B, d), (T, m, d)
            return torch.logsumexp(torch.baddbmm(bias, a, p.transpose(1, 2)), -1).T  # (T, B, m) -> (B, T)

        nce = lambda batch, hard, pos: torch.logaddexp(torch.logaddexp(batch, hard), pos) - pos  # noqa: E731
        loss = nce(in_batch(ul, pl), l_ps / tau, l_pl / tau) + nce(in_batch(us, ps), s_pl / tau, s_ps / tau)  # (B, T)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


# ---- fusion ---------------------------------------------------------------------------------------


class Fusion(nn.Module):
    """alpha = sigmoid(MLP([long, short, long*short, log1p(segment length), log1p(dt)]));
    user = alpha*long + (1-alpha)*short. Rows without long-term input get alpha = 0."""

    def __init__(self, config: SLSRecConfig):
        super().__init__()
        d, h = config.d, config.hidden
        self.mode, self.fixed_alpha = config.fusion, config.fixed_alpha
        self.gate = nn.Sequential(nn.Linear(3 * d + 2, h), nn.ReLU(), nn.Linear(h, 1)) if self.mode == "gate" else None

    def forward(self, long: Tensor, has_long: Tensor, short: Tensor, seg_len: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        """long/short (...,d), has_long/seg_len/dt (...) -> user (...,d), alpha (...)."""
        if self.mode == "long":  # the ablation keeps its zero vector on cold rows: no short fallback
            return long, torch.ones_like(seg_len)
        if self.mode == "short":
            return short, torch.zeros_like(seg_len)
        if self.mode == "fixed":
            alpha = torch.full_like(seg_len, self.fixed_alpha)  # (...)
        else:
            ctx = torch.stack([torch.log1p(seg_len), torch.log1p(dt.float().clamp(min=0))], -1)  # (..., 2)
            alpha = torch.sigmoid(self.gate(torch.cat([long, short, long * short, ctx], -1))).squeeze(-1)  # (...)
        alpha = alpha * has_long
        return short + alpha.unsqueeze(-1) * (long - short), alpha  # (..., d), (...)


# ---- the model ------------------------------------------------------------------------------------


def init_items(emb: nn.Embedding) -> None:
    """Item table init shared by every model: N(0, 1/d), so dot-product scores start near unit scale;
    the padding row stays zero."""
    nn.init.normal_(emb.weight, std=1 / math.sqrt(emb.embedding_dim))
    with torch.no_grad():
        emb.weight[0].zero_()


class SLSRec(nn.Module):
    """Long-term encoder + short-term encoder + fusion gate over a shared item table; the
    contrastive loss keeps the two representations apart (``Output.aux_loss``)."""

    def __init__(self, config: SLSRecConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.d, padding_idx=0)  # input and output
        self.user_emb = nn.Embedding(config.n_users, config.d)  # the long-term attention query
        self.drop = nn.Dropout(config.dropout)
        self.long_encoder = LongTermEncoder(config)
        self.short_encoder = ShortTermEncoder(config, self.item_emb)
        self.short_norm = nn.LayerNorm(config.d)  # short vector = normed GRU state, same scale as long
        self.fusion = Fusion(config)
        init_items(self.item_emb)

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight  # (n_items+1, d)

    def forward(self, batch) -> Output:
        cfg = self.config
        seg = segments(batch.items, batch.seg_start)
        e = self.item_emb(batch.items)  # (B, T, d)
        x = self.drop(e)
        lo, mask = long_window(seg, cfg.long_len)  # (B, T), (B, T, T)
        zero = torch.zeros_like(x)
        long, has_long = (zero, torch.zeros_like(seg.real)) if cfg.fusion == "short" else \
            self.long_encoder(x, self.user_emb(batch.user), mask)  # (B, T, d), (B, T)
        short = zero if cfg.fusion == "long" else self.short_vector(self.short_encoder(x, batch.dts, seg))  # (B, T, d)
        user, alpha = self.fusion(long, has_long.float(), short, seg.length, batch.dts)
        aux = self._contrastive(e, seg, lo, long, short, seg.real & has_long)
        return Output(user * seg.real.unsqueeze(-1), alpha * seg.real, aux, long, short)  # padding -> 0

    def _contrastive(self, e: Tensor, seg: Segments, lo: Tensor, long: Tensor, short: Tensor, valid: Tensor) -> Tensor:
        """The weighted contrastive loss against the proxies (mean long-term item, mean of the last k)."""
        cfg = self.config
        if cfg.contrastive == "none" or cfg.contrastive_weight == 0 or not self.training:  # a training loss only
            return e.new_zeros(())
        t = torch.arange(e.shape[1], device=e.device) + 1  # (T,) exclusive end of each position's window
        short_lo = torch.maximum(seg.first, t - cfg.proxy_k)  # (B, T)
        pl, ps = window_mean(e, seg.real, torch.cat([lo, short_lo], 1), torch.cat([seg.first, t.expand_as(lo)], 1)
                             ).chunk(2, 1)  # (B, T, d) each, one prefix sum for both
        return cfg.contrastive_weight * contrastive_loss(cfg.contrastive, long, short, pl, ps, valid,
                                                           cfg.temperature, cfg.negatives)

    # ---- streaming API: the flow keeps one short-term state per user and fuses it per event ----

    def empty_long(self, batch_size: int) -> LongState:
        """The long-term state of users with no long-term input yet (cold start)."""
        w = self.item_emb.weight
        return LongState(w.new_zeros(batch_size, self.config.d), w.new_full((batch_size,), float("-inf")),
                         w.new_zeros(batch_size))

    def long_state(self, batch) -> LongState:
        """Long-term state of each user's whole history in the batch (its latest long_len items): what
        a new session starts from, published to Redis."""
        return self.extend_long(self.empty_long(len(batch.user)), batch.items, batch.user)

    def extend_long(self, state: LongState, items: Tensor, user: Tensor) -> LongState:
        """Fold items (B,K), oldest first, 0 = padding, into the users' (B,) long-term state. In the
        stream, at a SEGMENT boundary: the state published for the session's start with all the
        session's items so far. Equals forward's long-term input while that holds at most long_len
        items; past that, approximately (see ``LongTermEncoder.extend``). Fold into the published
        state, not segment by segment: only the published items are then approximated."""
        return self.long_encoder.extend(state, self.item_emb(items), self.user_emb(user), items > 0)

    def long_vector(self, state: LongState) -> tuple[Tensor, Tensor]:
        """The long-term representation fuse takes: long (B,d), has_long (B,) (False = cold)."""
        return self.long_encoder.vector(state)

    def long_term(self, batch) -> Tensor:
        """Long-term vector (B,d) of each user's whole history in the batch, zero for an empty one."""
        return self.long_vector(self.long_state(batch))[0]

    def short_vector(self, state: Tensor) -> Tensor:
        """The short-term representation of a GRU state (B,d) -> (B,d)."""
        return self.short_norm(state)

    def fuse(self, long: Tensor | None, short: Tensor, seg_len: Tensor, dt: Tensor,
             has_long: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Streaming fusion: long (B,d) or None (all cold), short (B,d), seg_len/dt (B,).
        ``has_long`` (B,) bool marks rows that have a long-term vector (default: all, if long given)."""
        if long is None:
            long, has_long = torch.zeros_like(short), torch.zeros(short.shape[0], dtype=torch.bool, device=short.device)
        elif has_long is None:
            has_long = torch.ones(short.shape[0], dtype=torch.bool, device=short.device)
        return self.fusion(long, has_long.float(), short, seg_len.float(), dt.float())

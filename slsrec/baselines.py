"""Baselines in the same harness: Popularity, GRU4Rec, SASRec, and the CLSR-style configuration.

Every model takes a ``SeqBatch`` and returns ``Output(user (B,T,d), alpha, aux_loss)``; scores are
``user @ item_embeddings().T`` (see ``slsrec.model.score``), so training and full-ranking evaluation
treat all of them alike.

CLSR (Zheng et al., WWW 2022) is SLSRec's closest published relative and is built as an SLSRec
configuration (``clsr_overrides``). What is faithful: long-term attention pooling with the user
embedding as query and the MLP scorer over [key, query, key-query, key*query]; a recurrent
short-term encoder over recent items with no session segmentation (``gap_ms=None``);
proxies = mean of the long-term items and mean of the last k items; the pairwise (BPR) contrastive
loss with its four terms; an MLP-attention fusion. Where it differs, and why:

- CLSR's short-term encoder sees exactly the last k items at every step (a sliding window). Here it
  sees the current fixed window of at most k items (``max_segment=k``), so the streaming state stays
  O(1) per user; right after a window boundary it has seen fewer than k items.
- CLSR's long-term input is the whole history; here it is the history before the current window.
- CLSR's short-term encoder is a time-aware LSTM and its fusion attends to the target item. Here it
  is a GRU with log1p(dt) as input, and the gate is target-free: full ranking needs one user vector
  for all items (a target-aware gate would cost one fusion per candidate item).
- CLSR scores with an MLP over [user, item] trained on sampled negatives; here it is the dot product
  with full softmax cross-entropy, the same as every model in the table.

>>> import torch
>>> from types import SimpleNamespace
>>> b = SimpleNamespace(user=torch.tensor([0]), items=torch.tensor([[0, 3, 1]]), dts=torch.zeros(1, 3),
...     seg_start=torch.tensor([[False, True, False]]))
>>> m = SASRec(SASRecConfig(n_items=5, d=8, max_len=4)).eval()
>>> tuple(m(b).user.shape), tuple(m.item_embeddings().shape)
((1, 3, 8), (6, 8))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slsrec.errors import UserError
from slsrec.model import Output, SeqConfig, init_items


def clsr_overrides(k: int = 10) -> dict:
    """SLSRecConfig options that make SLSRec the CLSR-style model (differences: module docstring)."""
    return dict(gap_ms=None, max_segment=k, proxy_k=k, contrastive="bpr", fusion="gate")


# ---- Popularity ----------------------------------------------------------------------------------


@dataclass
class PopularityConfig(SeqConfig):
    pass


class Popularity(nn.Module):
    """Most popular items for everyone: a 1-d "embedding" of log counts and a user vector of ones,
    so ``user @ item_embeddings().T`` ranks by training-set popularity. ``fit`` replaces training."""

    def __init__(self, config: PopularityConfig):
        super().__init__()
        self.config = config
        self.register_buffer("counts", torch.zeros(config.n_items + 1))  # saved with the checkpoint

    def fit(self, items: Tensor) -> Popularity:
        """Count the training items (any shape; 0 = padding is ignored)."""
        items = torch.as_tensor(items).reshape(-1)
        if items.numel() and (items.min() < 0 or items.max() > self.config.n_items):
            raise UserError(f"item index out of range 0..{self.config.n_items}")
        self.counts.copy_(torch.bincount(items, minlength=self.config.n_items + 1).float())
        self.counts[0] = 0
        return self

    def item_embeddings(self) -> Tensor:
        return torch.log1p(self.counts).unsqueeze(-1)  # (n_items+1, 1)

    def forward(self, batch) -> Output:
        ones = self.counts.new_ones(*batch.items.shape, 1)  # (B, T, 1)
        return Output(ones * (batch.items > 0).unsqueeze(-1), None, self.counts.new_zeros(()))


# ---- GRU4Rec -------------------------------------------------------------------------------------


@dataclass
class GRU4RecConfig(SeqConfig):
    pass


def _align(x: Tensor, shift: Tensor) -> Tensor:
    """Roll each row of x (B,T,...) left by shift (B,): turns left padding into right padding."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device) + shift.unsqueeze(-1)) % T  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


class GRU4Rec(nn.Module):
    """Embedding -> GRU -> the hidden state after each item is the user vector (Hidasi et al.),
    scored against the shared item embeddings with full softmax cross-entropy."""

    def __init__(self, config: GRU4RecConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.d, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.d, config.d, batch_first=True)
        init_items(self.item_emb)

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight  # (n_items+1, d)

    def forward(self, batch) -> Output:
        real = batch.items > 0  # (B, T)
        pad = batch.items.shape[1] - real.sum(1)  # (B,)
        # Real items first: the GRU then never reads padding before a real item, so padding cannot
        # change a result, and one cuDNN/MKL call covers the batch (no packing needed).
        x = self.drop(self.item_emb(_align(batch.items, pad)))  # (B, T, d)
        h, _ = self.gru(x)  # (B, T, d)
        user = _align(self.drop(h), -pad) * real.unsqueeze(-1)  # (B, T, d)
        return Output(user, None, user.new_zeros(()))


# ---- SASRec --------------------------------------------------------------------------------------


@dataclass
class SASRecConfig(SeqConfig):
    n_layers: int = 2  # Kang & McAuley and Klenitskiy & Vasilev use 2 blocks on ML-1M
    n_heads: int = 1  # 1 head in both papers


class SelfAttention(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        if config.d % config.n_heads:
            raise UserError(f"d={config.d} is not divisible by n_heads={config.n_heads}")
        self.q, self.kv = nn.Linear(config.d, config.d), nn.Linear(config.d, 2 * config.d)
        self.out = nn.Linear(config.d, config.d)
        self.h, self.p = config.n_heads, config.dropout

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        """q, kv (B,T,d), mask (B,1,T,T) True = may attend -> (B,T,d)."""
        B, T, d = q.shape
        heads = lambda x: x.view(B, T, self.h, d // self.h).transpose(1, 2)  # noqa: E731  (B, h, T, d/h)
        k, v = self.kv(kv).chunk(2, -1)
        y = F.scaled_dot_product_attention(heads(self.q(q)), heads(k), heads(v), attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)  # (B, h, T, d/h)
        return self.out(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)


class Block(nn.Module):
    """SASRec block as in the authors' code: the query is layer-normed, keys/values are not;
    residual around attention, then a layer-normed point-wise feed-forward with its own residual."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        d = config.d
        self.ln_q, self.ln_ff = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(config)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, d),
                                nn.Dropout(config.dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q = self.ln_q(x)  # (B, T, d)
        x = self.ln_ff(q + self.attn(q, x, mask))  # (B, T, d)
        return x + self.ff(x)  # (B, T, d)


class SASRec(nn.Module):
    """Causal self-attention over the sequence (Kang & McAuley 2018), trained with full softmax
    cross-entropy over all items as in Klenitskiy & Vasilev (RecSys 2023)."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        d = config.d
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        init_items(self.item_emb)

    def item_embeddings(self) -> Tensor:
        return self.item_emb.weight  # (n_items+1, d)

    def forward(self, batch) -> Output:
        items = batch.items
        B, T = items.shape
        if T > self.config.max_len:
            raise UserError(f"sequence length {T} exceeds SASRec max_len={self.config.max_len}")
        real = (items > 0).unsqueeze(-1)  # (B, T, 1)
        # Positions count from the right, as in the authors' left-padded arrays: the last item always
        # has the same position, and extra left padding changes nothing.
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=items.device)  # (T,)
        x = self.drop(self.item_emb(items) * math.sqrt(self.config.d) + self.pos_emb(pos)) * real  # (B, T, d)
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (T, T)
        # Real keys only; each position may see itself so padding rows stay finite (zeroed below).
        mask = (causal & (real.transpose(1, 2) | torch.eye(T, dtype=torch.bool, device=items.device))).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * real  # (B, T, d)
        return Output(self.ln_f(x) * real, None, x.new_zeros(()))

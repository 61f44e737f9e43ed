"""``slsrec publish``: every known user's long-term state (and the model files) into Redis.

The long-term state of a user is ``model.long_state`` over the user's whole history, i.e. what a
new session starts from in the stream: the pooled vector, its log-normaliser and its item count, so
that the stream can fold a long session's overflow into it (``model.extend_long``). Users the model
has no embedding for, or whose history holds no item the model knows, get no entry: the flow serves
them as cold start.

>>> import torch
>>> from slsrec.data import Interactions, Vocab
>>> from slsrec.model import SLSRec, SLSRecConfig
>>> torch.manual_seed(0) and None
>>> model = SLSRec(SLSRecConfig(n_users=2, n_items=3, d=4))
>>> history = Interactions([0, 0, 1, 2], [1, 2, 3, 1], [1, 2, 3, 4], Vocab(["u1", "u2", "new-user"], padding=False),
...                        Vocab(["a", "b", "new-item"], padding=True))
>>> states = long_term_states(model, Vocab(["u1", "u2"], padding=False), Vocab(["a", "b", "c"], padding=True),
...                           history)
>>> sorted(states), states["u1"].vector.shape, states["u1"].vector.dtype  # u2 only saw an unknown item
(['u1'], (4,), dtype('float32'))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slsrec.checkpoint import CONFIG, IDS, METRICS, WEIGHTS, load_run
from slsrec.data import Interactions, Vocab, load_dataset
from slsrec.errors import CheckpointError
from slsrec.sessions import SeqBatch
from slsrec.store import LongTerm, LongTermStore, PublishResult
from slsrec.telemetry import ATTR_VERSION, Telemetry

# Run files that serve with the vectors: the flow rebuilds the model of a version from these.
MODEL_FILES = (WEIGHTS, CONFIG, IDS, METRICS)


@torch.no_grad()
def long_term_states(model: torch.nn.Module, users: Vocab, items: Vocab, history: Interactions, *,
                     batch_size: int = 1024, device: str = "cpu") -> dict[str, LongTerm]:
    """user_id -> long-term state, for every user of ``users`` with known items in ``history``.

    Parameters
    ----------
    model
        A model with ``long_state(batch) -> LongState`` and ``config.long_len`` (SLSRec).
    users, items
        The model's vocabularies (its ``ids.json``); ``history`` may use other indices.
    history
        The interactions to summarise; only each user's ``long_len`` most recent known items count.
    """
    if not hasattr(model, "long_state"):
        raise CheckpointError(f"{type(model).__name__} has no long-term state to publish; use an SLSRec model")
    long_len = model.config.long_len
    # History indices -> model indices; 0 (padding) marks what the model does not know.
    item_map = np.array([0] + [items.index(r) or 0 for r in history.items.raw], dtype=np.int64)
    rows, user_idx, user_ids = [], [], []
    for u, seq, _ in history.sequences():
        mu = users.index(history.users.raw_of(u))
        known = item_map[seq]
        known = known[known > 0][-long_len:]
        if mu is not None and len(known):
            rows.append(known)
            user_idx.append(mu)
            user_ids.append(history.users.raw_of(u))

    model = model.eval().to(device)
    out = np.empty((len(rows), model.config.d + 2), dtype=np.float32)  # vector, log-normaliser, items
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        items_np = np.zeros((len(chunk), width), dtype=np.int64)
        for i, r in enumerate(chunk):
            items_np[i, width - len(r):] = r  # left-padded, as in training batches
        batch = SeqBatch(
            user=torch.tensor(user_idx[start:start + batch_size]),  # (B,)
            items=torch.from_numpy(items_np),  # (B, T)
            dts=torch.zeros(items_np.shape),  # (B, T): long_state reads only users and items
            seg_start=torch.zeros(items_np.shape, dtype=torch.bool),  # (B, T)
            targets=torch.zeros(items_np.shape, dtype=torch.long),  # (B, T)
        ).to(device)
        state = model.long_state(batch)
        tail = torch.stack([state.log_z, state.n], 1)  # (B, 2)
        out[start:start + len(chunk)] = torch.cat([state.mean, tail], 1).cpu()  # (B, d+2)
    return {u: LongTerm(row[:-2], float(row[-2]), int(row[-1])) for u, row in zip(user_ids, out)}


@dataclass(frozen=True)
class PublishReport:
    result: PublishResult
    encode_s: float  # computing the vectors with the model


def publish_run(run_dir: str | Path, store: LongTermStore, *, version: str | None = None,
                history: Interactions | None = None, grace_s: float = 3600.0, batch_size: int = 1024,
                device: str = "cpu", telemetry: Telemetry | None = None) -> PublishReport:
    """Publish a run: its users' long-term states and its model files, as one new version.

    ``history`` defaults to the dataset the run was trained on. With ``telemetry``, the work is one
    ``slsrec.publish`` span carrying the version, the users written and the write throughput.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if history is None:
        history = load_dataset(run.dataset)
    # The id is known only once the store hands it out: the span gets it at the end.
    span_cm = telemetry.publish_span(version or "", run=str(run_dir)) if telemetry else contextlib.nullcontext()
    with span_cm as span:
        t0 = time.perf_counter()
        vectors = long_term_states(run.model, run.users, run.items, history, batch_size=batch_size, device=device)
        encode_s = time.perf_counter() - t0
        files = {name: (run_dir / name).read_bytes() for name in MODEL_FILES if (run_dir / name).exists()}
        meta = {"run": str(run_dir), "model": run.name, "dataset": run.dataset}
        result = store.publish(version, vectors, meta=meta, model_files=files, grace_s=grace_s)
        if span is not None:
            span.set_attributes({ATTR_VERSION: result.version, "slsrec.users": result.n_users,
                                 "slsrec.vectors_per_s": result.vectors_per_s, "slsrec.encode_s": encode_s})
    return PublishReport(result, encode_s)

"""Train and evaluate one model: read :func:`train` top to bottom.

data -> leave-one-out split -> batches with the model's own session rule and ``max_len`` -> model ->
AdamW -> epochs of (train, validation NDCG@10 with full ranking) -> early stopping that keeps the
best weights -> test metrics -> the run directory (:mod:`slsrec.checkpoint`).

Every model goes through the same evaluation: full ranking over all items, HR/NDCG@{5,10,20} and MRR,
under two labelled protocols (:data:`PROTOCOLS`): ``masked`` removes the user's own history from the
candidates (:func:`slsrec.metrics.mask_seen`; the SASRec+CE and HSTU papers' protocol) and ``strict``
leaves it in (what RecBole and most libraries do for sequential models). Early stopping and model
selection use the validation ``masked`` NDCG@10.

>>> from slsrec.data import Interactions
>>> from slsrec.synthetic import WorldConfig, generate
>>> inter = Interactions.from_frame(generate(WorldConfig(n_users=60, n_items=40, n_clusters=4)).events)
>>> res = train(TrainConfig(model="gru4rec", epochs=2, model_options={"d": 8}, max_len=20), inter=inter, progress=False)
>>> [h["epoch"] for h in res.history], sorted(res.metrics["test"]), sorted(res.metrics["test"]["strict"])[:3]
([1, 2], ['masked', 'strict'], ['HR@10', 'HR@20', 'HR@5'])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slsrec.checkpoint import Run, clear_progress, load_progress, load_run, save_progress, save_run
from slsrec.data import Interactions, load_dataset
from slsrec.errors import CheckpointError, UserError
from slsrec.metrics import RankingMetrics, mask_seen
from slsrec.model import score, segments
from slsrec.registry import MODEL_NAMES, build_model
from slsrec.sessions import Split, eval_batches, leave_one_out, train_batches

VALID_METRIC = "NDCG@10"  # early stopping and model selection, under the masked protocol
PROTOCOLS = ("masked", "strict")  # history removed from the candidates, or left in
# Precision per device, chosen by measured quality (docs/benchmarks.md, "Precision"). On this CPU bf16 autocast
# cost no quality over 3 seeds (SASRec, ML-100K: NDCG@10 0.0753 +- 0.0027 vs fp32 0.0738 +- 0.0057) but ran
# 3.5-4x slower per epoch at T=200, so fp32 stays; CUDA is unmeasured, so fp32 until it is.
PRECISION: dict[str, str] = {"cpu": "fp32", "cuda": "fp32"}


@dataclass
class TrainConfig:
    """Training options (model hyper-parameters go in ``model_options``, checked by the model config)."""

    dataset: str = "ml-1m"  # ml-1m, ml-100k, synthetic, or a clickstream file
    model: str = "slsrec"  # a name from slsrec.registry.MODEL_NAMES
    epochs: int = 200  # upper bound only: runs end by early stopping (a cap stopped models still improving)
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    batch_size: int = 32  # sequences per step: same epoch time as 128 on CPU, 4x the updates
    lr: float = 5e-3  # AdamW; with batch 32 it reaches in 2 epochs what 1e-3 reaches in many
    # lr *= this after each epoch without a better validation NDCG@10 (1 = constant); 0.3 moved SASRec +6% and
    # SLSRec +2% on ML-1M at T=200 (docs/benchmarks.md).
    lr_decay: float = 0.3
    weight_decay: float = 0.0  # dropout regularises already; decay on embeddings hurts rare items
    max_len: int | None = 200  # T, overriding the model's (None = the model's); SASRec's ML-1M setting
    # How histories are cut into rows of T: "all" makes every training event a target once per epoch;
    # "last" (the latest T) and "random" (a random span) keep one row per user, as measured levers.
    window: Literal["all", "last", "random"] = "all"
    loss: Literal["full", "sampled"] = "full"  # full softmax over all items, or sampled softmax
    negatives: int = 256  # sampled softmax: negatives per step, shared by the whole batch
    negative_power: float = 0.0  # negatives ~ count**power: 0 = uniform, 1 = popularity (logQ-corrected)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = the measured choice for the device (PRECISION)
    compile: bool = False  # torch.compile the model (measured slower here: graph breaks, recompiles)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    eval_batch_size: int = 256  # users per evaluation batch
    model_options: dict = field(default_factory=dict)  # config overrides, e.g. {"d": 32}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]  # one record per epoch
    metrics: dict  # test metrics, best validation, timings, alpha statistics
    run_dir: Path | None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` (autocast): ``auto`` takes the device's measured choice from :data:`PRECISION`.

    >>> resolve_precision("auto", torch.device("cpu")), resolve_precision("bf16", torch.device("cpu"))
    ('fp32', 'bf16')
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"unknown precision {precision!r}: expected auto, bf16 or fp32")
    return PRECISION[device.type] if precision == "auto" else precision


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def check_options(cfg: TrainConfig) -> None:
    """Reject option values that the dataclass's types do not enforce, naming the flag."""
    if cfg.model not in MODEL_NAMES:
        raise UserError(f"unknown model {cfg.model!r}; valid: {', '.join(MODEL_NAMES)}")
    for flag, value, valid in (("--loss", cfg.loss, ("full", "sampled")),
                               ("--window", cfg.window, ("all", "last", "random")),
                               ("--precision", cfg.precision, ("auto", "bf16", "fp32"))):
        if value not in valid:
            raise UserError(f"{flag} {value!r}: expected {' or '.join(valid)}")
    if not 0 < cfg.lr_decay <= 1:
        raise UserError(f"--lr-decay {cfg.lr_decay:g}: expected a factor in (0, 1]")


def train(cfg: TrainConfig, out: str | Path | None = None, *, inter: Interactions | None = None,
          progress: bool = True, warm_start: Callable[[nn.Module], None] | None = None,
          read_test: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` (or on ``inter`` when given) and save the run to ``out``.

    ``warm_start(model)`` is called on the freshly built model before training, e.g. to copy in the
    weights of the model being retrained (:mod:`slsrec.retrain`). ``read_test=False`` never reads the test
    split (hyper-parameter search, :mod:`slsrec.tune`): ``metrics["test"]`` is then None."""
    # ---- setup: options, seeds, threads, device ----
    check_options(cfg)  # before loading data, which can take a while
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)

    # ---- data: leave-one-out split ----
    inter = load_dataset(cfg.dataset) if inter is None else inter
    split = leave_one_out(inter)
    if not (split.valid >= 0).any():
        raise UserError(f"dataset {cfg.dataset!r}: no user has the 3 interactions leave-one-out needs")

    # ---- model: its config carries the batch geometry (max_len, session rule) ----
    options = dict(cfg.model_options) | ({"max_len": cfg.max_len} if cfg.max_len else {})
    model = build_model(cfg.model, n_users=inter.n_users, n_items=inter.n_items, **options)
    if warm_start is not None:
        warm_start(model)
    model = model.to(device)
    rule = batch_rule(model)
    history: list[dict] = []
    t_start = time.perf_counter()
    time_to_best = 0.0

    if cfg.model == "pop":
        # ---- popularity: counting the training events replaces the epochs ----
        model.fit(torch.from_numpy(split.train.item).to(device))
        best_valid = evaluate(model, split, "valid", batch_size=cfg.eval_batch_size, device=device,
                              progress=progress)
        history.append({"epoch": 1, "train_loss": None, "valid": best_valid, "train_s": 0.0,
                        "seconds": round(time.perf_counter() - t_start, 3)})
        time_to_best, best_epoch = time.perf_counter() - t_start, 1
    else:
        # ---- optimiser and loss ----
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # A plateau of validation NDCG@10 (no epoch better than the best so far): smaller steps from there on.
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_decay, patience=0,
                                                             threshold=0.0) if cfg.lr_decay < 1 else None
        sampler = NegativeSampler(split.train.item, inter.n_items, seed=cfg.seed, power=cfg.negative_power,
                                  device=device) \
            if cfg.loss == "sampled" else None
        step_model = torch.compile(model) if cfg.compile else model
        bf16 = resolve_precision(cfg.precision, device) == "bf16"
        best_valid, best_epoch, best_state, bad_epochs = None, 0, None, 0

        # ---- resume: a run cut off continues after its last finished epoch ----
        done = load_progress(out) if out is not None else None
        if done is not None:
            best_state, meta = _restore(done, model, opt, plateau, sampler, rng)
            history, time_to_best = meta["history"], meta["time_to_best"]
            best_valid, best_epoch, bad_epochs = meta["best_valid"], meta["best_epoch"], meta["bad_epochs"]
            t_start -= meta["elapsed"]
            if progress:
                tqdm.write(f"{cfg.model}: resuming {out} after epoch {len(history)}")

        for epoch in range(len(history) + 1, cfg.epochs + 1):
            if bad_epochs >= cfg.patience:
                break
            # ---- train one epoch ----
            model.train()
            t0 = time.perf_counter()
            losses = []
            batches = list(train_batches(split, batch_size=cfg.batch_size, rng=rng, window=cfg.window,
                                         **rule))  # a few MB
            for batch in tqdm(batches, desc=f"{cfg.model} epoch {epoch}", disable=not progress, leave=False):
                loss = train_step(step_model, batch.to(device), opt, sampler, cfg.negatives, bf16)
                losses.append(loss)
            train_s = time.perf_counter() - t0

            # ---- validate: full ranking NDCG@10 ----
            valid = evaluate(model, split, "valid", batch_size=cfg.eval_batch_size, device=device,
                             progress=progress)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "valid": valid,
                            "targets": int(sum((b.targets > 0).sum() for b in batches)),
                            "train_s": round(train_s, 3), "seconds": round(time.perf_counter() - t0, 3),
                            "lr": opt.param_groups[0]["lr"]})
            if progress:
                tqdm.write(f"{cfg.model} epoch {epoch}: loss {history[-1]['train_loss']:.4f} "
                           f"valid {VALID_METRIC} masked {valid['masked'][VALID_METRIC]:.4f} "
                           f"strict {valid['strict'][VALID_METRIC]:.4f} ({train_s:.1f}s train)")

            # ---- early stopping: keep the best weights ----
            if best_valid is None or valid["masked"][VALID_METRIC] > best_valid["masked"][VALID_METRIC]:
                best_valid, best_epoch, bad_epochs = valid, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                time_to_best = time.perf_counter() - t_start
            else:
                bad_epochs += 1
            if plateau is not None:
                plateau.step(valid["masked"][VALID_METRIC])

            # ---- save progress: the state after this epoch ----
            if out is not None:
                meta = {"history": history, "time_to_best": time_to_best, "best_valid": best_valid,
                        "best_epoch": best_epoch, "bad_epochs": bad_epochs, "elapsed": time.perf_counter() - t_start}
                _save(out, model, best_state, opt, plateau, sampler, rng, meta)
        model.load_state_dict(best_state)

    # ---- test: full ranking on the held-out last interaction ----
    test = evaluate(model, split, "test", batch_size=cfg.eval_batch_size, device=device,
                    progress=progress) if read_test else None
    epochs = [h for h in history if h["train_loss"] is not None]
    metrics = {
        "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
        "test": test, "valid": best_valid, "best_epoch": best_epoch, "epochs_run": len(history),
        "seconds_per_epoch": round(float(np.median([h["train_s"] for h in epochs])), 3) if epochs else 0.0,
        "time_to_convergence_s": round(time_to_best, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "device": str(device), "threads": torch.get_num_threads(),
        "precision": "fp32" if cfg.model == "pop" else resolve_precision(cfg.precision, device),
        "targets_per_epoch": epochs[-1]["targets"] if epochs else 0,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if getattr(model.config, "fusion", None) == "gate":
        metrics["alpha"] = alpha_stats(model, split, batch_size=cfg.eval_batch_size, device=device)

    # ---- save the run ----
    run_dir = None
    if out is not None:
        run_dir = save_run(out, model.cpu(), name=cfg.model, users=inter.users, items=inter.items,
                           dataset=cfg.dataset, metrics=metrics, history=history, train=asdict(cfg))
        clear_progress(out)
    return TrainResult(model, history, metrics, run_dir)


# ---- resuming a run --------------------------------------------------------------------------------


def _save(out, model: nn.Module, best_state: dict, opt: torch.optim.Optimizer, plateau, sampler, rng, meta: dict) -> None:
    """The state after an epoch: weights, best weights, optimiser moments, random generators."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in best_state.items()}
    opt_state = opt.state_dict()
    tensors |= {f"opt.{i}.{k}": v for i, st in opt_state["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if sampler is not None:
        tensors["rng.sampler"] = sampler.gen.get_state()
    save_progress(out, tensors, meta | {"opt_groups": opt_state["param_groups"], "numpy": rng.bit_generator.state,
                                        "plateau": plateau.state_dict() if plateau is not None else None})


def _restore(saved, model: nn.Module, opt: torch.optim.Optimizer, plateau, sampler, rng) -> tuple[dict, dict]:
    """Load what :func:`_save` wrote into the live objects; return the best weights and the JSON part."""
    tensors, meta = saved
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.load_state_dict(part("model."))
    moments: dict[int, dict] = {}
    for k, v in part("opt.").items():
        i, name = k.split(".", 1)
        moments.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": moments, "param_groups": meta["opt_groups"]})
    if plateau is not None:
        plateau.load_state_dict(meta["plateau"])
    torch.set_rng_state(tensors["rng.torch"])
    if sampler is not None:
        sampler.gen.set_state(tensors["rng.sampler"])
    rng.bit_generator.state = meta["numpy"]
    return part("best."), meta


# ---- one training step --------------------------------------------------------------------------


def train_step(model: nn.Module, batch, opt: torch.optim.Optimizer, sampler: NegativeSampler | None,
               negatives: int, bf16: bool) -> float:
    """One optimiser step of next-item cross-entropy (+ the model's auxiliary loss)."""
    device_type = batch.items.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
        has = batch.targets > 0  # (B, T)
        user, target = out.user[has], batch.targets[has]  # (N, d), (N,) only positions with a loss
        items = model.item_embeddings()  # (V, d)
        if sampler is None:
            logits = score(user, items)  # (N, V), padding column -inf
        else:
            logits, target = sampler.logits(user, items, target, negatives)  # (N, 1+K)
        loss = F.cross_entropy(logits.float(), target) + out.aux_loss.float()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


class NegativeSampler:
    """Sampled softmax: K negatives per step, shared by the whole batch, drawn with probability q.

    The positive keeps its exact logit; each negative's logit is corrected by ``-log(K q)`` (logQ),
    so the sampled denominator is an unbiased estimate of the full softmax denominator and the loss
    approaches full cross-entropy as K grows, whatever q is (uniform or popularity). Correcting the
    positive too (as some implementations do) inflates it by ``1/(K q)`` and starves rare targets of
    gradient.

    >>> s = NegativeSampler(np.array([1, 1, 2]), n_items=3, seed=0)
    >>> logits, target = s.logits(torch.ones(2, 4), torch.ones(4, 4), torch.tensor([1, 2]), negatives=5)
    >>> tuple(logits.shape), target.tolist()
    ((2, 6), [0, 0])
    """

    def __init__(self, train_items: np.ndarray, n_items: int, seed: int, power: float = 1.0,
                 device: torch.device | str = "cpu"):
        counts = np.bincount(train_items, minlength=n_items + 1).astype(np.float64)
        counts = (counts + 1.0) ** power  # +1: every item can be drawn, even if never seen in training
        counts[0] = 0.0
        self.q = torch.tensor(counts / counts.sum(), dtype=torch.float32, device=device)  # (V,)
        self.log_q = torch.log(self.q.clamp(min=1e-12))  # (V,)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def logits(self, user: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
               negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
        """user (N,d), items (V,d), target (N,) -> logits (N, 1+K) with the positive in column 0."""
        neg = torch.multinomial(self.q, negatives, replacement=True, generator=self.gen)  # (K,)
        pos = (user * items[target]).sum(-1, keepdim=True)  # (N, 1)
        neg_logits = user @ items[neg].T - (self.log_q[neg] + math.log(negatives))  # (N, K)
        hit = neg.unsqueeze(0) == target.unsqueeze(1)  # (N, K) a "negative" that is the positive
        return torch.cat([pos, neg_logits.masked_fill(hit, float("-inf"))], 1), torch.zeros_like(target)


# ---- evaluation ---------------------------------------------------------------------------------


def batch_rule(model: nn.Module) -> dict:
    """Batch geometry from the model config: what ``train_batches``/``eval_batches`` must build."""
    c = model.config
    return {"max_len": c.max_len, "gap_ms": c.gap_ms, "max_segment": c.max_segment}


def history_items(split: Split, which: str, users: np.ndarray) -> torch.Tensor:
    """Every item each user met before its ``which`` target, left-padded (B, H): what ``mask_seen``
    removes. The whole history, not only the model's last ``max_len`` items, so models with
    different input lengths are ranked over the same candidates."""
    start = split.inter.offsets[users]
    stop = getattr(split, which)[users]
    width = int((stop - start).max()) if len(users) else 0
    pos = stop[:, None] - width + np.arange(width)  # (B, H)
    return torch.from_numpy(np.where(pos >= start[:, None], split.inter.item[np.maximum(pos, 0)], 0))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, which: Literal["valid", "test"], *, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = False) -> dict[str, dict[str, float]]:
    """Full-ranking metrics of the users' ``which`` targets under each of :data:`PROTOCOLS`:
    ``{"masked": {...}, "strict": {...}}``. Both rank the same scores; ``masked`` first removes the
    user's history (every item met before the target) from the candidates."""
    model.eval()
    metrics = {p: RankingMetrics(ks=(5, 10, 20)) for p in PROTOCOLS}
    batches = list(eval_batches(split, which, batch_size=batch_size, **batch_rule(model)))
    for batch in tqdm(batches, desc=f"evaluate {which}", disable=not progress, leave=False):
        users = batch.user.numpy()
        batch = batch.to(device)
        user = model(batch).user[:, -1].float()  # (B, d) the vector after the last input item
        scores = score(user, model.item_embeddings().float())  # (B, V)
        metrics["strict"].update(scores, batch.targets[:, -1])
        metrics["masked"].update(mask_seen(scores, history_items(split, which, users).to(device)),
                                 batch.targets[:, -1])
    return {p: m.result() for p, m in metrics.items()}


@torch.no_grad()
def alpha_stats(model: nn.Module, split: Split, *, batch_size: int = 256, device: torch.device | str = "cpu",
                buckets: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict:
    """The fusion gate on the test inputs (the position that predicts the test item).

    Reports alpha over users with a long-term input (cold rows are 0 by construction, counted
    apart), and by the current segment's length in buckets starting at ``buckets``.
    """
    model.eval()
    alphas, lengths, warm = [], [], []
    for batch in eval_batches(split, "test", batch_size=batch_size, **batch_rule(model)):
        batch = batch.to(device)
        out = model(batch)
        seg = segments(batch.items, batch.seg_start)
        alphas.append(out.alpha[:, -1].float().cpu())  # (B,)
        lengths.append(seg.length[:, -1].cpu())  # (B,)
        # A long-term input exists when the current segment does not start at the first real item.
        warm.append(((seg.first[:, -1] > 0) & batch.items[torch.arange(len(batch)), seg.first[:, -1] - 1].gt(0)).cpu())
    a, n, w = torch.cat(alphas), torch.cat(lengths), torch.cat(warm)
    out = {"n": len(a), "cold_fraction": round(float(1 - w.float().mean()), 4), **_mean_std(a[w]), "by_segment_length": {}}
    edges = list(buckets) + [math.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = w & (n >= lo) & (n < hi)
        name = f"{lo}" if hi == lo + 1 else (f"{lo}-{int(hi) - 1}" if hi != math.inf else f"{lo}+")
        out["by_segment_length"][name] = {"n": int(sel.sum()), **_mean_std(a[sel])}
    return out


def _mean_std(x: torch.Tensor) -> dict:
    if len(x) == 0:
        return {"mean": None, "std": None}
    return {"mean": round(float(x.mean()), 4), "std": round(float(x.std(unbiased=False)), 4)}


def evaluate_run(run_dir: str | Path, *, device: str = "auto", inter: Interactions | None = None) -> dict:
    """Load a run, rebuild its dataset split and recompute its test metrics."""
    run: Run = load_run(run_dir)
    inter = load_dataset(run.dataset) if inter is None else inter
    if inter.users.raw != run.users.raw or inter.items.raw != run.items.raw:
        raise CheckpointError(f"{run_dir}: dataset {run.dataset!r} no longer has the ids the run was trained on")
    dev = resolve_device(device)
    return evaluate(run.model.to(dev), leave_one_out(inter), "test", device=dev)

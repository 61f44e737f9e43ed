"""Hyper-parameter search on the validation split, with the same budget for every model.

``slsrec tune --dataset ml-1m --model sasrec --trials 8`` draws ``trials`` configurations from the
model's :data:`SPACE` (seeded, so every model's search is reproducible), trains each with
``read_test=False`` (the test split is never read while tuning), and keeps each finished trial as
``<out>/<model>/trial-<k>.json`` so a search cut off resumes. The winner, by validation NDCG@10 under
the masked protocol, is what ``slsrec benchmark --tuned <out>`` trains for its final runs, which read
the test split once each.

Every model gets the same number of trials and the same training recipe (epochs cap, patience,
window, T); only the options in its space differ, and every space has the same shared axes.

>>> draws = configurations("sasrec", trials=3, seed=0)
>>> len(draws), sorted(draws[0])
(3, ['dropout', 'lr'])
>>> configurations("slsrec", trials=2, seed=0)[0].keys() >= {"lr", "dropout", "contrastive_weight"}
True
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from slsrec.checkpoint import write_json
from slsrec.errors import UserError
from slsrec.registry import MODEL_NAMES
from slsrec.train import VALID_METRIC, TrainConfig, train

SHARED = {"lr": [1e-3, 2e-3, 5e-3], "dropout": [0.1, 0.2, 0.3]}  # every model searches these
SPACE: dict[str, dict[str, list]] = {
    "gru4rec": SHARED,
    "sasrec": SHARED,
    "clsr": SHARED | {"contrastive_weight": [0.05, 0.1, 0.3]},
    "slsrec": SHARED | {"contrastive_weight": [0.05, 0.1, 0.3], "temperature": [0.1, 0.2, 0.5]},
}
TRAIN_KEYS = ("lr",)  # options of the trainer; the rest are model options


def configurations(model: str, trials: int, seed: int) -> list[dict]:
    """``trials`` distinct draws from ``model``'s space (all of it when it is smaller), in a seeded order."""
    if model not in SPACE:
        raise UserError(f"no search space for {model!r}; tunable: {', '.join(SPACE)}")
    space = SPACE[model]
    grid = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    return [grid[i] for i in np.random.default_rng(seed).permutation(len(grid))[:trials]]


def apply(base: TrainConfig, options: dict) -> TrainConfig:
    """``base`` with a configuration's trainer and model options."""
    model_options = dict(base.model_options) | {k: v for k, v in options.items() if k not in TRAIN_KEYS}
    return replace(base, **{k: v for k, v in options.items() if k in TRAIN_KEYS}, model_options=model_options)


def tune(base: TrainConfig, *, trials: int, out: Path, progress: bool = True, log=print) -> dict:
    """Run the trials not finished yet under ``out/<model>/``; return the best one (``best.json``)."""
    if base.model not in MODEL_NAMES:
        raise UserError(f"unknown model {base.model!r}; valid: {', '.join(MODEL_NAMES)}")
    folder = out / base.model
    done = []
    for k, options in enumerate(configurations(base.model, trials, base.seed)):
        path = folder / f"trial-{k}.json"
        if not path.exists():
            log(f"{base.model} trial {k}: {options}")
            res = train(apply(base, options), folder / "runs" / f"trial-{k}", progress=progress, read_test=False)
            folder.mkdir(parents=True, exist_ok=True)
            write_json(path, {"trial": k, "options": options, "valid": res.metrics["valid"],
                              "best_epoch": res.metrics["best_epoch"], "total_s": res.metrics["total_s"],
                              "train": asdict(apply(base, options))})
        done.append(json.loads(path.read_text()))
        log(f"{base.model} trial {k}: valid {VALID_METRIC} {done[-1]['valid']['masked'][VALID_METRIC]:.4f}")
    best = max(done, key=lambda t: t["valid"]["masked"][VALID_METRIC])
    write_json(folder / "best.json", best | {"trials": len(done)})
    return best


def tuned_options(out: Path, model: str) -> dict:
    """The winning options of ``model``'s search under ``out`` (what the final runs train with)."""
    path = out / model / "best.json"
    if not path.is_file():
        raise UserError(f"{path}: no finished search for {model!r}; run `slsrec tune --model {model}` first")
    return json.loads(path.read_text())["options"]

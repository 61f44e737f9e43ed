"""Runs on disk: a directory of safetensors weights and JSON, rebuilt without any training code.

A run directory holds:

- ``model.safetensors``: the weights (``state_dict``), never pickle;
- ``config.json``: ``format_version``, the model name, its config (every hyper-parameter, the session
  rule included), the session rule again for readers that do not know model configs, and the dataset;
- ``ids.json``: the user and item vocabularies, so serving translates raw ids to indices;
- ``metrics.json``: test metrics (and, for SLSRec, alpha statistics) of the run;
- ``history.json``: one record per epoch (train loss, validation metrics, seconds).

While training runs, ``progress/`` beside them holds the state after the last finished epoch (weights,
optimiser, best weights, random generators: safetensors + JSON), so a run cut off resumes at the next
epoch (:func:`save_progress`, :func:`load_progress`); it is removed when the run is saved.

>>> import tempfile, torch
>>> from slsrec.data import Vocab
>>> from slsrec.registry import build_model
>>> torch.manual_seed(0) and None
>>> model = build_model("sasrec", n_users=2, n_items=3, d=8, max_len=5)
>>> d = tempfile.mkdtemp()
>>> _ = save_run(d, model, name="sasrec", users=Vocab(["u1", "u2"], False),
...              items=Vocab(["a", "b", "c"], True), dataset="toy")
>>> run = load_run(d)
>>> run.name, run.items.index("c"), torch.equal(run.model.item_embeddings(), model.item_embeddings())
('sasrec', 3, True)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import nn

from slsrec.data import Vocab
from slsrec.errors import CheckpointError

FORMAT_VERSION = 1
PROGRESS, PROGRESS_TENSORS, PROGRESS_META = "progress", "state.safetensors", "state.json"
WEIGHTS, CONFIG, IDS, METRICS, HISTORY = "model.safetensors", "config.json", "ids.json", "metrics.json", "history.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # torch.save / pickle formats


@dataclass
class Run:
    """A loaded run: the model (in eval mode, on CPU) and what was saved with it."""

    path: Path
    model: nn.Module
    name: str  # registry name, e.g. "slsrec", "sasrec-..."
    config: dict  # the model config as saved
    session: dict  # gap_ms, max_segment, max_len: how inputs must be built for this model
    users: Vocab
    items: Vocab
    dataset: str  # what it was trained on (a dataset name or a file path)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    train: dict = field(default_factory=dict)  # the training options (seed, lr, epochs, loss, ...)


def session_rule(config) -> dict:
    """The batch geometry a model's inputs must follow, from its config dataclass."""
    return {"gap_ms": config.gap_ms, "max_segment": config.max_segment, "max_len": config.max_len}


def save_run(path: str | Path, model: nn.Module, *, name: str, users: Vocab, items: Vocab, dataset: str,
             metrics: dict | None = None, history: list | None = None, train: dict | None = None) -> Path:
    """Write a run directory (created if needed; files of an earlier run there are replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Embedding tables may share storage with other tensors (tied weights); safetensors refuses
    # shared storage, so each tensor is saved as its own contiguous copy.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION), "model": name})
    config = {"format_version": FORMAT_VERSION, "model": name, "config": dataclasses.asdict(model.config),
              "session": session_rule(model.config), "dataset": str(dataset), "train": train or {}}
    write_json(path / CONFIG, config)
    write_json(path / IDS, {"users": users.raw, "items": items.raw})
    write_json(path / METRICS, metrics or {})
    write_json(path / HISTORY, history or [])
    return path


def load_run(path: str | Path) -> Run:
    """Rebuild a run's model from its config and weights alone.

    Raises :class:`CheckpointError` naming the file for a missing directory or file, pickle files,
    an unknown ``format_version``, or weights that do not fit the config.
    """
    from slsrec.registry import build_model  # noqa: PLC0415  (registry imports every model; keep this module light)

    path = Path(path)
    if not path.is_dir():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: refusing a pickle file; a run is a directory with {WEIGHTS} + JSON")
        raise CheckpointError(f"{path}: no such run directory")
    weights = path / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{path / pickles[0]}: refusing a pickle file (loading it could run code); "
                                  f"expected {weights}")
        raise CheckpointError(f"{weights}: missing; is {path} a run directory written by `slsrec train`?")
    config = _read_json(path / CONFIG)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG}: format_version {version!r} is not supported "
                              f"(this slsrec reads {FORMAT_VERSION})")
    ids = _read_json(path / IDS)
    try:
        model = build_model(config["model"], **config["config"])
        users, items = Vocab(ids["users"], padding=False), Vocab(ids["items"], padding=True)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {CONFIG} or {IDS} lacks a field ({e})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not match {CONFIG}: {str(e).splitlines()[0]}") from None
    metrics = _read_json(path / METRICS) if (path / METRICS).exists() else {}
    history = _read_json(path / HISTORY) if (path / HISTORY).exists() else []
    return Run(path, model.eval(), config["model"], config["config"], config["session"], users, items,
               config.get("dataset", ""), metrics, history, config.get("train", {}))


def save_progress(run_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write the training state after an epoch under ``run_dir/progress/``, replacing the previous one.

    The JSON is written last, so a progress directory whose JSON names the epoch is complete."""
    path = Path(run_dir) / PROGRESS
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (PROGRESS_TENSORS + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path / PROGRESS_TENSORS)
    write_json(path / PROGRESS_META, meta)


def load_progress(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state :func:`save_progress` left in ``run_dir``, or None when there is none."""
    path = Path(run_dir) / PROGRESS
    if not (path / PROGRESS_META).is_file():
        return None
    try:
        return load_file(str(path / PROGRESS_TENSORS)), _read_json(path / PROGRESS_META)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable training progress ({e}); delete it to start the run anew") from None


def clear_progress(run_dir: str | Path) -> None:
    shutil.rmtree(Path(run_dir) / PROGRESS, ignore_errors=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file


def _read_json(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None

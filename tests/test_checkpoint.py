"""Run directories: a round trip gives identical scores; bad run directories fail with the file named."""

from __future__ import annotations

import json

import pytest
import torch

from slsrec.checkpoint import CONFIG, FORMAT_VERSION, WEIGHTS, load_run, save_run
from slsrec.data import Vocab
from slsrec.errors import CheckpointError
from slsrec.model import score
from slsrec.registry import MODEL_NAMES, build_model
from slsrec.sessions import SeqBatch

N_USERS, N_ITEMS = 5, 12


def _vocabs():
    return Vocab([f"u{i}" for i in range(N_USERS)], False), Vocab([f"item-{i}" for i in range(N_ITEMS)], True)


def _batch(seed=0, B=4, T=6) -> SeqBatch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (B, T), generator=g)
    items[0, :2] = 0  # left padding
    return SeqBatch(user=torch.arange(B), items=items, dts=torch.rand(B, T, generator=g) * 600,
                    seg_start=torch.rand(B, T, generator=g) < 0.3, targets=torch.zeros(B, T, dtype=torch.long))


def _scores(model, batch):
    model.eval()
    with torch.no_grad():
        return score(model(batch).user[:, -1], model.item_embeddings())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_round_trip_gives_identical_scores(tmp_path, name):
    torch.manual_seed(1)
    model = build_model(name, n_users=N_USERS, n_items=N_ITEMS, d=8, max_len=6)
    if name == "pop":
        model.fit(torch.randint(1, N_ITEMS + 1, (50,)))
    users, items = _vocabs()
    save_run(tmp_path / "run", model, name=name, users=users, items=items, dataset="toy",
             metrics={"test": {"NDCG@10": 0.5}}, history=[{"epoch": 1}])
    run = load_run(tmp_path / "run")
    assert run.name == name and run.dataset == "toy" and run.metrics["test"]["NDCG@10"] == 0.5
    assert run.users.raw == users.raw and run.items.index("item-3") == 4
    assert run.session == {"gap_ms": model.config.gap_ms, "max_segment": model.config.max_segment, "max_len": 6}
    batch = _batch()
    assert torch.equal(_scores(run.model, batch), _scores(model, batch))
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in (tmp_path / "run").iterdir())


def _saved(tmp_path):
    users, items = _vocabs()
    model = build_model("gru4rec", n_users=N_USERS, n_items=N_ITEMS, d=8, max_len=6)
    return save_run(tmp_path / "run", model, name="gru4rec", users=users, items=items, dataset="toy")


def test_unknown_format_version_is_refused(tmp_path):
    run = _saved(tmp_path)
    config = json.loads((run / CONFIG).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (run / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json: format_version {FORMAT_VERSION + 1}"):
        load_run(run)


def test_pickle_files_are_refused_and_named(tmp_path):
    run = _saved(tmp_path)
    (run / WEIGHTS).unlink()
    torch.save({"w": torch.zeros(2)}, run / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: refusing a pickle file"):
        load_run(run)
    with pytest.raises(CheckpointError, match=r"model\.pt: refusing a pickle file"):
        load_run(run / "model.pt")


def test_missing_run_and_missing_weights_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_run(tmp_path / "empty")


def test_corrupt_or_mismatched_weights_are_clear_errors(tmp_path):
    run = _saved(tmp_path)
    good = (run / WEIGHTS).read_bytes()
    (run / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_run(run)
    (run / WEIGHTS).write_bytes(good)
    config = json.loads((run / CONFIG).read_text())
    config["config"]["d"] = 16  # the weights are d=8
    (run / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        load_run(run)

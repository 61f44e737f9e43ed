"""Hyper-parameter search: validation only, the same budget per model, resumable, and the winner is
what the final benchmark runs train with."""

from __future__ import annotations

import json

import pytest

import slsrec.train as train_module
from slsrec.benchmark import run_benchmark
from slsrec.synthetic import WorldConfig, generate
from slsrec.train import TrainConfig
from slsrec.tune import SPACE, configurations, tune


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "clicks.csv"
    generate(WorldConfig(n_users=120, n_items=60, n_clusters=4, seed=5)).events.to_csv(path, index=False)
    return path


def test_every_model_gets_the_same_budget_and_the_same_shared_axes():
    for model in SPACE:
        draws = configurations(model, trials=4, seed=0)
        assert len(draws) == 4 and len({json.dumps(d, sort_keys=True) for d in draws}) == 4  # distinct
        assert {"lr", "dropout"} <= set(draws[0])
    assert configurations("sasrec", 4, seed=0) == configurations("sasrec", 4, seed=0)  # reproducible


def test_tuning_reads_only_validation_resumes_and_the_benchmark_uses_the_winner(clicks, tmp_path, monkeypatch):
    read, evaluate = [], train_module.evaluate

    def recorded(model, split, which, **kw):
        read.append(which)
        return evaluate(model, split, which, **kw)

    monkeypatch.setattr(train_module, "evaluate", recorded)
    base = TrainConfig(dataset=str(clicks), model="gru4rec", epochs=1, max_len=20, threads=1, model_options={"d": 8})
    best = tune(base, trials=2, out=tmp_path, progress=False, log=lambda _: None)
    assert set(read) == {"valid"}  # the test split was never read while tuning
    trials = [json.loads((tmp_path / "gru4rec" / f"trial-{k}.json").read_text()) for k in range(2)]
    assert best["valid"] == max((t["valid"] for t in trials), key=lambda v: v["masked"]["NDCG@10"])

    logs = []
    again = tune(base, trials=2, out=tmp_path, progress=False, log=logs.append)  # nothing left to train
    assert again["options"] == best["options"] and not any("{" in line for line in logs)

    read.clear()
    [result] = run_benchmark(str(clicks), seeds=1, models=["gru4rec"], out=tmp_path / "bench",
                             base=base, tuned=tmp_path, progress=False, log=lambda _: None)
    assert result["train"]["lr"] == best["options"]["lr"]
    assert result["train"]["model_options"]["dropout"] == best["options"]["dropout"]
    assert read.count("test") == 1  # the final run reads the test split once

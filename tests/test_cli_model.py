"""`slsrec train` and `slsrec evaluate` through the Typer app and through the console entry point."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from slsrec.cli import app, main
from slsrec.errors import UserError
from slsrec.synthetic import WorldConfig, generate

runner = CliRunner()


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    """A small clickstream file, as a user would bring one."""
    path = tmp_path_factory.mktemp("data") / "clicks.csv"
    generate(WorldConfig(n_users=60, n_items=40, n_clusters=4, seed=1)).events.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained_run(clicks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gru"
    result = runner.invoke(app, ["train", "--dataset", str(clicks), "--model", "gru4rec", "--out", str(out),
                                 "--epochs", "2", "--threads", "1", "--max-len", "20", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_prints_test_metrics_and_writes_a_run(trained_run):
    out, output = trained_run
    assert "best epoch" in output and "NDCG@10" in output
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "ids.json", "metrics.json",
                                               "history.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["config"]["max_len"] == 20
    assert len(json.loads((out / "history.json").read_text())) == json.loads((out / "metrics.json").read_text())["epochs_run"]


def test_evaluate_json_matches_the_saved_metrics(trained_run):
    out, _ = trained_run
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())["test"]
    printed = json.loads(result.output)
    assert set(printed) == {"masked", "strict"}  # both protocols, labelled
    for protocol in printed:
        assert printed[protocol] == pytest.approx(saved[protocol], abs=1e-12)
    assert printed["strict"]["NDCG@10"] <= printed["masked"]["NDCG@10"]  # the history competes in strict
    table = runner.invoke(app, ["evaluate", "--run", str(out)])
    row = f"NDCG@10  {saved['masked']['NDCG@10']:8.4f} {saved['strict']['NDCG@10']:8.4f}"
    assert table.exit_code == 0 and "masked" in table.output and row in table.output, table.output


def _bad_inputs(tmp_path, clicks):
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("user_id,item_id,timestamp\nu1,i1,1000\nu1,i2,yesterday-ish\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_weights = tmp_path / "run-without-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    out = str(tmp_path / "out")
    return [
        (["train", "--dataset", "ml-10m", "--model", "sasrec", "--out", out], "unknown dataset 'ml-10m'"),
        (["train", "--dataset", str(malformed), "--model", "sasrec", "--out", out],
         "row 2 (line 3), column 'timestamp'"),
        (["train", "--dataset", str(empty), "--model", "sasrec", "--out", out], "file is empty"),
        (["train", "--dataset", str(clicks), "--model", "bert4rec", "--out", out], "unknown model 'bert4rec'"),
        (["train", "--dataset", str(clicks), "--model", "sasrec", "--out", out, "--loss", "hinge"], "--loss 'hinge'"),
        (["evaluate", "--run", str(no_weights)], "model.safetensors: missing"),
        (["evaluate", "--run", str(pickled)], "model.pt: refusing a pickle file"),
    ]


def test_bad_inputs_raise_user_errors_naming_the_problem(tmp_path, clicks):
    for args, message in _bad_inputs(tmp_path, clicks):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, UserError), (args, result.output, result.exception)
        assert message in str(result.exception), (args, str(result.exception))


def test_bad_inputs_exit_2_with_one_line_and_no_traceback(tmp_path, clicks, monkeypatch, capsys):
    for args, message in _bad_inputs(tmp_path, clicks):
        monkeypatch.setattr(sys, "argv", ["slsrec", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
        assert err.count("\n") == 1, err


def test_benchmark_is_resumable_and_writes_its_report(clicks, tmp_path):
    from slsrec.benchmark import load_results, replace_section, write_benchmark_report

    out = tmp_path / "bench"
    args = ["benchmark", "--dataset", str(clicks), "--models", "pop,gru4rec", "--seeds", "1", "--epochs", "1",
            "--threads", "1", "--out", str(out), "--no-docs"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in (out / "results").iterdir()) == ["gru4rec-s0.json", "pop-s0.json"]
    (out / "results" / "gru4rec-s0.json").unlink()  # as if the run was cut off during gru4rec
    pop_run = out / "runs" / "pop-s0"
    stamp = pop_run.joinpath("metrics.json").stat().st_mtime_ns
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "pop seed 0: done earlier" in second.output and "gru4rec seed 0: training" in second.output
    assert pop_run.joinpath("metrics.json").stat().st_mtime_ns == stamp  # pop was not trained again
    assert "| gru4rec | 1 |" in second.output

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Streaming\n\nkept as is\n")
    replace_section(doc, "Training speed: levers", "old table")
    report = dict(dataset="clicks.csv", command="slsrec benchmark ...", out=out, wall_s=1.0, doc=doc,
                  img=tmp_path / "img" / "curves.png")
    write_benchmark_report(load_results(out), planned=[("pop", 0), ("gru4rec", 0), ("gru4rec", 1)], **report)
    assert "**Partial**: 2 of 3 planned" in doc.read_text() and "| gru4rec | 1 of 2 |" in doc.read_text()
    write_benchmark_report(load_results(out), planned=[("pop", 0), ("gru4rec", 0)], **report)
    text = doc.read_text()
    assert "Partial" not in text
    assert text.count("## Model quality: clicks.csv") == 1 and "kept as is" in text and "old table" in text
    assert "| pop | 1 |" in text and (tmp_path / "img" / "curves.png").stat().st_size > 1000

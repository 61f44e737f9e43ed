"""Publishing: one batched pass equals the model's per-user long-term state (unknown items skipped,
unknown users cold); `publish_run` and `slsrec publish` put the states and the model into Redis."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from slsrec.checkpoint import load_run, save_run
from slsrec.cli import app
from slsrec.data import Interactions, Vocab, load_dataset
from slsrec.errors import CheckpointError
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.publish import long_term_states, publish_run
from slsrec.registry import build_model
from slsrec.sessions import batch_from
from slsrec.settings import Settings
from slsrec.store import LongTerm, LongTermStore, VersionError
from slsrec.telemetry import setup_telemetry

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def model() -> SLSRec:
    torch.manual_seed(0)
    return SLSRec(SLSRecConfig(n_users=6, n_items=12, d=8, long_len=5)).eval()


USERS = Vocab([f"u{i}" for i in range(6)], padding=False)
ITEMS = Vocab([f"i{i}" for i in range(1, 13)], padding=True)  # i1 has index 1, ...


def _history(rows: list[tuple[str, str]]) -> Interactions:
    """(user_id, item_id) rows in time order, with vocabularies in first-seen order (not the model's)."""
    users = list(dict.fromkeys(u for u, _ in rows))
    items = list(dict.fromkeys(i for _, i in rows))
    return Interactions([users.index(u) for u, _ in rows], [items.index(i) + 1 for _, i in rows],
                        np.arange(len(rows)) * 1000, Vocab(users, padding=False), Vocab(items, padding=True))


def _one(model, user: str, items: list[str]) -> LongTerm:
    """The model's long-term state for one user, unpadded and unbatched."""
    batch = batch_from([([ITEMS.index(i) for i in items], range(len(items)))], users=[USERS.index(user)])
    with torch.no_grad():
        state = model.long_state(batch)
    return LongTerm(state.mean[0].numpy(), float(state.log_z[0]), int(state.n[0]))


def _assert_close(got: LongTerm, expected: LongTerm) -> None:
    assert got.vector.dtype == np.float32 and np.isfinite(got.log_norm)
    np.testing.assert_allclose(got.vector, expected.vector, atol=1e-6)
    np.testing.assert_allclose(got.log_norm, expected.log_norm, atol=1e-5)
    assert got.n_items == expected.n_items


def test_batched_vectors_equal_the_per_user_answer(model):
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": [f"i{k}" for k in rng.integers(1, 13, size=n)] for u, n in enumerate([1, 3, 5, 9, 20, 2])}
    rows = [(u, i) for u, items in seqs.items() for i in items]
    rng.shuffle(rows)  # interleaved users; per-user order is what counts
    per_user = {u: [i for v, i in rows if v == u] for u in seqs}
    states = long_term_states(model, USERS, ITEMS, _history(rows), batch_size=4)  # 2 batches, mixed padding

    assert sorted(states) == sorted(seqs)
    for user, items in per_user.items():
        _assert_close(states[user], _one(model, user, items[-model.config.long_len:]))  # only the L most recent


def test_unknown_items_are_skipped_and_unknown_users_get_no_vector(model):
    rows = [("u1", "i3"), ("u1", "brand-new"), ("u1", "i4"), ("u2", "brand-new"), ("stranger", "i3")]
    states = long_term_states(model, USERS, ITEMS, _history(rows))
    assert sorted(states) == ["u1"]  # u2 knows only an unknown item; stranger has no user embedding
    _assert_close(states["u1"], _one(model, "u1", ["i3", "i4"]))


def test_models_without_long_term_states_are_refused():
    with pytest.raises(CheckpointError, match="no long-term state"):
        long_term_states(build_model("sasrec", 6, 12, d=8), USERS, ITEMS, _history([("u1", "i3")]))


@pytest.fixture
def run_dir(tmp_path, model) -> Path:
    """A saved run whose training data is a small CSV clickstream (u5 never clicked)."""
    rows = ["user_id,item_id,timestamp"] + [f"u{u},i{1 + (u * 7 + k) % 12},{1_700_000_000_000 + k * 60_000}"
                                            for u in range(5) for k in range(3 + u)]
    data = tmp_path / "clicks.csv"
    data.write_text("\n".join(rows) + "\n")
    return save_run(tmp_path / "run", model, name="slsrec", users=USERS, items=ITEMS, dataset=str(data))


@pytest.mark.integration
@pytest.mark.redis_cluster
def test_publish_run_writes_vectors_and_a_loadable_model(run_dir, redis_db, tmp_path):
    store = LongTermStore(redis_db)
    spans = InMemorySpanExporter()
    report = publish_run(run_dir, store, telemetry=setup_telemetry(Settings(), "test", span_exporter=spans))
    version = report.result.version
    assert store.current_version() == version and report.result.n_users == 5
    [span] = spans.get_finished_spans()
    assert (span.name, span.attributes["slsrec.version"], span.attributes["slsrec.users"]) == \
        ("slsrec.publish", version, 5)

    expected = long_term_states(load_run(run_dir).model, USERS, ITEMS, load_dataset(run_dir.parent / "clicks.csv"))
    got = store.get_many(version, [f"u{u}" for u in range(6)])
    assert got[5] is None  # u5 has no history: cold start
    for u in range(5):  # exact: the vector and the log-normaliser travel as float32
        assert got[u].n_items == expected[f"u{u}"].n_items == min(3 + u, 5)  # long_len=5 caps u3, u4
        assert np.array_equal(got[u].vector, expected[f"u{u}"].vector) and got[u].log_norm == expected[f"u{u}"].log_norm
    assert store.meta(version)["run"] == str(run_dir)

    # The version carries the model: a reader rebuilds it from Redis alone.
    copy = tmp_path / "from-redis"
    copy.mkdir()
    for name, data in store.model_files(version).items():
        (copy / name).write_bytes(data)
    assert torch.equal(load_run(copy).model.item_embeddings(), load_run(run_dir).model.item_embeddings())


@pytest.mark.integration
@pytest.mark.redis_cluster
def test_publish_command(run_dir, redis_db):
    env = {"SLSREC_REDIS_URL": redis_db}
    first = runner.invoke(app, ["publish", "--run", str(run_dir)], env=env)
    assert first.exit_code == 0, first.output
    assert re.search(r"published v000001-\d{8}T\d{6}Z to Redis 127\.0\.0\.1:\d+ \(replacing nothing\): 5 users, dim 8",
                     first.output)
    second = runner.invoke(app, ["publish", "--run", str(run_dir), "--version", "v7-manual"], env=env)
    assert "published v7-manual" in second.output and "replacing v000001-" in second.output
    assert LongTermStore(redis_db).current_version() == "v7-manual"

    stale = runner.invoke(app, ["publish", "--run", str(run_dir), "--version", "v3"], env=env)
    assert isinstance(stale.exception, VersionError) and "not newer" in str(stale.exception)
    missing = runner.invoke(app, ["publish", "--run", str(run_dir.parent / "nope")], env=env)
    assert isinstance(missing.exception, CheckpointError) and "no such run directory" in str(missing.exception)

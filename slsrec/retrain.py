"""Periodic retraining (``slsrec retrain``): read :meth:`Retrainer.cycle` top to bottom.

One cycle: ingest new sessions (:mod:`slsrec.history`) -> load the history (base training data plus
recorded sessions) -> warm-start from the current model -> train a few epochs -> evaluate current
and candidate on the same held-out recent slice (each user's most recent event, full ranking, as
:func:`slsrec.train.evaluate`) -> refuse a candidate whose NDCG@10 is below the current one's by
more than ``margin``, or publish it as a new version (:func:`slsrec.publish.publish_run`: long-term
vectors of every user with history plus the model files, then the atomic switch; the replaced
version expires after ``grace_s``).

The current model is the run named by the current version's ``meta["run"]`` (rebuilt from the
model files in Redis when that directory is not on this machine, see :func:`version_run_dir`), or,
before anything is published, the latest run under ``runs_dir`` that can publish long-term vectors.

Warm start: the candidate has the current model's configuration and weights; embedding tables grow
for users and items first seen in the recorded sessions (their rows start from the fresh
initialisation, :func:`grow_into`). The current model is evaluated the same way, so both rank the
same item set.

A drift alert (or anything else) asks for a retrain with :meth:`Retrainer.request`; with
``--on-drift`` the loop itself watches topic ``drift``.

>>> parse_every("30m"), parse_every("1h"), parse_every("1d")
(1800.0, 3600.0, 86400.0)
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from slsrec.checkpoint import CONFIG, METRICS, WEIGHTS, load_run
from slsrec.data import load_dataset
from slsrec.errors import CheckpointError, UserError
from slsrec.history import IngestStats, ingest_sessions, load_history
from slsrec.publish import publish_run
from slsrec.registry import build_model
from slsrec.serving import version_run_dir
from slsrec.sessions import leave_one_out
from slsrec.settings import Settings
from slsrec.store import LongTermStore
from slsrec.telemetry import Telemetry, setup_telemetry
from slsrec.train import VALID_METRIC, TrainConfig, evaluate, resolve_device, train

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> float:
    """Seconds in ``30m``, ``1h``, ``1d`` (or ``45s``).

    >>> parse_every("1 week")
    Traceback (most recent call last):
    ...
    slsrec.errors.UserError: --every '1 week': expected a number and a unit s, m, h or d, e.g. 30m, 1h, 1d
    """
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m or int(m.group(1)) == 0:
        raise UserError(f"--every {text!r}: expected a number and a unit s, m, h or d, e.g. 30m, 1h, 1d")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class RetrainConfig:
    """Options of one retrain cycle (the model's own hyper-parameters come from the current run)."""

    epochs: int = 3  # from a warm start a few epochs suffice; the best on validation is kept
    margin: float = 0.01  # refuse a candidate whose NDCG@10 is below the current one's minus this
    grace_s: float = 3600.0  # how long the replaced version stays readable
    batch_size: int = 128
    lr: float = 1e-3
    loss: Literal["full", "sampled"] = "full"
    max_len: int | None = None  # override the sequence length T (shorter = faster epochs)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default


@dataclass
class CycleResult:
    """What one cycle did and why; ``to_dict()`` is what goes into the candidate's ``metrics.json``."""

    outcome: Literal["published", "refused", "skipped"]
    reason: str
    warm_start: str | None = None  # the run the candidate started from
    current_version: str | None = None  # current when the cycle started
    candidate: str | None = None  # the candidate's run directory
    version: str | None = None  # the published version
    metric: str = VALID_METRIC
    margin: float = 0.0
    current_metrics: dict = field(default_factory=dict)  # on the recent slice
    candidate_metrics: dict = field(default_factory=dict)
    users: int = 0  # with history
    events: int = 0  # in the history
    vectors: int = 0  # published
    vectors_per_s: float = 0.0  # Redis write + switch
    ingest: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # ingest, load, train, evaluate, publish, total

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log and the terminal."""
        if self.outcome == "skipped":
            return f"retrain skipped: {self.reason}"
        m, cur, cand = self.metric, self.current_metrics.get(self.metric), self.candidate_metrics.get(self.metric)
        scores = f"{m} candidate {cand:.4f} vs current {cur:.4f} (margin {self.margin:g})"
        took = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        if self.outcome == "refused":
            return (f"retrain REFUSED: {self.reason}; {self.current_version or 'nothing published'} stays current; "
                    f"candidate kept in {self.candidate} ({took})")
        return (f"retrain published {self.version} (replacing {self.current_version or 'nothing'}): {scores}; "
                f"{self.vectors:,} vectors at {self.vectors_per_s:,.0f}/s; {self.events:,} events of "
                f"{self.users:,} users; warm start from {self.warm_start}; {took}")


# ---- the current model -----------------------------------------------------------------------------


def latest_run(runs_dir: str | Path) -> Path | None:
    """The newest run under ``runs_dir`` with a long-term encoder (an SLSRec), not a refused candidate."""
    found = []
    for weights in Path(runs_dir).glob(f"*/{WEIGHTS}"):
        try:
            config = json.loads((weights.parent / CONFIG).read_text())
            metrics = json.loads((weights.parent / METRICS).read_text()) if (weights.parent / METRICS).exists() else {}
        except (OSError, json.JSONDecodeError):
            continue  # not a complete run; load_run would say why if it were chosen
        if "long_len" in config.get("config", {}) and metrics.get("retrain", {}).get("outcome") != "refused":
            found.append((weights.stat().st_mtime, weights.parent))
    return max(found)[1] if found else None


@torch.no_grad()
def grow_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a previous model's weights into ``model``; tables that grew along the first dimension
    (new users or items) keep their fresh rows after the old ones.

    >>> torch.manual_seed(0) and None
    >>> old, new = nn.Embedding(2, 3), nn.Embedding(4, 3)
    >>> grow_into(new, old.state_dict())
    >>> torch.equal(new.weight[:2], old.weight), new.weight.shape[0]
    (True, 4)
    """
    own = model.state_dict()  # shares storage with the parameters
    for name, old in state.items():
        new = own.get(name)
        if new is not None and new.shape == old.shape:
            new.copy_(old)
        elif new is not None and new.dim() and new.shape[1:] == old.shape[1:] and new.shape[0] >= old.shape[0]:
            new[: old.shape[0]].copy_(old)
        else:
            got = "missing" if new is None else tuple(new.shape)
            raise CheckpointError(f"warm start: {name} of shape {tuple(old.shape)} does not fit the new model ({got})")


# ---- the loop ----------------------------------------------------------------------------------------


class Retrainer:
    """Runs retrain cycles, once, on a schedule, or when asked (:meth:`request`).

    Parameters
    ----------
    settings
        Kafka (topic ``sessions``), Redis, ``history_dir``, ``runs_dir``.
    config
        Epochs, margin, grace period, training options.
    base
        Base training data (a dataset name or file) [default: the current run's dataset].
    store, telemetry
        Injected in tests; built from ``settings`` otherwise.
    """

    def __init__(self, settings: Settings, config: RetrainConfig | None = None, *, base: str | None = None,
                 store: LongTermStore | None = None, telemetry: Telemetry | None = None):
        self.settings = settings
        self.config = config or RetrainConfig()
        self.base = base
        self.store = store or LongTermStore(settings.redis_url)
        self.telemetry = telemetry or setup_telemetry(settings, "slsrec-retrain")
        self._requested = threading.Event()
        self._reasons: list[str] = []
        self._lock = threading.Lock()

    def request(self, reason: str = "requested") -> None:
        """Ask for a cycle as soon as possible, e.g. from a drift alert; thread-safe, returns at once."""
        with self._lock:
            self._reasons.append(reason)
            self._requested.set()
        log.info("retrain requested: %s", reason)

    def cycle(self, force: bool = True) -> CycleResult:
        """One full cycle; with ``force=False`` it is skipped when no new session was ingested."""
        cfg, settings, t0 = self.config, self.settings, time.perf_counter()
        seconds: dict[str, float] = {}
        with self.telemetry.retrain_span(margin=cfg.margin, epochs=cfg.epochs) as span:
            # ---- ingest the sessions recorded since the last cycle ----
            t = time.perf_counter()
            ingest: IngestStats = ingest_sessions(settings)
            seconds["ingest"] = time.perf_counter() - t
            ingested = {"sessions": ingest.sessions, "events": ingest.events, "bad": sum(ingest.bad.values()),
                        "bad_reasons": dict(ingest.bad), "files": len(ingest.files)}
            if not force and ingest.events == 0:
                result = CycleResult("skipped", "no new sessions since the last cycle", ingest=ingested,
                                     seconds=_rounded(seconds, t0))
                return self._finish(result, span)

            # ---- the current model and the history in its index space ----
            t = time.perf_counter()
            current_version = self.store.current_version()
            run_dir = (version_run_dir(self.store, current_version, settings.runs_dir) if current_version
                       else latest_run(settings.runs_dir))
            if run_dir is None:
                raise UserError(f"nothing to retrain: no version in Redis at {self.store.location} and no SLSRec "
                                f"run under {settings.runs_dir}; train one with `slsrec train --out "
                                f"{settings.runs_dir}/NAME`")
            current = load_run(run_dir)
            if not hasattr(current.model, "long_term"):
                raise CheckpointError(f"{run_dir}: a {current.name} model has no long-term vectors to publish")
            history = load_history(settings.history_dir, base=load_dataset(self.base or current.dataset))
            seconds["load"] = time.perf_counter() - t
            log.info("history: %d events of %d users (%d items); warm start from %s",
                     len(history), history.n_users, history.n_items, run_dir)

            # ---- candidate: warm start, a few epochs ----
            t = time.perf_counter()
            options = {k: v for k, v in current.config.items() if k not in ("n_users", "n_items")}
            tcfg = TrainConfig(dataset=current.dataset, model=current.name, epochs=cfg.epochs, patience=cfg.epochs,
                               batch_size=cfg.batch_size, lr=cfg.lr, loss=cfg.loss, max_len=cfg.max_len,
                               seed=cfg.seed, device=cfg.device, threads=cfg.threads, model_options=options)
            state = current.model.state_dict()
            stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:4]}"  # unique per cycle
            out = Path(settings.runs_dir) / f"retrain-{stamp}"
            res = train(tcfg, out, inter=history, progress=False, warm_start=partial(grow_into, state=state))
            seconds["train"] = time.perf_counter() - t

            # ---- current model on the same recent slice (each user's most recent event) ----
            t = time.perf_counter()
            torch.manual_seed(cfg.seed)  # the same fresh rows for new ids as the candidate started from
            baseline = build_model(current.name, n_users=history.n_users, n_items=history.n_items,
                                   **options | ({"max_len": cfg.max_len} if cfg.max_len else {}))
            grow_into(baseline, state)
            device = resolve_device(cfg.device)
            cur = evaluate(baseline.to(device), leave_one_out(history), "test", device=device)["masked"]
            cand = res.metrics["test"]["masked"]
            seconds["evaluate"] = time.perf_counter() - t

            # ---- decide ----
            floor = cur[VALID_METRIC] - cfg.margin
            ok = cand[VALID_METRIC] >= floor
            verdict = ">=" if ok else "<"
            reason = (f"candidate {VALID_METRIC} {cand[VALID_METRIC]:.4f} {verdict} current "
                      f"{cur[VALID_METRIC]:.4f} - margin {cfg.margin:g} = {floor:.4f}")
            result = CycleResult("published" if ok else "refused", reason, warm_start=str(run_dir),
                                 current_version=current_version, candidate=str(out), margin=cfg.margin,
                                 current_metrics=cur, candidate_metrics=cand, events=len(history),
                                 users=int((np.diff(history.offsets) > 0).sum()), ingest=ingested)
            if not ok:
                result.seconds = _rounded(seconds, t0)
                _record(out, result)  # before anything else: a refused run is never picked as "latest"
                return self._finish(result, span)

            # ---- publish: vectors + model files, atomic switch, old versions expire ----
            t = time.perf_counter()
            version = self.store.new_version()
            result.version = version
            result.seconds = _rounded(seconds, t0)
            _record(out, result)  # the published metrics.json says why this version was accepted
            with self.telemetry.publish_span(version, run=str(out)):
                report = publish_run(out, self.store, version=version, history=history, grace_s=cfg.grace_s,
                                     device=settings.torch_device())
            seconds["publish"] = time.perf_counter() - t
            result.vectors, result.vectors_per_s = report.result.n_users, round(report.result.vectors_per_s, 1)
            result.seconds = _rounded(seconds, t0)
            _record(out, result)
            return self._finish(result, span)

    def _finish(self, result: CycleResult, span) -> CycleResult:
        span.set_attribute("slsrec.retrain.outcome", result.outcome)
        if result.version:
            span.set_attribute("slsrec.version", result.version)
        self.telemetry.retrain_runs.add(1, {"outcome": result.outcome})
        (log.warning if result.outcome == "refused" else log.info)("%s", result.summary())
        return result

    def run(self, every_s: float, *, watch_drift: bool = False, max_cycles: int | None = None,
            stop: threading.Event | None = None) -> None:
        """Cycle now and then every ``every_s`` (sooner when :meth:`request` is called) until ``stop``.

        A scheduled cycle with nothing new ingested is skipped; a requested one always runs. A cycle
        that fails on a service or input error is logged and the loop goes on.
        """
        stop = stop or threading.Event()
        watcher = _DriftWatcher(self.settings, self) if watch_drift else None
        n, forced = 0, True
        try:
            while not stop.is_set():
                try:
                    self.cycle(force=forced)
                except UserError as e:
                    log.error("retrain cycle failed: %s", e)
                n += 1
                if max_cycles is not None and n >= max_cycles:
                    break
                # ---- wait for the schedule, a request (one made during the cycle counts) or stop ----
                deadline = time.monotonic() + every_s
                while not stop.is_set() and not self._requested.is_set() and time.monotonic() < deadline:
                    wait_s = min(1.0, max(0.0, deadline - time.monotonic()))
                    if watcher is not None:
                        watcher.poll(wait_s)
                    else:
                        self._requested.wait(wait_s)
                with self._lock:
                    forced = bool(self._reasons)
                    if forced:
                        log.info("retrain now: %s", "; ".join(self._reasons))
                    self._reasons.clear()
                    self._requested.clear()
        finally:
            if watcher is not None:
                watcher.close()


class _DriftWatcher:
    """Turns each ``DriftAlert`` on topic ``drift`` into :meth:`Retrainer.request` (new alerts only)."""

    def __init__(self, settings: Settings, retrainer: Retrainer):
        from confluent_kafka import Consumer

        self.topic, self.retrainer = settings.topic_drift, retrainer
        self.consumer = Consumer(settings.kafka_config() | {"group.id": "slsrec-retrain-drift",
                                                            "auto.offset.reset": "latest"})
        self.consumer.subscribe([self.topic])

    def poll(self, timeout_s: float) -> None:
        from pydantic import ValidationError

        from schemas.drift import DriftAlert, HealthEvent

        msg = self.consumer.poll(timeout_s)
        if msg is None or msg.error() is not None:
            return
        with contextlib.suppress(ValidationError):
            HealthEvent.model_validate_json(msg.value() or b"")
            return  # the flow's degraded mode: nothing a retrain would fix
        try:
            alert = DriftAlert.model_validate_json(msg.value() or b"")
        except ValidationError as e:
            log.warning("topic %s offset %d: not a DriftAlert (%s); ignored", self.topic, msg.offset(),
                        e.errors()[0]["msg"])
            return
        self.retrainer.request(f"drift alert: {alert.detector} on {alert.signal} (worker {alert.worker_id})")

    def close(self) -> None:
        self.consumer.close()


def _rounded(seconds: dict[str, float], t0: float) -> dict[str, float]:
    return {k: round(v, 3) for k, v in seconds.items()} | {"total": round(time.perf_counter() - t0, 3)}


def _record(run_dir: Path, result: CycleResult) -> None:
    """Add the cycle's decision to the candidate's ``metrics.json`` (published with the model)."""
    path = run_dir / METRICS
    metrics = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(metrics | {"retrain": result.to_dict()}, indent=1) + "\n")

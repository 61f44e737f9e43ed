"""``make demo``: the whole system end to end on this machine, then everything it started is stopped.

Steps: start local Kafka and Redis -> train a small SLSRec on the synthetic world if ``runs/demo`` is
missing -> publish its long-term vectors -> start the flow -> replay the bundled clickstream ->
collect what came out of Kafka -> print a summary. The publisher, flow and replay run as the same
command lines that ``docker-compose.yml`` runs (:data:`slsrec.local.APP_COMMANDS`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slsrec import local
from slsrec.errors import ServiceError
from slsrec.settings import Settings

DEMO_EPOCHS = 8  # enough for the synthetic world's planted structure; about a minute on 2 cores
FLOW_READY_TIMEOUT_S = 120.0
COLLECT_TIMEOUT_S = 180.0


@dataclass
class Collected:
    """What the demo read back from Kafka for the replayed events."""

    clicks: dict[str, int] = field(default_factory=dict)  # event_id -> produce time (ms)
    recommendations: list[dict] = field(default_factory=list)
    rec_produce_ms: list[int] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)

    def latencies_ms(self) -> np.ndarray:
        """Event produce time -> recommendation produce time, per recommendation."""
        pairs = [(self.clicks.get(r["event_id"]), t) for r, t in zip(self.recommendations, self.rec_produce_ms)]
        return np.array([t - c for c, t in pairs if c is not None], dtype=float)


def run_demo(settings: Settings, *, epochs: int = DEMO_EPOCHS, keep_services: bool = False) -> None:
    """Run the demo; stop the flow, and the services the demo started unless ``keep_services``."""
    if keep_services:
        local.up(settings, adopt=True)
    with local.session(settings) as statuses:
        started = [s.name for s in statuses if s.started]
        _say(f"services: Kafka {settings.kafka_bootstrap} and Redis answer (started now: {', '.join(started) or 'none'})")
        flow = None
        try:
            _ensure_run(epochs)
            _run(local.APP_COMMANDS["publisher"])
            start = _end_offsets(settings)
            flow = _start_flow()
            _run(local.APP_COMMANDS["replay"])
            n_events = sum(1 for _ in open(local.ROOT / local.SAMPLE_CLICKS))
            got = _collect(settings, start, n_events)
            _summarise(n_events, got)
        finally:
            if flow is not None:
                _stop(flow)


def _ensure_run(epochs: int) -> None:
    run = local.ROOT / local.DEMO_RUN
    if (run / "model.safetensors").exists():
        _say(f"model: {local.DEMO_RUN} exists (delete it to retrain)")
        return
    _say(f"model: training SLSRec on the synthetic world for up to {epochs} epochs -> {local.DEMO_RUN}")
    _run(("slsrec", "train", "--dataset", "synthetic", "--model", "slsrec", "--out", local.DEMO_RUN,
          "--epochs", str(epochs)))


def _start_flow() -> subprocess.Popen:
    """Start `slsrec serve` and wait for its 'serving' log line (the model is loaded by then)."""
    _say("flow: " + " ".join(local.APP_COMMANDS["flow"]))
    log_path = local.LOG / "demo-flow.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(_argv(local.APP_COMMANDS["flow"]), cwd=local.ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + FLOW_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"the flow exited with {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if "serving " in log_path.read_text():
            time.sleep(2.0)  # the Kafka source assigns its partitions right after
            return proc
        time.sleep(0.5)
    _stop(proc)
    raise ServiceError(f"the flow did not start within {FLOW_READY_TIMEOUT_S:.0f} s; log {log_path}")


def _end_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    """Current end offset of every partition of the topics the demo reads back."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(settings.kafka_config() | {"group.id": "slsrec-demo", "enable.auto.commit": False})
    try:
        out = {}
        for topic in (settings.topic_clicks, settings.topic_recommendations, settings.topic_dlq):
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            out[topic] = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        return out
    finally:
        c.close()


def _collect(settings: Settings, start: dict[str, dict[int, int]], n_events: int) -> Collected:
    """Read clicks, recommendations and dead letters produced after ``start`` until all events are
    accounted for (a recommendation or a dead letter each) or the timeout passes."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(settings.kafka_config() | {"group.id": "slsrec-demo", "enable.auto.commit": False})
    c.assign([TopicPartition(t, p, o) for t, parts in start.items() for p, o in parts.items()])
    got = Collected()
    deadline = time.monotonic() + COLLECT_TIMEOUT_S
    try:
        while time.monotonic() < deadline and len(got.recommendations) + len(got.dead_letters) < n_events:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            value, ts = json.loads(msg.value()), msg.timestamp()[1]
            if msg.topic() == settings.topic_clicks:
                got.clicks[value["event_id"]] = ts
            elif msg.topic() == settings.topic_recommendations:
                got.recommendations.append(value)
                got.rec_produce_ms.append(ts)
            else:
                got.dead_letters.append(value)
    finally:
        c.close()
    return got


def _summarise(n_events: int, got: Collected) -> None:
    lat = got.latencies_ms()
    recs = got.recommendations
    cold = sum(r["cold_start"] for r in recs)
    unknown = sum(r.get("unknown_item", False) for r in recs)
    print("\n=== demo summary ===")
    print(f"events in            {n_events}")
    print(f"recommendations out  {len(recs)}  (cold start {cold}, unknown item {unknown})")
    print(f"dead letters         {len(got.dead_letters)}")
    if len(lat):
        p50, p99 = np.percentile(lat, [50, 99])
        print(f"latency p50 / p99    {p50:.0f} ms / {p99:.0f} ms  (click produced -> recommendation produced;"
              f" the whole file is replayed as one burst)")
    warm = [r for r in recs if not r["cold_start"]]
    for r in (warm or recs)[:: max(1, len(warm or recs) // 3)][:3]:
        items = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in r["items"][:5])
        print(f"user {r['user_id']:<8} alpha {r['alpha']:.2f}  model {r['model_version']}  top: {items}")
    if len(recs) + len(got.dead_letters) < n_events:
        raise ServiceError(f"only {len(recs) + len(got.dead_letters)} of {n_events} events came out of the flow "
                           f"within {COLLECT_TIMEOUT_S:.0f} s (flow log: {local.LOG / 'demo-flow.log'})")


def _argv(command: tuple[str, ...]) -> list[str]:
    """The venv's own `slsrec`, so the demo works without an activated environment."""
    exe = shutil.which(command[0], path=str(Path(sys.executable).parent)) or command[0]
    return [exe, *command[1:]]


def _run(command: tuple[str, ...]) -> None:
    _say(" ".join(command))
    code = subprocess.call(_argv(command), cwd=local.ROOT)
    if code:
        raise ServiceError(f"`{' '.join(command)}` exited with {code}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT lets Bytewax finish its epoch and snapshot; SIGKILL only if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:])


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)

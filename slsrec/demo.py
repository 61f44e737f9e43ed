"""``make demo``: the whole system end to end on this machine, then everything it started is stopped.

Steps: start local Kafka and Redis -> train a small SLSRec on the synthetic world if ``runs/demo`` is
missing -> publish its long-term vectors -> start the flow and the API (``slsrec api``: its URL and a
``curl`` line are printed) -> replay the bundled clickstream ->
collect what came out of Kafka -> print a summary. Then the long-term loop: one retrain cycle
(``slsrec retrain --once`` on the sessions the flow recorded) publishes a new version, which the
running flow adopts without a restart -> replay a second clickstream whose users' tastes have
changed -> print the recommendations per version and the drift alerts read from topic ``drift``.
With ``--keep-services`` the flow and the API stay up until Ctrl-C, for the live page. The publisher, flow and replay run as the same command lines that ``docker-compose.yml`` runs
(:data:`slsrec.local.APP_COMMANDS`).

The second clickstream, ``data/clicks.drift.jsonl``, is written by::

    python -m slsrec.synthetic --drift-sample data/clicks.drift.jsonl

>>> RETRAIN[:3]
('slsrec', 'retrain', '--once')
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slsrec import local
from slsrec.errors import ServiceError
from slsrec.health import probe
from slsrec.settings import Settings
from slsrec.supervise import NO_RESTART, Supervisor

DEMO_EPOCHS = 8  # enough for the synthetic world's planted structure; about a minute on 2 cores
FLOW_READY_TIMEOUT_S = 120.0
COLLECT_TIMEOUT_S = 180.0
SWITCH_TIMEOUT_S = 60.0
DRIFT_CLICKS = "data/clicks.drift.jsonl"
# One short cycle: a warm start needs few updates, and the demo must stay within minutes on 2 cores.
# The margin is wide because one epoch on shorter sequences may cost a little NDCG; the demo shows the switch.
RETRAIN = ("slsrec", "retrain", "--once", "--epochs", "1", "--max-len", "20", "--loss", "sampled", "--margin", "0.05")


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
    """Run the demo; stop the flow and the API, and the services the demo started unless ``keep_services``
    (then the flow and the API stay up until Ctrl-C)."""
    from slsrec.store import LongTermStore

    if keep_services:
        local.up(settings, adopt=True)
    with local.session(settings) as statuses, _isolated(settings) as settings:
        started = [s.name for s in statuses if s.started]
        _say(f"services: Kafka {settings.kafka_bootstrap} and Redis answer (started now: {', '.join(started) or 'none'});"
             f" this run's topics: {settings.topic_clicks}, {settings.topic_recommendations}, ...")
        store = LongTermStore(settings.redis_url)
        flow = api = None
        try:
            _ensure_run(epochs)
            _run(local.APP_COMMANDS["publisher"])
            v1 = store.current_version()
            start = _end_offsets(settings)
            flow = _start_flow()
            api = _start_api(settings)
            _run(local.APP_COMMANDS["replay"])
            n_events = _lines(local.SAMPLE_CLICKS)
            got = _collect(settings, start, n_events)
            _summarise(n_events, got)
            _show_api(settings, got)
            first_alerts = _drift_alerts(settings, start[settings.topic_drift])

            _say("the long-term loop: one retrain cycle on the sessions the flow recorded")
            _run(RETRAIN)
            v2 = store.current_version()
            if v2 == v1:
                _say(f"the candidate was refused (see above): {v1} stays current, so there is no switch to show")
            else:
                _say(f"published {v2}; waiting for the running flow to adopt it (no restart)")
                _say(_wait_for_switch(v2))
            second = _end_offsets(settings)
            _run(("slsrec", "replay", DRIFT_CLICKS, "--as-fast-as-possible"))
            n_drift = _lines(DRIFT_CLICKS)
            got2 = _collect(settings, second, n_drift)
            _summarise(n_drift, got2, title="second replay: users whose tastes changed")
            _loop_summary(got, got2, _drift_alerts(settings, start[settings.topic_drift]), first_alerts)
            if keep_services:
                _show_api(settings, got2)
                _say("the flow and the API stay up until Ctrl-C (replay more: slsrec replay data/clicks.sample.jsonl)")
                _wait_for_ctrl_c()
        finally:
            if api is not None:
                stop_flow(api)
            if flow is not None:
                flow.stop()


@contextmanager
def _isolated(settings: Settings) -> Iterator[Settings]:
    """This run's own topics, recovery and history directories, so one demo run never resumes or
    de-duplicates against the state of an earlier one. The child commands get them through the
    environment (``SLSREC_*``), so their command lines stay those of docker-compose.yml."""
    tag = time.strftime("demo-%Y%m%dT%H%M%S")
    with local.scratch_topics(settings, f"{tag}.") as scratch:
        scratch = scratch.model_copy(update={"recovery_dir": local.VAR / tag / "recovery",
                                             "health_dir": local.VAR / tag / "health",
                                             "history_dir": local.VAR / tag / "history"})
        env = scratch.to_env()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield scratch
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(local.VAR / tag, ignore_errors=True)


def _lines(path: str) -> int:
    with open(local.ROOT / path) as f:
        return sum(1 for _ in f)


def _ensure_run(epochs: int) -> None:
    run = local.ROOT / local.DEMO_RUN
    if (run / "model.safetensors").exists():
        _say(f"model: {local.DEMO_RUN} exists (delete it to retrain)")
        return
    _say(f"model: training SLSRec on the synthetic world for up to {epochs} epochs -> {local.DEMO_RUN}")
    _run(("slsrec", "train", "--dataset", "synthetic", "--model", "slsrec", "--out", local.DEMO_RUN,
          "--epochs", str(epochs)))


def _start_flow() -> Supervisor:
    """Start `slsrec serve` under the supervisor (restarted if it dies, as systemd and compose do) and
    wait until `slsrec health --ready` would pass."""
    _say("flow: " + " ".join(local.APP_COMMANDS["flow"]) + " (supervised)")
    log_path = local.LOG / "demo-flow.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")
    sup = Supervisor(_argv(local.APP_COMMANDS["flow"]), log_path=log_path)
    sup.keep_running()
    settings = Settings()  # the demo's scratch folders come through the environment
    deadline = time.monotonic() + FLOW_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if sup.proc.poll() in (0, NO_RESTART):  # ended for good: no restart is coming
            raise ServiceError(f"the flow exited with {sup.proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if probe(settings.health_dir, settings.health_max_age_s, ready=True)[0]:
            return sup
        time.sleep(0.5)
    sup.stop()
    raise ServiceError(f"the flow did not start within {FLOW_READY_TIMEOUT_S:.0f} s; log {log_path}")


def _start_api(settings: Settings) -> subprocess.Popen:
    """Start `slsrec api` (log: var/log/demo-api.log) and wait until it is ready."""
    from slsrec.api import wait_ready

    _say("api: " + " ".join(local.APP_COMMANDS["api"]))
    log_path = local.LOG / "demo-api.log"
    proc = subprocess.Popen(_argv(local.APP_COMMANDS["api"]), cwd=local.ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(_api_url(settings), proc, log_path)
    except ServiceError:
        stop_flow(proc)
        raise
    return proc


def _api_url(settings: Settings) -> str:
    return f"http://{settings.api_host}:{settings.api_port}"


def _show_api(settings: Settings, got: Collected) -> None:
    """The API's URL and one curl line for a user of the replay."""
    url = _api_url(settings)
    user = got.recommendations[-1]["user_id"] if got.recommendations else "USER_ID"
    _say(f"api: {url}/ (the live page), {url}/docs (the endpoints)")
    _say(f"curl -i {url}/v1/users/{user}/recommendations")


def _wait_for_ctrl_c() -> None:
    """Until Ctrl-C, or SIGTERM (a service manager's stop), either of which stops what the demo started."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("stopping the flow and the API")


def _wait_for_switch(version: str) -> str:
    """Wait until the flow's log says it serves ``version``; return what it logged about the switch."""
    log_path = local.LOG / "demo-flow.log"
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if f"long-term vectors: version {version}" in text:
            time.sleep(1.5)  # the sweep re-encodes the open sessions right after
            text = log_path.read_text()
            found = re.findall(rf"version {version}: model loaded in \d+ ms|serving version {version} \(was \S+\)", text)
            return "flow: " + "; ".join(found or [f"serving {version}"])
        time.sleep(0.5)
    raise ServiceError(f"the flow did not adopt {version} within {SWITCH_TIMEOUT_S:.0f} s; log {log_path}")


def _end_offsets(settings: Settings) -> dict[str, dict[int, int]]:
    """Current end offset of every partition of the topics the demo reads back."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(settings.kafka_config() | {"group.id": "slsrec-demo", "enable.auto.commit": False})
    try:
        out = {}
        for topic in (settings.topic_clicks, settings.topic_recommendations, settings.topic_dlq, settings.topic_drift):
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
    c.assign([TopicPartition(t, p, o) for t, parts in start.items() if t != settings.topic_drift
              for p, o in parts.items()])
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


def _drift_alerts(settings: Settings, start: dict[int, int], wait_s: float = 3.0) -> list[dict]:
    """Every alert on topic ``drift`` since ``start`` (read until it has been quiet for ``wait_s``)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(settings.kafka_config() | {"group.id": "slsrec-demo", "enable.auto.commit": False})
    c.assign([TopicPartition(settings.topic_drift, p, o) for p, o in start.items()])
    alerts, quiet_until = [], time.monotonic() + wait_s
    try:
        while time.monotonic() < quiet_until:
            msg = c.poll(0.5)
            if msg is not None and not msg.error():
                alerts.append(json.loads(msg.value()))
                quiet_until = time.monotonic() + wait_s
    finally:
        c.close()
    return alerts


def _loop_summary(first: Collected, second: Collected, alerts: list[dict], first_alerts: list[dict]) -> None:
    print("\n=== the long-term loop ===")
    for name, got in (("first replay ", first), ("second replay", second)):
        counts: dict[str, int] = {}
        for r in got.recommendations:
            counts[r["model_version"]] = counts.get(r["model_version"], 0) + 1
        mixed = sum(r["long_term_version"] not in (None, r["model_version"]) for r in got.recommendations)
        print(f"{name}  recommendations by version: "
              + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) + f"  (model and vectors differ: {mixed})")
    print(f"drift alerts on topic drift: {len(alerts)} (first replay: {sum(a in first_alerts for a in alerts)}, "
          f"second: {len(alerts) - sum(a in first_alerts for a in alerts)})")
    for a in alerts:
        when = "first replay " if a in first_alerts else "second replay"
        print(f"  {when}  {a['signal']:<12} {a['detector']:<12} mean {a['mean_before']} -> {a['mean_after']} "
              f"after {a['n_seen']} values (worker {a['worker_id']}, model {a['model_version']})")


def _summarise(n_events: int, got: Collected, title: str = "demo summary") -> None:
    lat = got.latencies_ms()
    recs = got.recommendations
    cold = sum(r["cold_start"] for r in recs)
    unknown = sum(r.get("unknown_item", False) for r in recs)
    print(f"\n=== {title} ===")
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


def stop_flow(proc: subprocess.Popen) -> None:
    """SIGINT lets Bytewax finish its epoch and snapshot (and uvicorn close its connections); SIGKILL
    only if it hangs."""
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


# ---- the second clickstream --------------------------------------------------------------------------

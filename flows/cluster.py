"""Running the flow: ``slsrec serve`` in one process, or a local cluster of processes, with recovery.

**Scaling.** Kafka partitions of ``clicks`` are the unit of parallelism; workers split them. On one
machine ``slsrec serve --processes N`` starts N worker processes (Bytewax's ``-i/-a`` cluster mode on
127.0.0.1:2101...). Across machines run one process per machine with the same address list, e.g.
``slsrec serve --process-id 0 --addresses "hostA:2101;hostB:2101"`` on hostA and ``--process-id 1``
on hostB (or a pattern: ``--processes 3 --addresses "slsrec-flow-{i}.slsrec-flow:2101"``, as the
Kubernetes StatefulSet in ``deploy/k8s`` does). Every process needs Kafka and Redis, the run directory
(or nothing: the published version's model files come from Redis), and its recovery partition
(``part-{process id}`` under ``recovery_dir``, created on the first start: a shared directory or a
volume of its own). Give ``clicks`` at least as many partitions as
workers in total; users are sharded over the workers by a hash of their id. Restart all
processes together; changing the worker count re-shards users (their open sessions split once).

**Stopping.** SIGTERM or SIGINT stops a process (``slsrec serve`` turns SIGTERM into the interrupt
Bytewax handles); the local cluster's parent passes it on to its workers and waits for them, and a
worker whose parent dies, even by ``kill -9``, gets SIGTERM from the kernel (Linux). Bytewax stops
without a last snapshot: a restart resumes from the periodic one. Each process keeps a health file
(:mod:`slsrec.health`) while it runs and removes it when it stops.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from flows.recommend import get_flow
from slsrec.errors import CheckpointError, ServiceError
from slsrec.health import Heartbeat
from slsrec.serving.recommender import compute_threads
from slsrec.serving.sessions import SessionTable
from slsrec.serving.versions import open_recommender
from slsrec.settings import Settings
from slsrec.telemetry import setup_telemetry

log = logging.getLogger(__name__)


def serve(settings: Settings, run: str | Path | None = None, *, processes: int = 1, process_id: int | None = None,
          addresses: list[str] | None = None, recovery: bool = True, tail: bool = True) -> None:
    """Run the flow until stopped: ``processes`` local workers, or one process of a wider cluster.

    Partitions of ``clicks`` are spread over all workers of the cluster. With ``process_id`` and
    ``addresses`` (``host:port`` of every process, the same list everywhere) this process is one
    member of a cluster that may span machines. Recovery snapshots go to ``settings.recovery_dir``.
    """
    if process_id is None and processes > 1:
        addresses = [f"127.0.0.1:{CLUSTER_PORT + i}" for i in range(processes)]
        _run_local_cluster(settings, run, addresses, recovery, tail)
        return
    recovery_config = _recovery(settings, len(addresses or [None]), process_id) if recovery else None
    telemetry = setup_telemetry(settings, "slsrec-flow")
    heartbeat = Heartbeat(settings.health_dir, process_id or 0)
    heartbeat.beat("starting")  # then "serving" (or "degraded") every second, from the flow's own tick step
    rec = open_recommender(settings, run, telemetry, worker_id=str(process_id or 0))
    flow = get_flow(settings, rec, tail=tail, workers=len(addresses or [None]), telemetry=telemetry,
                    heartbeat=heartbeat)
    # The hot path allocates many short-lived objects next to a large, long-lived heap (the model,
    # the sessions): freeze what exists and collect young objects less often. Measured: about 2x
    # events per CPU second (docs/benchmarks.md).
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("serving %s: %s -> %s (process %s of %s)", run or "the published version", settings.topic_clicks,
             settings.topic_recommendations, process_id or 0, len(addresses or [None]))
    try:
        with compute_threads(settings.serve_threads):
            cli_main(flow, process_id=process_id, addresses=addresses, recovery_config=recovery_config,
                     epoch_interval=timedelta(seconds=settings.snapshot_interval_s))
    finally:
        heartbeat.stop()
        telemetry.shutdown()
        gc.unfreeze()  # serve() may run inside a longer-lived process (tests, the demo)
        gc.set_threshold(*thresholds)


CLUSTER_PORT = 2101  # first port of the local cluster's processes (Bytewax's own default)
STOP_TIMEOUT_S = 30.0  # a worker stopping takes a few seconds (its Kafka clients close)


def _die_with_parent() -> None:
    """Run in each worker process before exec: the kernel sends it SIGTERM when its parent dies, even
    by ``kill -9``, so no worker consumes on as an orphan next to a restarted cluster (Linux only)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def cluster_addresses(addresses: str, processes: int) -> list[str]:
    """The ``host:port`` of every process: a ``;``-separated list, or one pattern with ``{i}`` for
    ``processes`` of them (a StatefulSet's pods behind a headless Service).

    >>> cluster_addresses("flow-{i}.flow:2101", 3)
    ['flow-0.flow:2101', 'flow-1.flow:2101', 'flow-2.flow:2101']
    >>> cluster_addresses("hostA:2101;hostB:2101", 1)
    ['hostA:2101', 'hostB:2101']
    """
    if "{i}" in addresses:
        return [addresses.replace("{i}", str(i)) for i in range(processes)]
    return addresses.split(";")


def _recovery(settings: Settings, processes: int, process_id: int | None = None) -> RecoveryConfig:
    """The recovery config; its SQLite partitions (one per process) are created on the first start.

    Without ``process_id`` (one process, or the parent of a local cluster) every partition is made
    when there is none. One member of a cluster makes its own, ``part-{process_id}``, when it is
    missing: Bytewax needs each partition somewhere in the cluster, once, so processes may share
    the directory or each keep theirs on its own volume (a StatefulSet's volume claim). Partitions
    record their count: a cluster of another size must start on empty volumes.

    The directory belongs to one flow on one set of topics: Bytewax refuses to resume from another.
    A marker file names the session format of its snapshots; snapshots of another format (an older
    slsrec) are refused with a clear error instead of failing inside the flow.
    """
    folder, marker = settings.recovery_dir, settings.recovery_dir / "session-format"
    own = [] if process_id is None else [folder / f"part-{process_id}.sqlite3"]
    if not any(folder.glob("*.sqlite3")) or (own and not own[0].exists()):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # on the same volume: a rename moves it
            init_db_dir(Path(tmp), processes)
            for part in own or [folder / p.name for p in Path(tmp).glob("*.sqlite3")]:
                os.replace(Path(tmp) / part.name, part)
        marker.write_text(f"{SessionTable.FORMAT}\n")
    found = marker.read_text().strip() if marker.exists() else "1 (no marker)"
    if found != str(SessionTable.FORMAT):
        raise CheckpointError(f"{settings.recovery_dir} holds snapshots of session format {found}; this slsrec "
                              f"reads format {SessionTable.FORMAT}. Move the directory away to start without them.")
    return RecoveryConfig(str(settings.recovery_dir))


def _run_local_cluster(settings: Settings, run, addresses: list[str], recovery: bool, tail: bool) -> None:
    """One child process per address, each `slsrec serve --process-id I --addresses ...`."""
    if recovery:
        _recovery(settings, len(addresses))  # before the children start, so that they agree on it
    base = [sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--addresses", ";".join(addresses)]
    base += (["--run", str(run)] if run else []) + ([] if recovery else ["--no-recovery"])
    base += [] if tail else ["--exit-at-end"]
    env = {**os.environ, **settings.to_env()}
    children = [subprocess.Popen(base + ["--process-id", str(i)], env=env, preexec_fn=_die_with_parent)
                for i in range(len(addresses))]
    try:
        codes = [c.wait() for c in children]
    finally:  # also on the interrupt of SIGTERM / SIGINT: pass it on, wait, then kill what hangs
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
    if any(codes):
        raise ServiceError(f"flow processes exited with {codes}")

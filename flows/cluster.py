"""Running the flow: ``slsrec serve`` in one process, or a local cluster of processes, with recovery.

**Scaling.** Kafka partitions of ``clicks`` are the unit of parallelism; workers split them. On one
machine ``slsrec serve --processes N`` starts N worker processes (Bytewax's ``-i/-a`` cluster mode on
127.0.0.1:2101...). Across machines run one process per machine with the same address list, e.g.
``slsrec serve --process-id 0 --addresses "hostA:2101;hostB:2101"`` on hostA and ``--process-id 1``
on hostB. Every process needs Kafka and Redis, the run directory (or nothing: the published version's
model files come from Redis), and the same ``recovery_dir`` (shared storage; its SQLite partitions,
one per process, are created on the first start). Give ``clicks`` at least as many partitions as
workers in total; users are sharded over the workers by a hash of their id. Restart all
processes together; changing the worker count re-shards users (their open sessions split once).
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from flows.recommend import get_flow
from slsrec.errors import CheckpointError, ServiceError
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
    recovery_config = _recovery(settings, len(addresses or [None])) if recovery else None
    telemetry = setup_telemetry(settings, "slsrec-flow")
    flow = get_flow(settings, open_recommender(settings, run, telemetry, worker_id=str(process_id or 0)), tail=tail,
                    workers=len(addresses or [None]), telemetry=telemetry)
    # The hot path allocates many short-lived objects next to a large, long-lived heap (the model,
    # the sessions): freeze what exists and collect young objects less often. Measured: about 2x
    # events per CPU second (docs/benchmarks.md).
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("serving %s: %s -> %s (process %s of %s)", run or "the published version", settings.topic_clicks,
             settings.topic_recommendations, process_id or 0, len(addresses or [None]))
    try:
        cli_main(flow, process_id=process_id, addresses=addresses, recovery_config=recovery_config,
                 epoch_interval=timedelta(seconds=settings.snapshot_interval_s))
    finally:
        telemetry.shutdown()
        gc.unfreeze()  # serve() may run inside a longer-lived process (tests, the demo)
        gc.set_threshold(*thresholds)


CLUSTER_PORT = 2101  # first port of the local cluster's processes (Bytewax's own default)


def _recovery(settings: Settings, processes: int) -> RecoveryConfig:
    """The recovery config; its SQLite partitions (one per process) are created on the first start.

    The directory belongs to one flow on one set of topics: Bytewax refuses to resume from another.
    A marker file names the session format of its snapshots; snapshots of another format (an older
    slsrec) are refused with a clear error instead of failing inside the flow.
    """
    marker = settings.recovery_dir / "session-format"
    if not any(settings.recovery_dir.glob("*.sqlite3")):
        settings.recovery_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(settings.recovery_dir, processes)
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
    children = [subprocess.Popen(base + ["--process-id", str(i)], env=env) for i in range(len(addresses))]
    try:
        codes = [c.wait() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
                c.wait(30)
    if any(codes):
        raise ServiceError(f"flow processes exited with {codes}")

"""The ``slsrec`` command line. Each command is a thin wrapper over a function in its own module."""

from __future__ import annotations

import sys

import typer

from slsrec.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
local_app = typer.Typer(no_args_is_help=True, help="Start, stop and inspect the local Kafka and Redis.")
app.add_typer(local_app, name="local")


SECURE = typer.Option(False, "--secure", help="the secure pair: Kafka with SASL/SCRAM over TLS on 127.0.0.1:9094, "
                                                 "Redis with an ACL user over TLS on 127.0.0.1:6380")
REDIS_CLUSTER = typer.Option(False, "--redis-cluster", help="the Redis Cluster: 3 primaries on 127.0.0.1:7001-7003 "
                                                            "(SLSREC_REDIS_URL=redis+cluster://127.0.0.1:7001)")


@local_app.command("up")
def local_up(partitions: int = typer.Option(None, min=1, help="partitions of the clicks topic [default: 4]"),
             secure: bool = SECURE, redis_cluster: bool = REDIS_CLUSTER) -> None:
    """Start Kafka and Redis on loopback unless they already answer, and create the topics."""
    import time

    from slsrec import local
    from slsrec.settings import Settings

    t0 = time.monotonic()
    settings = local.secure_settings() if secure else Settings()
    settings = settings.model_copy(update={"partitions": partitions}) if partitions else settings
    for s in local.up(settings, adopt=True, secure=secure, redis_cluster=redis_cluster):
        typer.echo(s.describe())
    typer.echo(f"ready in {time.monotonic() - t0:.1f} s (logs: var/log/)")
    if secure:
        typer.echo('clients: eval "$(slsrec local env --secure)" (credentials in var/secure/, mode 0600)')
    if redis_cluster:
        typer.echo('clients: eval "$(slsrec local env --redis-cluster)" (Kafka comes from `slsrec local up`)')


@local_app.command("down")
def local_down(force: bool = typer.Option(False, "--force", help="stop even while tests or the demo use them"),
               secure: bool = SECURE, redis_cluster: bool = REDIS_CLUSTER) -> None:
    """Stop the services that `slsrec local up` started (others are left running)."""
    from slsrec import local

    stopped = local.down(force=force, secure=secure, redis_cluster=redis_cluster)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


@local_app.command("status")
def local_status(secure: bool = SECURE, redis_cluster: bool = REDIS_CLUSTER) -> None:
    """Print each service, its pid and whether it answers; fails when one does not answer."""
    from slsrec import local
    from slsrec.errors import ServiceError

    statuses = local.status(secure=secure, redis_cluster=redis_cluster)
    for s in statuses:
        typer.echo(s.describe())
    if down := [s.name for s in statuses if not s.answering]:
        again = "slsrec local up" + (" --secure" if secure else " --redis-cluster" if redis_cluster else "")
        raise ServiceError(f"not answering: {', '.join(down)} (start with `{again}`)")


@local_app.command("env")
def local_env(secure: bool = SECURE, redis_cluster: bool = REDIS_CLUSTER) -> None:
    """Print the SLSREC_* variables that point clients at the local services, for `eval "$(...)"`.

    With --secure they include the passwords: print them only into a shell you trust, never into a log.
    """
    import shlex

    from slsrec import local
    from slsrec.settings import Settings

    k, r = local.KAFKA, local.REDIS
    fields = local.secure_fields() if secure else {"kafka_bootstrap": f"{k.host}:{k.port}",
                                                   "redis_url": f"redis://{r.host}:{r.port}/0"}
    if redis_cluster:
        if secure:
            raise UserError("--secure and --redis-cluster are separate groups: pick one")
        fields["redis_url"] = local.REDIS_CLUSTER_URL
    for name, value in Settings(**fields).to_env().items():
        if name.removeprefix("SLSREC_").lower() in fields:
            typer.echo(f"export {name}={shlex.quote(value)}")


@local_app.command("topics")
def local_topics(partitions: int = typer.Option(None, min=1, help="partitions of the clicks topic [default: 4]"),
                 replication_factor: int = typer.Option(1, min=1, help="replicas of each topic (3 on a production "
                                                        "cluster)")) -> None:
    """Create the project's topics on the configured Kafka where missing (docker compose, the Kubernetes Job)."""
    from slsrec import local
    from slsrec.settings import Settings

    settings = Settings(**({"partitions": partitions} if partitions else {}))
    created = local.create_topics(settings, replication_factor=replication_factor)
    typer.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@app.command("replay")
def replay_cmd(
    file: str = typer.Argument(..., help="recorded clickstream: .csv, .parquet or .jsonl"),
    topic: str = typer.Option(None, help="topic to produce to [default: clicks, or SLSREC_TOPIC_CLICKS]"),
    speed: float = typer.Option(None, help="time scale: 1 = real time, 10 = ten times faster [default: 1]"),
    as_fast_as_possible: bool = typer.Option(False, "--as-fast-as-possible", help="ignore recorded timing"),
    limit: int = typer.Option(None, min=1, help="send only the first N events"),
    original_ts: bool = typer.Option(False, "--original-ts", help="send the recorded timestamps, not shifted to now"),
) -> None:
    """Produce a recorded clickstream to Kafka, keyed by user_id, in time order."""
    from slsrec.replay import replay

    if as_fast_as_possible and speed is not None:
        raise UserError("give either --speed or --as-fast-as-possible, not both")
    stats = replay(file, topic, speed=None if as_fast_as_possible else (speed or 1.0), limit=limit,
                   shift_to_now=not original_ts)
    typer.echo(f"replayed {stats.events} events to {stats.topic!r} in {stats.seconds:.1f} s")


@app.command("data-stats")
def data_stats(
    dataset: str = typer.Option(..., help="ml-1m, ml-100k, synthetic, or a .csv/.parquet/.jsonl clickstream"),
    gap_s: int = typer.Option(1800, min=1, help="inactivity gap (seconds) that closes a session"),
    max_segment: int = typer.Option(20, min=1, help="S: most items in one short-term segment"),
    max_long: int = typer.Option(200, min=1, help="L: most items in the long-term input"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """How sessions and the long/short split behave on a dataset."""
    import json

    from slsrec.data import load_dataset
    from slsrec.sessions import split_report

    report = split_report(load_dataset(dataset), gap_s * 1000, max_segment, max_long)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        typer.echo(f"{key:<46} {value}")


@app.command("serve")
def serve_cmd(
    run: str = typer.Option(None, help="run directory to serve [default: the published version, then each newer one]"),
    processes: int = typer.Option(1, min=1, help="worker processes on this machine (cluster mode)"),
    process_id: int = typer.Option(None, "--process-id", min=0, help="this process's index in --addresses"),
    addresses: str = typer.Option(None, help="host:port of every process of the cluster, ';'-separated, or one "
                                  "pattern with {i} for --processes of them, e.g. flow-{i}.flow:2101"),
    recovery: bool = typer.Option(True, help="snapshot state and offsets to the recovery directory"),
    exit_at_end: bool = typer.Option(False, "--exit-at-end", help="stop at the end of the topic"),
    otel_endpoint: str = typer.Option(None, help="OTLP/HTTP collector URL for traces and metrics, e.g. "
                                      "http://127.0.0.1:4318 [default: SLSREC_OTEL_ENDPOINT, else none]"),
    otel_console: bool = typer.Option(None, "--otel-console/--no-otel-console",
                                      help="print spans and metrics to stdout [default: SLSREC_OTEL_CONSOLE]"),
    supervised: bool = typer.Option(False, "--supervised", help="restart it when it crashes or is killed, as "
                                    "deploy/systemd/slsrec-serve.service does"),
) -> None:
    """Run the streaming flow: clicks -> sessions + model -> recommendations (Ctrl-C or SIGTERM stops).

    Without --run it serves the published version and follows every newer one without a restart.
    Exit codes: 0 stopped by a signal (or --exit-at-end), 2 an error a restart cannot fix
    (configuration, checkpoint, credentials); anything else is worth a restart. A Kafka or Redis
    that does not answer is waited for, never a reason to exit.
    """
    import logging
    import signal

    from flows.cluster import cluster_addresses, serve
    from slsrec.settings import Settings
    from slsrec.supervise import Supervisor

    if supervised:
        argv = [sys.executable, "-c", "from slsrec.cli import main; main()",
                *[a for a in sys.argv[1:] if a != "--supervised"]]
        raise typer.Exit(Supervisor(argv).run())
    if (process_id is None) != (addresses is None):
        raise UserError("--process-id and --addresses go together (one process of a cluster)")
    listed = cluster_addresses(addresses, processes) if addresses else None
    if process_id is not None and process_id >= len(listed):
        raise UserError(f"--process-id {process_id} is not an index into the {len(listed)} addresses")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"otel_endpoint": otel_endpoint, "otel_console": otel_console}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    _wait_for_services(settings)
    # SIGTERM (systemd, Docker, Kubernetes) stops the flow as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve(settings, run, processes=processes, process_id=process_id,
              addresses=listed, recovery=recovery, tail=not exit_at_end)
    except Exception as e:
        if not isinstance(e.__cause__, KeyboardInterrupt):  # Bytewax wraps the interrupt in its own error
            raise
    except KeyboardInterrupt:
        pass
    else:
        return
    # Bytewax stops without a last snapshot: a restart resumes from the periodic one (at least once).
    logging.getLogger("slsrec.serve").info("stopped by a signal")


def _wait_for_services(settings, max_wait_s: float = 30.0) -> None:
    """Check Kafka and Redis before the flow starts: inside it, a refused password or certificate
    would surface as a Bytewax traceback or as librdkafka retrying forever. Each failure is one line;
    a service that does not answer (down, starting) is waited for with backoff instead."""
    import logging
    import time

    from slsrec.errors import Unavailable
    from slsrec.kafka_check import check_kafka
    from slsrec.store import LongTermStore

    delay = 1.0
    while True:
        try:
            check_kafka(settings)
            LongTermStore(settings.redis_url).current_version()
            return
        except Unavailable as e:
            logging.getLogger("slsrec.serve").warning("%s: trying again in %.0f s", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_wait_s)


@app.command("health")
def health_cmd(
    live: bool = typer.Option(False, "--live", help="every flow process beats (not stuck, not dead)"),
    ready: bool = typer.Option(False, "--ready", help="live, and every process consumes and recommends"),
) -> None:
    """Probe the running flow's health files (SLSREC_HEALTH_DIR): exit 0 if live / ready, else 1."""
    from slsrec.health import probe
    from slsrec.settings import Settings

    if live == ready:
        raise UserError("give one of --live or --ready")
    settings = Settings()
    ok, line = probe(settings.health_dir, settings.health_max_age_s, ready=ready)
    typer.echo(line)
    raise typer.Exit(0 if ok else 1)


@app.command("chaos")
def chaos_cmd(
    faults: str = typer.Option(None, help="comma-separated faults to run [default: kill-flow, redis-frozen, "
                               "redis-empty, kafka-frozen, kafka-restart, malformed]"),
    duration_s: float = typer.Option(120.0, min=5, help="seconds of streaming per fault"),
    outage_s: float = typer.Option(60.0, min=1, help="seconds Redis / Kafka stay frozen, Redis empty"),
    rate: float = typer.Option(500.0, min=1, help="valid events per second"),
    kill_every_s: float = typer.Option(30.0, min=1, help="period of kill -9 in kill-flow"),
    kafka_port: int = typer.Option(19092, help="the private Kafka's port (its controller: the next one)"),
    redis_port: int = typer.Option(16379, help="the private Redis's port"),
    keep_services: bool = typer.Option(False, "--keep-services", help="leave the private Kafka and Redis running"),
) -> None:
    """Break Kafka, Redis and the flow under a live stream; print one table of what reached the user.

    Runs against a private Kafka and Redis (var/chaos/), never the shared ones.
    """
    import logging
    import os
    import signal

    from slsrec import local
    from slsrec.chaos import FAULTS, Chaos, table

    chosen = [f.strip() for f in faults.split(",") if f.strip()] if faults else list(FAULTS)
    if unknown := [f for f in chosen if f not in FAULTS]:
        raise UserError(f"unknown fault(s) {', '.join(unknown)}: expected some of {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM too ends in the cleanup below: a frozen service thawed, the flow and the pair stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    chaos = Chaos(local.PrivatePair("chaos", kafka_port, redis_port), duration_s=duration_s, outage_s=outage_s,
                  rate=rate, kill_every_s=kill_every_s)
    typer.echo(f"chaos: Kafka {chaos.settings.kafka_bootstrap}, Redis 127.0.0.1:{redis_port} (private); "
               f"{rate:g} events/s for {duration_s:g} s per fault; load average {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        chaos.setup()
        for fault in chosen:
            typer.echo(f"... {chaos.describe(fault)}")
            rows.append(chaos.run(fault))
            typer.echo(table(rows[-1:], chaos.describe))  # each row as it comes: a stopped run keeps them
    finally:
        if not keep_services:
            chaos.pair.down()
    typer.echo("\n" + table(rows, chaos.describe))
    typer.echo(f"load average at the end {os.getloadavg()[0]:.1f}")


def counts_of(flag: str, value: str) -> list[int]:
    """Positive integers from a comma-separated flag value, or a one-line error naming the flag."""
    try:
        counts = [int(n) for n in value.split(",")]
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected positive integers separated by commas, e.g. 1,2,4") from None
    if min(counts) < 1:
        raise UserError(f"{flag} {value!r}: every count must be at least 1")
    return counts


@app.command("api")
def api_cmd(
    host: str = typer.Option(None, help="address to bind [default: SLSREC_API_HOST, else 127.0.0.1]"),
    port: int = typer.Option(None, min=1, max=65535, help="port [default: SLSREC_API_PORT, else 8000]"),
) -> None:
    """Serve each user's latest recommendation over HTTP, live updates (SSE) and the live page at /."""
    import logging

    from slsrec.api import serve_api
    from slsrec.kafka_check import check_kafka
    from slsrec.latest import LatestStore
    from slsrec.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"api_host": host, "api_port": port}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    check_kafka(settings)  # each service's failure as one line, before the server starts
    LatestStore(settings.redis_url, settings.api_ttl_s).users(1)
    serve_api(settings)


@app.command("bench-api")
def bench_api_cmd(
    rate: float = typer.Option(1000.0, min=1, help="GET requests per second, sent on schedule (open loop)"),
    duration_s: float = typer.Option(20.0, min=1, help="seconds measured, after a 2 s warm-up"),
    flow_rate: float = typer.Option(200.0, min=1, help="clicks per second through the flow meanwhile"),
    run: str = typer.Option(None, help="run directory [default: a random SLSRec of ML-1M size]"),
) -> None:
    """GET latency of `slsrec api` at a fixed request rate while the flow serves a live stream."""
    from slsrec.bench_api import bench, report
    from slsrec.settings import Settings

    typer.echo(report(bench(Settings(), rate=rate, duration_s=duration_s, flow_rate=flow_rate, run=run)))


@app.command("bench-stream")
def bench_stream_cmd(
    run: str = typer.Option(None, help="run directory [default: a random SLSRec of ML-1M size]"),
    events: int = typer.Option(None, min=1000, help="events in the throughput backlog [default: 100000; "
                               "40000 with --processes]"),
    latency_s: float = typer.Option(20.0, min=1, help="seconds of paced load for the latency figures"),
    naive_events: int = typer.Option(5_000, min=100, help="events through the naive per-event path"),
    load_rate: float = typer.Option(None, min=1, help="events/s of the latency phase [default: half the "
                                    "throughput measured in the same run]"),
    repeats: int = typer.Option(3, min=1, help="runs; the table shows each and their medians"),
    sessions: bool = typer.Option(True, help="also the serving core at 10k and 100k open sessions"),
    processes: str = typer.Option(None, help="scale-out instead: worker process counts, e.g. 1,2,4 (events/s, per "
                                  "CPU second, per worker, restart time)"),
) -> None:
    """Throughput and latency of the flow through the local Kafka and Redis, and a naive baseline."""
    from slsrec.bench_sessions import bench as bench_sessions
    from slsrec.bench_stream import bench, report
    from slsrec.settings import Settings

    if processes is not None:
        from slsrec import bench_scale

        counts = counts_of("--processes", processes)
        events = events or 40_000  # each count starts a cluster four times: a smaller backlog
        typer.echo(bench_scale.report(bench_scale.bench(Settings(), counts, run=run, events=events), events))
        return
    events = events or 100_000
    results = []
    for k in range(repeats):
        results.append(bench(Settings(), run=run, events=events, latency_s=latency_s, naive_events=naive_events,
                             load_rate=load_rate))
        typer.echo(f"run {k + 1} of {repeats}: {results[-1].flow_events_per_s:,.0f} events/s", err=True)
    rows = bench_sessions([10_000, 100_000], 200_000, 50_000) if sessions else None
    typer.echo(report(results, rows))


@app.command("bench-sessions")
def bench_sessions_cmd(
    sizes: str = typer.Option("10000,100000,1000000", help="open sessions per row, comma-separated"),
    users: int = typer.Option(1_000_000, min=1, help="distinct users streamed through one worker under the cap"),
    cap: int = typer.Option(100_000, min=1, help="max_open_sessions of the capped run"),
) -> None:
    """The serving core against the number of open sessions (cost per event, bytes, snapshot stall),
    and peak memory of many users under max_open_sessions."""
    import os

    from slsrec.bench_sessions import bench, report

    size_list = counts_of("--sizes", sizes)
    load = os.getloadavg()[0]
    rows = bench(size_list, users, cap)
    typer.echo(report(rows, size_list, users, cap, (load, os.getloadavg()[0])))


@app.command("publish")
def publish_cmd(
    run: str = typer.Option(..., help="run directory written by `slsrec train`, e.g. runs/ml-1m"),
    version: str = typer.Option(None, help="explicit version id v<number>[-label] [default: the next one]"),
    data: str = typer.Option(None, help="history to summarise [default: the run's training data]"),
    grace_s: float = typer.Option(3600.0, min=0, help="seconds the replaced version stays readable"),
) -> None:
    """Write every known user's long-term vector and the model to Redis, then switch to it atomically."""
    from slsrec.data import load_dataset
    from slsrec.publish import publish_run
    from slsrec.settings import Settings
    from slsrec.store import LongTermStore
    from slsrec.telemetry import setup_telemetry

    settings = Settings()
    store = LongTermStore(settings.redis_url)
    telemetry = setup_telemetry(settings, "slsrec-publish")
    try:
        report = publish_run(run, store, version=version, history=load_dataset(data) if data else None,
                             grace_s=grace_s, device=settings.torch_device(), telemetry=telemetry)
    finally:
        telemetry.shutdown()
    r = report.result
    typer.echo(f"published {r.version} to Redis {store.location} (replacing {r.previous or 'nothing'}): "
               f"{r.n_users} users, dim {r.dim}; vectors {report.encode_s:.2f} s, "
               f"write+switch {r.seconds:.2f} s ({r.vectors_per_s:,.0f} vectors/s)")


# ---- model: train, evaluate, benchmark (slsrec/train.py, slsrec/benchmark.py) ----


def _metrics_table(by_protocol: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per evaluation protocol (masked, strict)."""
    protocols = list(by_protocol)
    rows = [f"{'':<8} " + " ".join(f"{p:>8}" for p in protocols)]
    rows += [f"{k:<8} " + " ".join(f"{by_protocol[p][k]:8.4f}" for p in protocols) for k in by_protocol[protocols[0]]]
    return "\n".join(rows)


@app.command("train")
def train_cmd(
    dataset: str = typer.Option(..., help="ml-1m, ml-100k, synthetic, or a .csv/.parquet/.jsonl clickstream"),
    model: str = typer.Option("slsrec", help="pop, gru4rec, sasrec, clsr, slsrec, slsrec-long, slsrec-short, "
                                             "slsrec-nocl, slsrec-fixed"),
    out: str = typer.Option(..., help="run directory to write, e.g. runs/slsrec"),
    epochs: int = typer.Option(None, min=1, help="most epochs (early stopping may end sooner)"),
    seed: int = typer.Option(0, help="seed of torch and numpy"),
    device: str = typer.Option("auto", help="auto, cpu or cuda (auto = cuda when available)"),
    batch_size: int = typer.Option(None, min=1, help="sequences per step"),
    max_len: int = typer.Option(None, min=2, help="T: most recent events per sequence [default: the model's]"),
    lr: float = typer.Option(None, min=0, help="AdamW learning rate"),
    lr_decay: float = typer.Option(None, min=0, max=1, help="lr factor after an epoch without a better validation"),
    patience: int = typer.Option(None, min=1, help="epochs without a better validation NDCG@10 before stopping"),
    loss: str = typer.Option(None, help="full (softmax over all items) or sampled (shared negatives, logQ)"),
    precision: str = typer.Option(None, help="auto (the device's measured choice: fp32 on cpu and cuda), bf16 or fp32"),
    threads: int = typer.Option(None, min=1, help="torch threads [default: torch's choice]"),
    window: str = typer.Option(None, help="rows of T per user: all (every training event a target each "
                                          "epoch), last (the latest T) or random (a random span per epoch)"),
) -> None:
    """Train one model with early stopping on validation NDCG@10; save the run and print test metrics."""
    from slsrec.train import TrainConfig, train

    given = dict(epochs=epochs, batch_size=batch_size, max_len=max_len, lr=lr, lr_decay=lr_decay, patience=patience,
                 loss=loss, precision=precision, threads=threads, window=window)
    cfg = TrainConfig(dataset=dataset, model=model, seed=seed, device=device,
                      **{k: v for k, v in given.items() if v is not None})
    res = train(cfg, out)
    m = res.metrics
    typer.echo(f"{model}: best epoch {m['best_epoch']} of {m['epochs_run']}, {m['seconds_per_epoch']:.1f} s/epoch, "
               f"converged in {m['time_to_convergence_s']:.0f} s; saved {res.run_dir}")
    typer.echo(_metrics_table(m["test"]))


@app.command("evaluate")
def evaluate_cmd(
    run: str = typer.Option(..., help="run directory written by `slsrec train`"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Load a run and recompute its test metrics: full ranking, history masked and strict (left in)."""
    import json

    from slsrec.train import evaluate_run

    metrics = evaluate_run(run, device=device)
    typer.echo(json.dumps(metrics, indent=2) if json_out else _metrics_table(metrics))


@app.command("benchmark")
def benchmark_cmd(
    dataset: str = typer.Option("ml-1m", help="dataset of the table"),
    seeds: int = typer.Option(3, min=1, help="seeds for slsrec, sasrec and clsr (1 for the other models)"),
    models: str = typer.Option(None, help="comma-separated subset of the models [default: all]"),
    out: str = typer.Option(None, help="where results and runs are kept [default: runs/bench-DATASET]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, min=1, help="torch threads [default: torch's choice]"),
    epochs: int = typer.Option(None, min=1, help="most epochs per run [default: the trainer's]"),
    max_len: int = typer.Option(None, min=2, help="T for every model [default: the trainer's]; its own table"),
    window: str = typer.Option(None, help="training rows: all, last or random [default: all]; others: own table"),
    lr_decay: float = typer.Option(None, min=0, max=1, help="lr factor after an epoch without a better validation; "
                                                            "its own table"),
    precision: str = typer.Option(None, help="fp32 or bf16 for every model [default: auto, the device's measured "
                                              "choice]; its own table"),
    tuned: str = typer.Option(None, help="a `slsrec tune` output directory: each model trains with its winning "
                                         "options; its own table"),
    write_docs: bool = typer.Option(True, "--docs/--no-docs", help="write docs/benchmarks.md and docs/img/"),
    report_only: bool = typer.Option(False, "--report-only", help="train nothing; report the results saved so far"),
) -> None:
    """Train every model (resumable: finished (model, seed) runs are skipped) and write the results table."""
    import shlex
    import time
    from dataclasses import replace
    from pathlib import Path

    from slsrec.benchmark import (PLAN, load_results, planned_runs, results_table, run_benchmark, variant,
                                  write_benchmark_report)
    from slsrec.train import TrainConfig, check_options

    t0 = time.perf_counter()
    names = [m.strip() for m in models.split(",")] if models else list(PLAN)
    base = TrainConfig(device=device, threads=threads)
    recipe = dict(epochs=epochs, max_len=max_len, window=window, lr_decay=lr_decay, precision=precision)
    base = replace(base, **{k: v for k, v in recipe.items() if v is not None})
    check_options(base)
    label, slug = variant(base)
    if tuned:
        label, slug = ", ".join(filter(None, [label, "tuned"])), slug + "-tuned"
    out_dir = Path(out or f"runs/bench-{Path(dataset).stem}{slug}")
    if report_only:
        results = [r for r in load_results(out_dir) if r["model"] in names]
        if not results:
            raise UserError(f"{out_dir}/results: no finished runs to report")
    else:
        results = run_benchmark(dataset, seeds=seeds, models=names, out=out_dir, base=base,
                                tuned=Path(tuned) if tuned else None, log=typer.echo)
    typer.echo(results_table(results))
    if write_docs:
        extra = {"--models": models, "--threads": threads, "--epochs": epochs, "--max-len": max_len, "--window": window,
                 "--lr-decay": lr_decay, "--precision": precision, "--tuned": tuned, "--out": out}
        command = f"slsrec benchmark --dataset {shlex.quote(dataset)} --seeds {seeds}" + "".join(
            f" {flag} {shlex.quote(str(v))}" for flag, v in extra.items() if v)
        write_benchmark_report(results, dataset=dataset, command=command, out=out_dir, label=label, slug=slug,
                               wall_s=None if report_only else time.perf_counter() - t0,
                               planned=planned_runs(names, seeds))
        typer.echo("wrote docs/benchmarks.md and its plot under docs/img/")


@app.command("tune")
def tune_cmd(
    model: str = typer.Option(..., help="gru4rec, sasrec, clsr or slsrec"),
    dataset: str = typer.Option("ml-1m", help="dataset to tune on (validation split only)"),
    trials: int = typer.Option(8, min=1, help="configurations tried: the same budget for every model"),
    out: str = typer.Option(None, help="where trials are kept [default: runs/tune-DATASET]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, min=1, help="torch threads [default: torch's choice]"),
    epochs: int = typer.Option(None, min=1, help="most epochs per trial [default: the trainer's]"),
    seed: int = typer.Option(0, help="seed of the draws and of every trial"),
) -> None:
    """Search a model's hyper-parameters on the validation split (resumable; the test split is never read)."""
    from dataclasses import replace
    from pathlib import Path

    from slsrec.train import TrainConfig, check_options
    from slsrec.tune import tune

    base = replace(TrainConfig(dataset=dataset, model=model, device=device, threads=threads, seed=seed),
                   **({"epochs": epochs} if epochs else {}))
    check_options(base)
    best = tune(base, trials=trials, out=Path(out or f"runs/tune-{Path(dataset).stem}"), log=typer.echo)
    typer.echo(f"{model}: best of {best['trials']} trials {best['options']} "
               f"(valid NDCG@10 masked {best['valid']['masked']['NDCG@10']:.4f})")


@app.command("bench-train")
def bench_train_cmd(
    dataset: str = typer.Option("ml-1m", help="dataset whose batches are timed"),
    models: str = typer.Option("sasrec,slsrec", help="comma-separated models to time"),
    steps: int = typer.Option(6, min=1, help="timed steps per lever (after warm-up), spread over 3 rounds"),
    warmup: int = typer.Option(2, min=0, help="untimed steps first (torch.compile compiles here)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    write_docs: bool = typer.Option(False, "--docs/--no-docs", help="write the table into docs/benchmarks.md"),
) -> None:
    """Time the training-speed levers: sequence length, sampled softmax, threads, torch.compile, bf16."""
    import shlex

    from slsrec.benchmark import bench_train, levers_table, write_levers_report
    from slsrec.train import resolve_device

    command = "slsrec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench-train"] \
        else f"slsrec bench-train --dataset {dataset}"
    typer.echo(f"command: {command}")
    rows = bench_train(dataset, models=tuple(m.strip() for m in models.split(",")), steps=steps, warmup=warmup,
                       device=device, log=typer.echo)
    typer.echo(levers_table(rows))
    if write_docs:
        write_levers_report(rows, command=command, device=str(resolve_device(device)))
        typer.echo("wrote docs/benchmarks.md")


@app.command("demo")
def demo_cmd(
    epochs: int = typer.Option(8, min=1, help="epochs when runs/demo has to be trained"),
    keep_services: bool = typer.Option(False, "--keep-services", help="leave Kafka and Redis running"),
) -> None:
    """The whole system end to end: services, model, publish, flow, replay, summary; then stop."""
    from slsrec.demo import run_demo
    from slsrec.settings import Settings

    run_demo(Settings(), epochs=epochs, keep_services=keep_services)


@app.command("retrain")
def retrain_cmd(
    once: bool = typer.Option(False, "--once", help="run one full cycle and exit"),
    every: str = typer.Option(None, help="cycle on a schedule: 30m, 1h, 1d (Ctrl-C stops)"),
    run_dir: str = typer.Option(None, "--run-dir", help="where runs are kept and candidates written [default: runs]"),
    margin: float = typer.Option(0.01, help="refuse a candidate whose NDCG@10 is below the current one's minus this"),
    epochs: int = typer.Option(3, min=1, help="epochs from the warm start (the best on validation is kept)"),
    base: str = typer.Option(None, help="base training data [default: the current run's dataset]"),
    history_dir: str = typer.Option(None, "--history-dir", help="recorded sessions (Parquet) [default: var/history]"),
    grace_s: float = typer.Option(3600.0, min=0, help="seconds the replaced version stays readable"),
    max_len: int = typer.Option(None, min=2, help="T: most recent events per training sequence [default: the run's]"),
    loss: str = typer.Option("full", help="full or sampled softmax"),
    threads: int = typer.Option(None, min=1, help="torch threads [default: torch's choice]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    on_drift: bool = typer.Option(False, "--on-drift", help="with --every: also retrain on each alert on topic drift"),
) -> None:
    """Ingest recorded sessions, warm-start, train, compare with the current model, publish or refuse."""
    import logging

    from slsrec.retrain import RetrainConfig, Retrainer, parse_every
    from slsrec.settings import Settings

    if once == (every is not None):
        raise UserError("give exactly one of --once and --every (e.g. --every 1h)")
    if loss not in ("full", "sampled"):
        raise UserError(f"--loss {loss!r}: expected full or sampled")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda")
    every_s = parse_every(every) if every is not None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"runs_dir": run_dir, "history_dir": history_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    config = RetrainConfig(epochs=epochs, margin=margin, grace_s=grace_s, max_len=max_len, loss=loss,
                           threads=threads, device=device)
    retrainer = Retrainer(settings, config, base=base)
    try:
        if once:
            typer.echo(retrainer.cycle().summary())
        else:
            retrainer.run(every_s, watch_drift=on_drift)
    finally:
        retrainer.telemetry.shutdown()


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        rc = app(standalone_mode=False)  # returns typer.Exit's code instead of raising it
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors (a ClickException of the click that typer bundles) arrive here in
        # non-standalone mode: print them as click would.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)

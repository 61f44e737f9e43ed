"""OpenTelemetry in one place: providers, exporters, and the names of every span and metric.

`setup_telemetry` picks the exporters from the settings: OTLP/HTTP when ``otel_endpoint`` is set (the
collector's base URL, e.g. ``http://127.0.0.1:4318``), the console when ``otel_console`` is true,
otherwise no-op providers that cost nothing. It never touches the global OpenTelemetry providers, so
several flows or tests in one process do not interfere; pass the returned `Telemetry` around.

Metrics (attributes in brackets):

==========================  ================  ===========  ==============================================
name                        kind              unit         meaning
==========================  ================  ===========  ==============================================
slsrec.events.in            counter           {event}      click events read from ``clicks``
slsrec.recommendations.out  counter           {rec}        recommendations written
slsrec.dead_letters         counter           {event}      events sent to ``clicks.dlq`` [reason]
slsrec.latency.e2e          histogram         ms           event ``ts`` to its recommendation written
slsrec.batch.size           histogram         {event}      events per micro-batch
slsrec.redis.latency        histogram         ms           one Redis round trip
slsrec.cache.hits           counter           {lookup}     long-term vectors found in the local cache
slsrec.cache.misses         counter           {lookup}     long-term vectors fetched from Redis
slsrec.model.version        observable gauge  1            1 for the serving model [version]
slsrec.longterm.version     observable gauge  1            1 for the long-term vectors read [version]
slsrec.drift.alerts         counter           {alert}      drift alerts raised [signal, detector]
slsrec.degraded             counter           {rec}        recommendations made without Redis [long_term:
                                                           cached, unavailable]
slsrec.degraded.workers     up-down counter   {worker}     workers in degraded mode now (Redis slow, down or
                                                           emptied; +1 on entering, -1 on leaving)
slsrec.sessions.active      up-down counter   {session}    sessions open now (+1 open, -1 close)
slsrec.snapshot.duration    histogram         ms           pickling a shard for a recovery snapshot (the
                                                           stream waits; Bytewax's SQLite write comes on top)
slsrec.snapshot.size        histogram         By           bytes of one shard's snapshot
slsrec.retrain.runs         counter           {run}        retrain cycles [outcome: published, refused]
==========================  ================  ===========  ==============================================

The cache hit rate is ``hits / (hits + misses)``, computed by the backend from the two counters.

Spans: ``slsrec.batch`` (one per micro-batch: ``slsrec.batch.size``, ``slsrec.event_ids`` so that
one event can be followed, and ``slsrec.redis_ms`` / ``slsrec.model_ms`` set by the caller),
``slsrec.retrain`` and ``slsrec.publish`` (``slsrec.version``). No secret (Redis URL, SASL password)
is ever an attribute: nothing from the settings but the service name reaches the exporters.

>>> from slsrec.settings import Settings
>>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
>>> reader = InMemoryMetricReader()
>>> tel = setup_telemetry(Settings(), "doc", reader=reader)
>>> tel.events_in.add(3)
>>> [m.data.data_points[0].value for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics]
[3]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter

from slsrec.settings import Settings

SPAN_BATCH = "slsrec.batch"
SPAN_RETRAIN = "slsrec.retrain"
SPAN_PUBLISH = "slsrec.publish"
ATTR_BATCH_SIZE = "slsrec.batch.size"
ATTR_EVENT_IDS = "slsrec.event_ids"
ATTR_REDIS_MS = "slsrec.redis_ms"
ATTR_MODEL_MS = "slsrec.model_ms"
ATTR_VERSION = "slsrec.version"

EXPORT_INTERVAL_MS = 10_000  # metrics push period; short enough for the demo to show movement
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
REDIS_BUCKETS_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 500)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Telemetry:
    """The tracer and every instrument of the product; instruments are the SDK's own objects.

    Use them directly, e.g. ``tel.dead_letters.add(1, {"reason": "bad_json"})``.
    """

    def __init__(self, meter_provider: metrics.MeterProvider, tracer_provider: trace.TracerProvider):
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("slsrec")
        m = meter_provider.get_meter("slsrec")
        self.events_in = m.create_counter("slsrec.events.in", "{event}", "click events read")
        self.recommendations_out = m.create_counter("slsrec.recommendations.out", "{rec}", "recommendations written")
        self.dead_letters = m.create_counter("slsrec.dead_letters", "{event}", "events sent to the dead-letter topic")
        self.e2e_latency = m.create_histogram(
            "slsrec.latency.e2e", "ms", "event ts to recommendation written",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.batch_size = m.create_histogram(
            "slsrec.batch.size", "{event}", "events per micro-batch", explicit_bucket_boundaries_advisory=BATCH_BUCKETS
        )
        self.redis_latency = m.create_histogram(
            "slsrec.redis.latency", "ms", "one Redis round trip", explicit_bucket_boundaries_advisory=REDIS_BUCKETS_MS
        )
        self.cache_hits = m.create_counter("slsrec.cache.hits", "{lookup}", "long-term vectors found in the cache")
        self.cache_misses = m.create_counter("slsrec.cache.misses", "{lookup}", "long-term vectors fetched from Redis")
        self.drift_alerts = m.create_counter("slsrec.drift.alerts", "{alert}", "drift alerts raised")
        self.degraded = m.create_counter("slsrec.degraded", "{rec}", "recommendations made without Redis")
        self.degraded_workers = m.create_up_down_counter("slsrec.degraded.workers", "{worker}",
                                                         "workers in degraded mode now")
        self.sessions_active = m.create_up_down_counter("slsrec.sessions.active", "{session}", "sessions open now")
        self.snapshot_duration = m.create_histogram(
            "slsrec.snapshot.duration", "ms", "pickling a shard for a recovery snapshot",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.snapshot_size = m.create_histogram("slsrec.snapshot.size", "By", "bytes of one shard's snapshot")
        self.retrain_runs = m.create_counter("slsrec.retrain.runs", "{run}", "retrain cycles by outcome")
        # Versions are strings, so they are reported as "info" gauges: value 1, the version an attribute.
        self._versions: dict[str, str | None] = {"model": None, "longterm": None}
        for kind in self._versions:
            m.create_observable_gauge(
                f"slsrec.{kind}.version", [self._observe_version(kind)], "1", f"1 for the current {kind} version"
            )

    def _observe_version(self, kind: str):
        def observe(options: CallbackOptions) -> list[Observation]:
            v = self._versions[kind]
            return [] if v is None else [Observation(1, {"version": v})]

        return observe

    def set_versions(self, model: str | None = None, long_term: str | None = None) -> None:
        """Record the versions now in use (``None`` leaves one unchanged)."""
        if model is not None:
            self._versions["model"] = model
        if long_term is not None:
            self._versions["longterm"] = long_term

    @contextmanager
    def batch_span(self, event_ids: Sequence[str]) -> Iterator[trace.Span]:
        """Span of one micro-batch; also records its size. Set ``ATTR_REDIS_MS`` and ``ATTR_MODEL_MS`` on it."""
        self.batch_size.record(len(event_ids))
        attributes = {ATTR_BATCH_SIZE: len(event_ids), ATTR_EVENT_IDS: list(event_ids)}
        with self.tracer.start_as_current_span(SPAN_BATCH, attributes=attributes) as span:
            yield span

    def retrain_span(self, **attributes: str | int | float | bool) -> AbstractContextManager[trace.Span]:
        """The span of one retrain cycle: ``with tel.retrain_span(run="runs/x") as span: ...``."""
        return self.tracer.start_as_current_span(SPAN_RETRAIN, attributes=attributes)

    def publish_span(self, version: str, **attributes: str | int | float | bool) -> AbstractContextManager[trace.Span]:
        """Context manager: the span of publishing one version to Redis."""
        return self.tracer.start_as_current_span(SPAN_PUBLISH, attributes={ATTR_VERSION: version, **attributes})

    def shutdown(self) -> None:
        """Flush and stop the exporters (a no-op for the no-op providers)."""
        for p in (self.meter_provider, self.tracer_provider):
            if isinstance(p, (MeterProvider, TracerProvider)):
                p.shutdown()


def setup_telemetry(
    settings: Settings,
    service_name: str,
    reader: MetricReader | None = None,
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Build the providers the settings ask for; ``reader`` / ``span_exporter`` are added (tests).

    Parameters
    ----------
    settings
        ``otel_endpoint`` (OTLP/HTTP base URL) and ``otel_console`` choose the exporters.
    service_name
        ``service.name`` of the resource, e.g. ``slsrec-flow`` or ``slsrec-retrain``.
    reader, span_exporter
        Extra metric reader and span exporter, e.g. the SDK's in-memory ones; spans go to it at once.
    """
    readers: list[MetricReader] = [] if reader is None else [reader]
    processors = [] if span_exporter is None else [SimpleSpanProcessor(span_exporter)]
    if settings.otel_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = settings.otel_endpoint.rstrip("/")
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(f"{base}/v1/metrics"), EXPORT_INTERVAL_MS))
        processors.append(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
    if settings.otel_console:
        # The exporters' default stream is sys.stdout as it was at import; take today's.
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stdout), EXPORT_INTERVAL_MS))
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
    if not readers and not processors:
        return Telemetry(metrics.NoOpMeterProvider(), trace.NoOpTracerProvider())
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    for p in processors:
        tracer_provider.add_span_processor(p)
    return Telemetry(MeterProvider(readers, resource=resource), tracer_provider)

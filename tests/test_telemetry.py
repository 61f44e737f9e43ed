"""Telemetry: what the instruments record is what the SDK's in-memory reader and exporter see."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from slsrec.settings import Settings
from slsrec.telemetry import (
    ATTR_BATCH_SIZE,
    ATTR_EVENT_IDS,
    ATTR_MODEL_MS,
    ATTR_REDIS_MS,
    ATTR_VERSION,
    SPAN_BATCH,
    SPAN_PUBLISH,
    SPAN_RETRAIN,
    setup_telemetry,
)

SECRETS = ("s3cretRedisPw", "hunter2sasl")


@pytest.fixture
def tel():
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    settings = Settings(redis_url=f"redis://:{SECRETS[0]}@cache:6379/0", kafka_sasl_password=SECRETS[1])
    t = setup_telemetry(settings, "slsrec-test", reader=reader, span_exporter=spans)
    yield t, reader, spans
    t.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    """Metric name -> its data points, from one collection."""
    data = reader.get_metrics_data()
    if data is None:  # nothing recorded yet
        return {}
    metrics = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    return {m.name: list(m.data.data_points) for m in metrics}


def test_counts_match_what_was_sent(tel):
    t, reader, _ = tel
    for _ in range(7):
        t.events_in.add(1)
    t.recommendations_out.add(5)
    t.dead_letters.add(1, {"reason": "bad_json"})
    t.dead_letters.add(1, {"reason": "bad_json"})
    t.dead_letters.add(1, {"reason": "unknown_field"})
    t.cache_hits.add(3)
    t.cache_misses.add(1)
    t.drift_alerts.add(1, {"signal": "hit", "detector": "ADWIN"})
    t.sessions_active.add(1)
    t.sessions_active.add(1)
    t.sessions_active.add(-1)
    for ms in (3.0, 12.0, 40.0):
        t.e2e_latency.record(ms)
    t.redis_latency.record(0.7)

    p = points(reader)
    assert p["slsrec.events.in"][0].value == 7
    assert p["slsrec.recommendations.out"][0].value == 5
    assert {dp.attributes["reason"]: dp.value for dp in p["slsrec.dead_letters"]} == {"bad_json": 2, "unknown_field": 1}
    hits, misses = p["slsrec.cache.hits"][0].value, p["slsrec.cache.misses"][0].value
    assert hits / (hits + misses) == 0.75
    assert dict(p["slsrec.drift.alerts"][0].attributes) == {"signal": "hit", "detector": "ADWIN"}
    assert p["slsrec.sessions.active"][0].value == 1
    lat = p["slsrec.latency.e2e"][0]
    assert (lat.count, lat.sum, lat.min, lat.max) == (3, 55.0, 3.0, 40.0)
    # Millisecond buckets, not the SDK's defaults: 3 ms lands in (2, 5].
    assert lat.explicit_bounds[:3] == (1, 2, 5) and lat.bucket_counts[2] == 1
    assert p["slsrec.redis.latency"][0].count == 1


def test_versions_report_only_the_current_one(tel):
    t, reader, _ = tel
    assert "slsrec.model.version" not in points(reader)  # nothing before the first version is known
    t.set_versions(model="v1", long_term="v1")
    t.set_versions(model="v2")
    p = points(reader)
    assert [(dp.attributes["version"], dp.value) for dp in p["slsrec.model.version"]] == [("v2", 1)]
    assert [(dp.attributes["version"], dp.value) for dp in p["slsrec.longterm.version"]] == [("v1", 1)]


def test_batch_span_carries_size_timings_and_event_ids(tel):
    t, reader, spans = tel
    ids = ["e1", "e2", "e3"]
    with t.batch_span(ids) as span:
        span.set_attribute(ATTR_REDIS_MS, 1.5)
        span.set_attribute(ATTR_MODEL_MS, 4.0)
    with t.batch_span(["e4"]):
        pass
    (first, second) = spans.get_finished_spans()
    assert first.name == SPAN_BATCH
    assert first.attributes[ATTR_BATCH_SIZE] == 3
    assert list(first.attributes[ATTR_EVENT_IDS]) == ids
    assert (first.attributes[ATTR_REDIS_MS], first.attributes[ATTR_MODEL_MS]) == (1.5, 4.0)
    assert second.attributes[ATTR_BATCH_SIZE] == 1
    batch = points(reader)["slsrec.batch.size"][0]
    assert (batch.count, batch.sum) == (2, 4)


def test_publish_nests_in_retrain(tel):
    t, _, spans = tel
    with t.retrain_span(run="runs/r2") as retrain:
        with t.publish_span("v7", n_users=40):
            pass
        retrain.set_attribute("slsrec.outcome", "published")
    publish, retrain = spans.get_finished_spans()
    assert (publish.name, retrain.name) == (SPAN_PUBLISH, SPAN_RETRAIN)
    assert publish.parent.span_id == retrain.context.span_id
    assert publish.attributes[ATTR_VERSION] == "v7" and publish.attributes["n_users"] == 40
    assert retrain.attributes["slsrec.outcome"] == "published"


def test_no_secret_in_any_attribute_or_resource(tel):
    t, reader, spans = tel
    t.events_in.add(1)
    t.retrain_runs.add(1, {"outcome": "refused"})
    with t.batch_span(["e1"]):
        pass
    with t.retrain_span(), t.publish_span("v1"):
        pass
    exported = []
    for rm in reader.get_metrics_data().resource_metrics:
        exported.append(rm.resource.attributes)
        exported += [dp.attributes for sm in rm.scope_metrics for m in sm.metrics for dp in m.data.data_points]
    for s in spans.get_finished_spans():
        exported += [s.attributes, s.resource.attributes]
    text = repr([dict(a) for a in exported])
    assert "slsrec-test" in text  # the check sees the resource
    assert not any(secret in text for secret in SECRETS)


def test_off_by_default_costs_nothing():
    t = setup_telemetry(Settings(), "slsrec-test")
    t.events_in.add(1)  # no-op instruments accept the same calls
    with t.batch_span(["e1"]) as span:
        span.set_attribute(ATTR_REDIS_MS, 1.0)
        assert not span.is_recording()
    t.shutdown()


def test_console_exporter_prints_spans(capsys):
    t = setup_telemetry(Settings(otel_console=True), "slsrec-test")
    with t.publish_span("v3"):
        pass
    t.events_in.add(2)
    t.shutdown()  # flushes the last metrics
    out = capsys.readouterr().out
    assert '"name": "slsrec.publish"' in out and '"slsrec.version": "v3"' in out
    assert '"name": "slsrec.events.in"' in out


def test_otlp_http_posts_to_the_collector_paths():
    """A real HTTP server stands in for the collector; shutdown flushes both signals to it."""
    received: dict[str, bytes] = {}

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = setup_telemetry(Settings(otel_endpoint=f"http://127.0.0.1:{server.server_port}/"), "slsrec-test")
        t.events_in.add(1)
        with t.batch_span(["e42"]):
            pass
        t.shutdown()
    finally:
        server.shutdown()
    assert set(received) == {"/v1/metrics", "/v1/traces"}
    assert b"slsrec.events.in" in received["/v1/metrics"]
    assert b"e42" in received["/v1/traces"]

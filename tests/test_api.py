"""`slsrec api` through the real local Kafka and Redis, fed by the real flow (`slsrec serve`).

One flow and one API process serve the whole module (starting them costs most of its time); each test
sends its own users' clicks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from confluent_kafka import Producer
from pydantic import SecretStr

from conftest import assert_equals_offline, ordered_producer
from schemas.api import ApiError
from schemas.events import Recommendation
from slsrec import loadgen, local
from slsrec.api import create_app, running_api
from slsrec.checkpoint import save_run
from slsrec.data import Interactions, Vocab
from slsrec.demo import stop_flow
from slsrec.model import SLSRec, SLSRecConfig
from slsrec.publish import publish_run
from slsrec.serving import Offline, recommend_offline
from slsrec.settings import Settings
from slsrec.store import LongTermStore

pytestmark = pytest.mark.integration

N_ITEMS, DAY_MS, TOP_K, MAX_SEGMENT = 60, 86_400_000, 8, 8
USERS = ["ann", "ben", "cid", "dee", "eve"]  # eve has no history: cold start
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "img" / "live-page.png"


@dataclass
class World:
    settings: Settings
    api: str  # base URL of the running `slsrec api`
    model: SLSRec
    items: Vocab
    history: dict[str, list[tuple[str, int]]]
    producer: Producer
    sessions: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # what each user clicked, in order
    _n: int = 0

    def click(self, user: str, item: str, ts: int | None = None) -> str:
        """Produce one click; returns its event id."""
        ts = int(time.time() * 1000) if ts is None else ts
        self._n += 1
        event_id = f"{user}-{self._n}"
        event = {"event_id": event_id, "user_id": user, "item_id": item, "ts": ts, "event_type": "click"}
        self.producer.produce(self.settings.topic_clicks, json.dumps(event).encode(), key=user.encode())
        self.sessions.setdefault(user, []).append((item, ts))
        self.producer.poll(0)
        return event_id

    def get(self, user: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.api}/v1/users/{user}/recommendations", headers=headers, timeout=10)

    def wait_for(self, user: str, event_id: str, timeout_s: float = 90.0) -> httpx.Response:
        """The API's answer for ``user`` once it is the recommendation of ``event_id``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.get(user)
            if r.status_code == 200 and r.json()["event_id"] == event_id:
                return r
            time.sleep(0.2)
        raise AssertionError(f"the API did not serve the recommendation of {event_id} within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def world(services, tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("api")
    prefix = f"test-{uuid.uuid4().hex[:12]}."
    with local.scratch_topics(Settings(), prefix) as settings, local.scratch_redis_db() as redis_url:
        settings = settings.model_copy(update={
            "redis_url": SecretStr(redis_url), "top_k": TOP_K, "runs_dir": tmp / "runs", "recovery_dir": tmp / "rec",
            "api_group": f"{prefix}api"})
        torch.manual_seed(3)
        model = SLSRec(SLSRecConfig(n_users=len(USERS), n_items=N_ITEMS, d=16, hidden=16, max_segment=MAX_SEGMENT,
                                    long_len=10))
        items = Vocab([f"sku{k}" for k in range(1, N_ITEMS + 1)], padding=True)
        run = save_run(tmp / "tiny", model, name="slsrec", users=Vocab(USERS, padding=False), items=items,
                       dataset="in-test")
        rng = np.random.default_rng(3)
        now = int(time.time() * 1000)
        history = {u: [(f"sku{k}", now - 3 * DAY_MS + 60_000 * n) for n, k in
                       enumerate(rng.integers(1, N_ITEMS + 1, 12))] for u in USERS[:-1]}
        frame = pd.DataFrame([(u, i, t) for u, h in history.items() for i, t in h],
                             columns=["user_id", "item_id", "timestamp"])
        publish_run(run, LongTermStore(settings.redis_url), history=Interactions.from_frame(frame))

        flow_log = tmp / "flow.log"
        flow = subprocess.Popen([sys.executable, "-c", "from slsrec.cli import main; main()", "serve", "--run", str(run),
                                 "--no-recovery"], env={**os.environ, **settings.to_env()}, stdout=open(flow_log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with running_api(settings, tmp / "api.log") as api:
                yield World(settings, api.url, model.eval(), items, history, ordered_producer(settings))
        finally:
            stop_flow(flow)


def offline(world: World, user: str) -> Offline:
    known = USERS.index(user)
    return recommend_offline(world.model, world.items, known, world.history.get(user, []), world.sessions[user],
                             gap_ms=world.settings.session_gap_s * 1000, max_segment=MAX_SEGMENT, top_k=TOP_K)


def test_after_a_replay_the_api_serves_each_users_latest_recommendation(world):
    start = int(time.time() * 1000) - 120_000
    last = {}
    for n in range(5):  # interleaved, as live traffic
        for j, user in enumerate(["ann", "ben", "eve"]):
            last[user] = world.click(user, f"sku{7 * n + j + 1}", start + 10_000 * n + j)
    world.producer.flush(30)

    for user, event_id in last.items():
        r = world.wait_for(user, event_id)
        rec = Recommendation.model_validate_json(r.content)  # the contract, byte for byte from the flow
        assert_equals_offline(rec, offline(world, user))  # the latest one, explanation included
        assert rec.short_term_items == [item for item, _ in world.sessions[user]]  # one segment: every click
        assert rec.cold_start == (user == "eve") and rec.model_version == "tiny"
        assert r.headers["content-type"] == "application/json" and r.headers["etag"].startswith('"')

        # The ETag: 304 without a body while it matches, 200 with the record otherwise.
        same = world.get(user, **{"If-None-Match": r.headers["etag"]})
        assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", r.headers["etag"])
        assert world.get(user, **{"If-None-Match": '"stale"'}).status_code == 200

    unknown = world.get("nobody-" + uuid.uuid4().hex[:6])
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert ApiError.model_validate_json(unknown.content).error == "not_found"
    assert world.get("bad%01id").status_code == 422  # a control character is never an id


def test_a_record_that_is_no_recommendation_is_skipped_and_counted(world):
    for raw in (b"not json", b'{"user_id": "ann"}'):
        world.producer.produce(world.settings.topic_recommendations, raw, key=b"ann")
    event_id = world.click("ann", "sku40")  # and the stream goes on
    world.producer.flush(30)
    world.wait_for("ann", event_id)
    deadline = time.monotonic() + 30
    while 'slsrec_api_invalid_records_total 2.0' not in (text := httpx.get(f"{world.api}/metrics").text):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.2)


def test_a_restarted_api_serves_at_once_from_redis_without_kafka(world):
    """A fresh app that consumes nothing answers from what Redis holds (the restart case)."""
    from fastapi.testclient import TestClient

    event_id = world.click("dee", "sku3")
    world.producer.flush(30)
    stored = world.wait_for("dee", event_id).content
    offline_kafka = world.settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    with TestClient(create_app(offline_kafka, ingest=False)) as client:
        r = client.get("/v1/users/dee/recommendations")
        assert (r.status_code, r.content) == (200, stored)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] == "ok" and ready.json()["kafka"] != "ok"


def test_the_benchmark_client_sends_on_schedule_and_counts_every_answer(world):
    """`slsrec bench-api`'s load client against the real API: every request of the measured seconds is
    sent and answered once, 200s and 404s told apart by status, each latency from its scheduled time."""
    event_id = world.click("cid", "sku4")
    world.producer.flush(30)
    world.wait_for("cid", event_id)
    load = loadgen.run(world.api, ["cid", f"nobody-{uuid.uuid4().hex[:6]}"], rate=200, warmup_s=0.5, duration_s=1.0)
    assert (load.errors, load.status) == (0, {200: 100, 404: 100})  # round robin over the two users
    assert len(load.latencies_ms) == len(load.send_lag_ms) == 200 and (load.latencies_ms > 0).all()
    assert load.cpu_s > 0


class SSEReader:
    """Reads `recommendation` events of one stream in a thread, with the wall time each arrived."""

    def __init__(self, url: str):
        self.events: list[tuple[float, dict]] = []
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()
        assert self._opened.wait(10), "the stream did not open"

    def _run(self, url: str) -> None:
        with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=None)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            self._response = r
            self._opened.set()
            kind = None
            try:
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and kind == "recommendation":
                        self.events.append((time.time() * 1000, json.loads(line.split(":", 1)[1])))
            except (httpx.HTTPError, httpx.StreamError):
                if not self._stop.is_set():
                    raise

    def wait(self, event_id: str, timeout_s: float = 60.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for got in self.events:
                if got[1]["event_id"] == event_id:
                    return got
            time.sleep(0.02)
        raise AssertionError(f"no event for {event_id} within {timeout_s:.0f} s")

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            self._response.close()
        self._thread.join(10)


def test_server_sent_events_deliver_each_update_within_a_second(world):
    first = world.click("cid", "sku11")
    world.producer.flush(30)
    world.wait_for("cid", first)
    stream = SSEReader(f"{world.api}/v1/users/cid/recommendations/stream")
    try:
        assert stream.wait(first)  # the current one comes first
        delays = []
        for item in ("sku12", "sku13", "sku14", "sku15"):
            event_id = world.click("cid", item)
            world.producer.flush(10)
            arrived_ms, rec = stream.wait(event_id)
            delays.append(arrived_ms - rec["emit_ts"])  # the flow's emit time to the browser, one machine's clock
            time.sleep(0.3)
        # One event per new recommendation, in order, nothing twice.
        ids = [rec["event_id"] for _, rec in stream.events]
        assert ids == sorted(set(ids), key=ids.index) and ids[-1] == event_id
    finally:
        stream.close()
    assert max(delays) <= 1000, delays


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (installed with apt-get when missing; never a browser download)."""
    try:
        return local.ensure_command("chromium", "chromium")
    except Exception as e:
        pytest.fail(f"the live page test needs Debian's chromium: {e}", pytrace=False)


def test_the_live_page_follows_the_busiest_user_and_explains_each_item(world, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    stop, last = threading.Event(), {}

    def replay() -> None:  # a live stream: "ben" is the busiest user, others click now and then
        n = 0
        while not stop.is_set():
            user = "ben" if n % 3 else USERS[n // 3 % len(USERS)]
            last[user] = world.click(user, f"sku{n % N_ITEMS + 1}")
            world.producer.flush(5)
            n += 1
            time.sleep(0.25)

    traffic = threading.Thread(target=replay, daemon=True)
    traffic.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 720})
            page.goto(world.api + "/")
            expect(page.get_by_test_id("user")).to_have_text("ben", timeout=30_000)  # followed: the busiest
            expect(page.get_by_test_id("busiest").locator("button").first).to_contain_text("ben", timeout=10_000)
            updates = page.get_by_test_id("updates")
            expect(updates).not_to_have_text("0", timeout=10_000)
            seen = int(updates.inner_text())
            page.wait_for_function(f"Number(document.querySelector('[data-testid=updates]').textContent) >= {seen + 3}",
                                   timeout=15_000)  # the page changes as the clicks arrive
            stop.set()
            traffic.join(10)
            world.producer.flush(10)
            rec = world.wait_for("ben", last["ben"]).json()
            expect(page.get_by_test_id("event")).to_contain_text(rec["event_id"] + " ", timeout=10_000)
            page.screenshot(path=str(tmp_path / "live-page.png"))

            expect(page.get_by_test_id("model-version")).to_have_text(rec["model_version"])
            expect(page.get_by_test_id("flag-cold_start")).to_have_text("cold_start: no")
            expect(page.get_by_test_id("alpha")).to_have_text(f"{rec['alpha']:.3f}")
            chips = page.get_by_test_id("session-items").locator(".chip").all_inner_texts()
            assert chips == rec["short_term_items"] and chips
            rows = page.get_by_test_id("item")
            expect(rows).to_have_count(len(rec["items"]))
            for k, item in enumerate(rec["items"]):
                row = rows.nth(k)
                assert row.locator(".id").inner_text() == item["item_id"]
                assert float(row.locator(".long-part").inner_text()) == pytest.approx(item["long_score"], abs=1e-3)
                assert float(row.locator(".short-part").inner_text()) == pytest.approx(item["short_score"], abs=1e-3)
                long_w = row.locator(".bar .long").evaluate("e => e.getBoundingClientRect().width")
                short_w = row.locator(".bar .short").evaluate("e => e.getBoundingClientRect().width")
                total = abs(item["long_score"]) + abs(item["short_score"])
                assert long_w / (long_w + short_w) == pytest.approx(abs(item["long_score"]) / total, abs=0.02)
            browser.close()
    finally:
        stop.set()
        traffic.join(10)
    if os.environ.get("SLSREC_UPDATE_SCREENSHOT"):  # docs/img/live-page.png for the README
        shutil.copy(tmp_path / "live-page.png", SCREENSHOT)


def test_openapi_cors_and_metrics(redis_db):
    """The contract is published from schemas/, CORS answers only the configured origins, and the
    metrics count what was served."""
    from fastapi.testclient import TestClient

    settings = Settings(redis_url=redis_db, api_cors_origins=["https://shop.example"])
    with TestClient(create_app(settings, ingest=False)) as client:
        spec = client.get("/openapi.json").json()
        get = spec["paths"]["/v1/users/{user_id}/recommendations"]["get"]
        assert get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Recommendation")
        assert {"long_score", "short_score"} <= set(spec["components"]["schemas"]["RankedItem"]["properties"])
        assert "ApiError" in get["responses"]["404"]["content"]["application/json"]["schema"]["$ref"]

        allowed = client.get("/v1/users/nobody/recommendations", headers={"Origin": "https://shop.example"})
        assert allowed.status_code == 404 and allowed.headers["access-control-allow-origin"] == "https://shop.example"
        other = client.get("/v1/users/nobody/recommendations", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options("/v1/users/u1/recommendations", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "If-None-Match"})
        assert preflight.status_code == 200 and "GET" in preflight.headers["access-control-allow-methods"]

        metrics = client.get("/metrics").text
        assert 'slsrec_api_requests_total{code="404",endpoint="recommendations"} 2.0' in metrics
        assert client.get("/healthz").json() == {"status": "ok"}

"""Service edge cases: input validation of events (future / non-numeric timestamps, non-numeric values),
config defaults that the route bounds reject, resources released at shutdown, config values checked at load, and the
serving benchmark's statistics."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmrec.config import ConfigError
from llmrec.service.config import load_service_config
from tests.test_service import GenreRecommender, err, make_client


@pytest.fixture()
def client(tiny_dataset, tmp_path):
    c, rec = make_client(tiny_dataset, tmp_path)
    with c:
        c.rec = rec
        yield c


def _version(client, user):
    return client.get(f"/v1/users/{user}/history", params={"limit": 1}).json()["history_version"]


def test_event_timestamp_in_the_future_is_rejected_and_changes_nothing(client):
    """A future-dated event would sort as the user's latest event for ever (histories are ordered by timestamp)."""
    before = _version(client, "u1")
    for ts in (int(time.time()) + 86_400, 30_000_000_000):
        r = client.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "type": "view", "timestamp": ts})
        assert r.status_code == 422, r.text
        e = err(r)
        assert e["field"] == "body.timestamp" and "future" in e["message"] and str(ts) in e["message"]
    assert _version(client, "u1") == before
    ok = client.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "type": "view",
                                         "timestamp": int(time.time()) - 10})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("field,value", [("timestamp", "123"), ("timestamp", True), ("timestamp", 12.0),
                                         ("value", True), ("value", "4")])
def test_event_non_numeric_timestamp_or_value_is_rejected(client, field, value):
    """JSON strings and booleans are not numbers: `"timestamp": true` must not be stored as 1970-01-01T00:00:01."""
    before = _version(client, "u1")
    body = {"user_id": "u1", "item_id": "i1", "type": "rating", "value": 4.0, field: value}
    r = client.post("/v1/events", json=body)
    assert r.status_code == 422, r.text
    assert err(r)["field"] == f"body.{field}"
    assert _version(client, "u1") == before
    # integral JSON numbers stay valid for value
    assert client.post("/v1/events", json={**body, field: 3} if field == "value" else
                       {k: v for k, v in body.items() if k != field}).status_code == 201


def test_history_without_limit_works_when_max_history_page_is_below_the_default(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, max_history_page=10)
    with c:
        r = c.get("/v1/users/u1/history")
        assert r.status_code == 200, r.text
        assert len(r.json()["events"]) == 10
        assert c.get("/v1/users/u1/history", params={"limit": 11}).status_code == 422


def test_shutdown_closes_the_event_store(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path)
    store = c.app.state.service.store
    closed = []
    real = store.close
    store.close = lambda: (closed.append(1), real())
    with c:
        assert c.get("/v1/users/u1/history").status_code == 200
    assert closed == [1]


def test_runtime_shutdown_stops_micro_batcher_threads(tiny_dataset, tiny_home, tmp_path, monkeypatch):
    """The micro-batching worker threads build_runtime starts are stopped when the app shuts down."""
    from fastapi.testclient import TestClient

    from llmrec.service import launch
    from llmrec.service.batching import MicroBatchingBackend
    from llmrec.service.config import LLMConfig, ServiceConfig

    class FakeBackend:
        name = "fake"

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(launch, "plan_backend", lambda cfg: launch.BackendPlan("transformers", "fake"))
    monkeypatch.setattr(launch, "build_backends", lambda cfg, plan: ({None: FakeBackend()}, None, "fake"))
    monkeypatch.setattr(launch, "build_recommenders", lambda cfg, ds, backends: {None: GenreRecommender(ds)})
    cfg = ServiceConfig(dataset="tiny", store_url=f"sqlite:///{tmp_path / 'ev.db'}", batching="micro",
                        llm=LLMConfig(backend="transformers"))
    rt = launch.build_runtime(cfg)
    try:
        assert isinstance(rt.backend, MicroBatchingBackend)
        with TestClient(rt.app) as c:
            assert c.get("/health").json()["batching"] == "micro"
        rt.backend._worker.join(timeout=5)
        assert not rt.backend._worker.is_alive()
    finally:
        rt.close()


@pytest.mark.parametrize("bad,msg", [("port=0", "port: must be within 1..65535"),
                                     ("port=70000", "port: must be within 1..65535"),
                                     ("llm.vllm_port=-1", "llm.vllm_port: must be within 1..65535"),
                                     ("llm.max_model_len=0", "llm.max_model_len: must be >= 1"),
                                     ("like_threshold=nan", "like_threshold: must be a finite number"),
                                     ("retrieval_weight=nan", "retrieval_weight: must be a finite number >= 0"),
                                     ("retrieval_weight=-1", "retrieval_weight: must be a finite number >= 0")])
def test_config_rejects_out_of_range_values(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        load_service_config(None, [bad], environ={})


# ---------------------------------------------------------------------------------------------- bench statistics
@pytest.fixture(scope="module")
def bench_serving(load_script):
    return load_script("serve/bench_serving.py")


def test_percentile_is_nearest_rank(bench_serving):
    vals = [float(v) for v in range(1, 101)]
    assert bench_serving.percentile(vals, 0.95) == 95.0
    assert bench_serving.percentile(vals, 0.50) == 50.0
    assert bench_serving.percentile([3.0], 0.95) == 3.0
    assert bench_serving.percentile([1.0, 2.0], 0.95) == 2.0
    assert bench_serving.percentile([], 0.95) is None


def test_load_run_counts_every_request_and_keeps_errors_out_of_latency(bench_serving):
    """A 200 with an unreadable body must not kill the client thread (its remaining requests vanished from the
    counts); failed requests are counted as errors, and the latency percentiles are those of the 200 answers."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            user = self.path.split("/")[3]
            if user.startswith("slow"):
                time.sleep(0.3)
            body = b"not json" if user == "garbled" else json.dumps({"degraded": False}).encode()
            code = 500 if "fail" in user else 200
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        users = ["garbled", "u1", "u2", "u3", "slow-fail1", "slow-fail2"]
        r = bench_serving.load_run(base, users, 1, 10.0)
        assert sum(r["status"].values()) == len(users), r["status"]
        assert r["status"]["200"] == 3 and r["status"]["500"] == 2
        assert r["errors"] == 3
        assert r["p95_ms"] < 250, r  # the slow failures are not in the latency of the answered requests
    finally:
        srv.shutdown()


def test_health_flags_the_no_llm_degraded_mode(tiny_dataset, tmp_path):
    """/health says in a field, not only in prose, that every answer comes from the fallback (no LLM backend)."""
    c, _ = make_client(tiny_dataset, tmp_path, rec=None)
    with c:
        h = c.get("/health").json()
        assert h["degraded"] is True and h["backend"] == "collaborative"
        assert c.get("/v1/users/u1/recommendations").json()["degraded"] is True
    c, _ = make_client(tiny_dataset, tmp_path / "llm")
    with c:
        assert c.get("/health").json()["degraded"] is False

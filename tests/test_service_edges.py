"""Service edge cases: config defaults that the route bounds reject, resources released at shutdown, config values
checked at load, /health's degraded flag."""

from __future__ import annotations

import pytest

from llmrec.config import ConfigError
from llmrec.service.config import load_service_config
from tests.test_service import GenreRecommender, make_client


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


def test_405_lists_the_allowed_methods(tiny_dataset, tmp_path):
    """The error handler rebuilt every HTTP error as JSON and dropped its headers: a 405 came without the `Allow`
    header RFC 9110 requires, so a client could not tell which method the route takes."""
    c, _ = make_client(tiny_dataset, tmp_path)
    with c:
        r = c.put("/v1/events", json={})
        assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
        assert r.headers.get("allow") == "POST"
        r = c.delete("/v1/users/u1/history")
        assert r.status_code == 405 and r.headers.get("allow") == "GET"


def test_no_llm_and_no_fallback_is_refused_at_config_load():
    """`llm.backend: none` with `fallback: none` started a service that answered every recommendation with 503 while
    /health said ok and /ready said ready; refused at load, naming both keys."""
    with pytest.raises(ConfigError, match="fallback: none with llm.backend: none"):
        load_service_config(None, ["llm.backend=none", "fallback=none"], environ={})
    assert load_service_config(None, ["llm.backend=none"], environ={}).fallback == "collaborative"
    assert load_service_config(None, ["fallback=none"], environ={}).llm.backend == "auto"


@pytest.mark.parametrize("key,msg", [("", "api_key: empty"), (" s3cret", "surrounding spaces"),
                                     ("s3cret\n", "holds '\\\\n'"), ("clé", "holds 'é'")])
def test_api_key_that_turns_auth_off_or_can_never_match_is_refused(key, msg):
    """An empty LLMREC_SERVE_API_KEY (e.g. a secret that failed to render) turned the key check off without a word;
    a key with surrounding spaces or non-ASCII characters could never be sent (HTTP strips the spaces, clients send
    ASCII headers), so every /v1 call got 401. Refused at load."""
    with pytest.raises(ConfigError, match=msg):
        load_service_config(None, [], environ={"LLMREC_SERVE_API_KEY": key})


def test_api_key_checks_keep_valid_keys():
    assert load_service_config(None, [], environ={"LLMREC_SERVE_API_KEY": "a b~!0"}).api_key == "a b~!0"
    assert load_service_config(None, ["api_key=s3cret"], environ={}).api_key == "s3cret"
    assert load_service_config(None, [], environ={}).api_key is None
    with pytest.raises(ConfigError, match="api_key: holds 'é'"):
        load_service_config(None, ["api_key=clé"], environ={})


def test_a_store_that_is_locked_or_down_gives_503_and_changes_nothing(tiny_dataset, tmp_path, caplog):
    """An event store error (SQLite locked past its busy timeout by another process, disk full, database unreachable)
    was a 500 'internal error', which reads as a bug and is not retried; it is a 503 with Retry-After, nothing
    committed, and the log names the cause without the SQL statement's parameters (user ids)."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    c, _ = make_client(tiny_dataset, tmp_path)
    store = c.app.state.service.store

    def locked(*a, **k):
        raise OperationalError("INSERT INTO events ...", ("secretuser7", "i1"), sqlite3.OperationalError(
            "database is locked"))

    with c:
        before = c.get("/v1/users/u1/history", params={"limit": 1}).json()["history_version"]
        real_add, real_hist = store.add_event_versioned, store.history_with_version
        store.add_event_versioned = locked
        store.history_with_version = locked
        r = c.post("/v1/events", json={"user_id": "secretuser7", "item_id": "i1", "type": "view"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "store_unavailable" and r.headers.get("retry-after") == "1"
        assert c.get("/v1/users/u1/recommendations").status_code == 503
        assert c.get("/v1/users/u1/history").status_code == 503
        store.add_event_versioned, store.history_with_version = real_add, real_hist
        assert c.get("/v1/users/u1/history", params={"limit": 1}).json()["history_version"] == before
    logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("llmrec"))
    assert "database is locked" in logs and "secretuser7" not in logs


def test_api_key_is_checked_when_the_app_is_mounted_under_a_prefix(tiny_dataset, tmp_path):
    """The key check looked at the raw path (`/api/v1/...` when the app is mounted under /api or run with uvicorn
    --root-path /api), saw no `/v1/` prefix and let the request through without a key, while the route matched."""
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.routing import Mount

    c, _ = make_client(tiny_dataset, tmp_path, api_key="s3cret")
    outer = TestClient(Starlette(routes=[Mount("/api", app=c.app)]))
    assert outer.get("/api/v1/users/u1/history").status_code == 401
    assert outer.get("/api/v1/users/u1/history", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert outer.get("/api/health").status_code == 200


def test_head_on_health_and_ready_answers_like_get_without_a_body(tiny_dataset, tmp_path):
    """`HEAD /health` and `HEAD /ready` answered 405: probes (load balancers, uptime checks) that send HEAD saw the
    service as down. They answer with the GET's status and no body; /ready's 503 when not ready, too."""
    c, _ = make_client(tiny_dataset, tmp_path)
    with c:
        for path in ("/health", "/ready"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", (path, r.status_code, r.text)
        assert c.post("/health").headers.get("allow") == "GET, HEAD"
        assert set(c.get("/openapi.json").json()["paths"]["/health"]) == {"get"}

        def down(user_id):
            raise RuntimeError("store down")

        c.app.state.service.store.version = down
        assert c.get("/ready").status_code == 503
        r = c.head("/ready")
        assert r.status_code == 503 and r.content == b""


def test_a_configured_adapter_the_backend_did_not_load_is_a_503_naming_it(tiny_dataset, tmp_path):
    """An adapter of the registry (llm.adapters) that the backend has not loaded got 422 `validation_error`: a client
    error for a server fault (the request named a valid adapter). It is a 503 naming the adapter and the field."""
    c, rec = make_client(tiny_dataset, tmp_path)  # the registry has `yesno`; the fake's score_yesno takes no adapter
    with c:
        r = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"], "adapter": "yesno"})
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert e["type"] == "adapter_unavailable" and e["field"] == "body.adapter" and "'yesno'" in e["message"]
        assert c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]}).status_code == 200

        def no_adapter_recommend(user_id, k=10, explain=True, history=None):
            return GenreRecommender.recommend(rec, user_id, k, explain, history)

        rec.recommend = no_adapter_recommend
        r = c.get("/v1/users/u1/recommendations", params={"adapter": "yesno"})
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert e["type"] == "adapter_unavailable" and e["field"] == "query.adapter" and "'yesno'" in e["message"]


def test_an_unexpected_error_is_logged_with_its_type_and_frames_but_not_its_message(tiny_dataset, tmp_path, caplog):
    """The catch-all handlers logged the whole traceback, exception messages included (a KeyError of a user id, a
    driver error quoting a query's parameters): user ids never appear in logs. Logged: the type, where it was raised
    and the frames of the exception and its causes; no message."""
    import logging

    from fastapi.testclient import TestClient

    c, _ = make_client(tiny_dataset, tmp_path)
    store = c.app.state.service.store

    def broken(user_id, limit=None, **kw):
        try:
            raise LookupError(f"no row for {user_id}")
        except LookupError as e:
            raise KeyError(user_id) from e

    caplog.set_level(logging.DEBUG)
    with c:
        store.history_with_version = broken
        r = c.get("/v1/users/secretuser9/history")
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    fmt = logging.Formatter("%(message)s")
    logs = "\n".join(fmt.format(r) for r in caplog.records if r.name.startswith("llmrec"))
    assert "secretuser9" not in logs, logs
    assert "KeyError at " in logs and "in broken" in logs and "LookupError (message withheld)" in logs, logs
    assert "direct cause" in logs

    # an error outside the routes (in the request middleware itself) is answered and logged by the app's outermost
    # middleware: it does not reach the server (TestClient raises what reaches it), whose "Exception in ASGI
    # application" log would print the message
    c, _ = make_client(tiny_dataset, tmp_path / "mw")
    metrics = c.app.state.metrics

    class Boom:
        user = "secretuser8"

        def labels(self, **kw):
            raise ValueError(f"user {self.user}")

    caplog.clear()
    with TestClient(c.app) as c2:
        metrics.latency = Boom()
        r = c2.get("/health")
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
    logs = "\n".join(fmt.format(r) for r in caplog.records if r.name.startswith("llmrec"))
    assert "secretuser8" not in logs and "ValueError at " in logs and "in labels" in logs, logs


def test_history_pages_back_to_the_oldest_event_with_a_before_cursor(tiny_dataset, tmp_path):
    """`GET /v1/users/{id}/history` had only `limit` (at most max_history_page): a user with more events than that
    (ML-1M users have up to ~2,300) could never read the older ones. `next_before` and `before=<timestamp>:<id>` page
    back in the store's order (timestamp, then insertion), ties included, without gaps or repeats, and a page stays
    in place when newer events arrive."""
    c, _ = make_client(tiny_dataset, tmp_path, max_history_page=5)
    with c:
        for i in range(7):  # same timestamp: the order between them is the insertion order
            assert c.post("/v1/events", json={"user_id": "pager", "item_id": f"i{i}", "type": "click",
                                              "timestamp": 1000}).status_code == 201
        want = list(tiny_dataset.history("u2", before="all")["item_id"])
        for user, expected in (("u2", want), ("pager", [f"i{i}" for i in range(7)])):
            pages, before = [], None
            while True:
                params = {"limit": 3} if before is None else {"limit": 3, "before": before}
                r = c.get(f"/v1/users/{user}/history", params=params)
                assert r.status_code == 200, r.text
                page = r.json()
                assert page["events"]  # never an empty last page
                pages.insert(0, [e["item_id"] for e in page["events"]])
                before = page["next_before"]
                if before is None:
                    break
                if len(pages) == 1:  # a newer event arriving between two pages does not shift the next page
                    assert c.post("/v1/events", json={"user_id": user, "item_id": "i9", "type": "view"}
                                  ).status_code == 201
            assert [i for p in pages for i in p] == expected, (user, pages)
        # a page that ends exactly on the oldest event says so (no empty page after it)
        r = c.get("/v1/users/pager/history", params={"limit": 5, "before": "1000:999999"}).json()
        assert [e["item_id"] for e in r["events"]] == [f"i{i}" for i in range(2, 7)] and r["next_before"]
        r = c.get("/v1/users/pager/history", params={"limit": 2, "before": r["next_before"]}).json()
        assert [e["item_id"] for e in r["events"]] == ["i0", "i1"] and r["next_before"] is None
        for bad in ("abc", "10", "1:2:3", "-1:5", "1:" + "9" * 19):
            r = c.get("/v1/users/u2/history", params={"before": bad})
            assert r.status_code == 422 and r.json()["error"]["field"] == "query.before", (bad, r.text)
        assert c.get("/v1/users/nobody/history", params={"before": "1:1"}).status_code == 404


def test_a_rating_outside_the_datasets_scale_is_refused_naming_the_range(tiny_dataset, tmp_path):
    """Rating values were unbounded (1e9 or -5 was stored, read as a like or a dislike, and written into the user's
    prompts). A rating outside the dataset's scale (its lowest..highest rating when its labels come from ratings;
    `rating_range` when set) is a 422 naming body.value and the range, and changes nothing."""
    assert tiny_dataset.manifest["label_rule"] == "rating_threshold"
    c, _ = make_client(tiny_dataset, tmp_path)
    ev = {"user_id": "u1", "item_id": "i1", "type": "rating"}
    with c:
        before = c.get("/v1/users/u1/history", params={"limit": 1}).json()["history_version"]
        for bad in (1e9, -5, 0.5, 5.01):
            r = c.post("/v1/events", json={**ev, "value": bad})
            assert r.status_code == 422, (bad, r.text)
            e = r.json()["error"]
            assert e["field"] == "body.value" and "1..5" in e["message"], e
        r = c.post("/v1/events", content=b'{"user_id": "u1", "item_id": "i1", "type": "rating", "value": NaN}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "body.value", r.text
        assert c.get("/v1/users/u1/history", params={"limit": 1}).json()["history_version"] == before
        for ok in (1, 3.5, 5):
            assert c.post("/v1/events", json={**ev, "value": ok}).status_code == 201
        # a view's value is a weight, not a rating: not bounded by the scale
        assert c.post("/v1/events", json={**ev, "type": "view", "value": 120}).status_code == 201
    c, _ = make_client(tiny_dataset, tmp_path / "configured", rating_range=[0, 10])
    with c:
        assert c.post("/v1/events", json={**ev, "value": 10}).status_code == 201
        r = c.post("/v1/events", json={**ev, "value": 11})
        assert r.status_code == 422 and "0..10" in r.json()["error"]["message"]


def test_rating_range_must_be_two_finite_ordered_numbers():
    for bad in ("[5, 1]", "[1]", "[1, .inf]", "[1, 1]"):
        with pytest.raises(ConfigError, match="rating_range: must be"):
            load_service_config(None, [f"rating_range={bad}"], environ={})
    assert load_service_config(None, ["rating_range=[1, 5]"], environ={}).rating_range == [1.0, 5.0]

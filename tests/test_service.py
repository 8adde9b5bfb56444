"""Recommendation service routes, error shape, cache versioning, fallback, limits, auth, fuzzing, log privacy.

The recommender here is a small class with the `Recommender` interface (recommend / score_yesno) that ranks by the
user's liked genres, so route behaviour (history passing, cache keys, errors) is tested apart from the LLM stack."""

from __future__ import annotations

import logging
import random
import string
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from llmrec.config import ConfigError
from llmrec.ranking.recommender import RecItem, Recommendation
from llmrec.service.app import create_app
from llmrec.service.config import LLMConfig, ServiceConfig, load_service_config
from llmrec.store import EventStore


class GenreRecommender:
    """Ranks unseen items by how many liked history items share their genre; fails or sleeps on demand."""

    def __init__(self, ds, fail: bool = False, sleep_s: float = 0.0):
        self.ds, self.fail, self.sleep_s = ds, fail, sleep_s
        self.genre = dict(zip(ds.items["item_id"], ds.items["genres"]))
        self.calls: list[dict] = []

    def _scores(self, history):
        liked = [self.genre[e.item_id] for e in history if e.liked]
        seen = {e.item_id for e in history}
        out = {i: liked.count(self.genre[i]) + int(i[1:]) * 1e-3 for i in self.ds.item_ids if i not in seen}
        return out

    def recommend(self, user_id, k=10, explain=True, history=None, adapter=None):
        self.calls.append({"user_id": user_id, "k": k, "history": history, "adapter": adapter})
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail:
            raise ConnectionError("backend down")
        sc = self._scores(history)
        top = sorted(sc, key=lambda i: -sc[i])[:k]
        items = [RecItem(i, self.ds.titles[self.ds.item_index[i]], sc[i], r + 1) for r, i in enumerate(top)]
        last = history[-1] if history else None
        evidence = ([{"item_id": last.item_id, "title": self.ds.titles[self.ds.item_index[last.item_id]],
                      "shared": ["Drama"]}] if explain and last is not None else [])
        fallback = explain and user_id == "u5"  # u5's generated text failed the post-check: the template is shown
        return Recommendation(user_id, items, explanation="because you liked them" if explain else None,
                              explanation_fallback=fallback, model="fake", adapter=adapter, backend="fake",
                              evidence=evidence,
                              explanation_fallback_reasons=["names a title twice"] if fallback else [])

    def score_yesno(self, user_id, item_ids, history=None):
        if self.fail:
            raise ConnectionError("backend down")
        liked = [self.genre[e.item_id] for e in history if e.liked]
        return [float(1 / (1 + np.exp(-(liked.count(self.genre[i]) - 2)))) for i in item_ids]


def make_client(ds, tmp_path, rec="ok", timeout_s=60.0, **cfg_kw):
    llm = LLMConfig(adapters={"yesno": "/nowhere/yesno"}, timeout_s=timeout_s)
    cfg = ServiceConfig(dataset="tiny", llm=llm, **cfg_kw)
    store = EventStore.from_dataset(ds, url=f"sqlite:///{tmp_path / 'svc.db'}")
    recommender = {"ok": GenreRecommender(ds), "down": GenreRecommender(ds, fail=True),
                   "slow": GenreRecommender(ds, sleep_s=2.0), None: None}[rec]
    app = create_app(cfg, recommender=recommender, store=store, catalogue=ds, backend_name="fake", model_name="fake")
    return TestClient(app), recommender


@pytest.fixture()
def client(tiny_dataset, tmp_path):
    c, rec = make_client(tiny_dataset, tmp_path)
    with c:
        c.rec = rec
        yield c


def err(resp):
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "type", "message", "field"}
    assert body["error"]["code"] == resp.status_code
    return body["error"]


def test_health_ready_docs(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["backend"] == "fake" and h["dataset"] == "tiny" and h["adapters"] == ["yesno"]
    assert client.get("/ready").json()["ready"] is True
    assert "/v1/users/{user_id}/recommendations" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_recommendations_shape_and_history_passed(client, tiny_dataset):
    r = client.get("/v1/users/u3/recommendations", params={"k": 5, "explain": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [it["rank"] for it in body["items"]] == [1, 2, 3, 4, 5]
    assert body["explanation"] and body["backend"] == "fake" and body["degraded"] is False and body["cached"] is False
    last = client.rec.calls[-1]["history"][-1]
    assert body["explanation_evidence"] == [{"item_id": last.item_id, "title": tiny_dataset.titles[
        tiny_dataset.item_index[last.item_id]], "shared": ["Drama"]}]
    seen = set(tiny_dataset.history("u3", before="all")["item_id"])
    assert not seen & {it["item_id"] for it in body["items"]}
    hist = client.rec.calls[-1]["history"]
    assert [e.item_id for e in hist] == list(tiny_dataset.history("u3", before="all")["item_id"])


def test_a_fallback_explanation_says_why_the_generated_one_failed(client):
    body = client.get("/v1/users/u5/recommendations", params={"k": 3, "explain": "true"}).json()
    assert body["explanation_fallback"] is True and body["explanation_fallback_reasons"] == ["names a title twice"]
    ok = client.get("/v1/users/u3/recommendations", params={"k": 3, "explain": "true"}).json()
    assert ok["explanation_fallback"] is False and ok["explanation_fallback_reasons"] == []
    schema = client.get("/openapi.json").json()["components"]["schemas"]["RecommendationResponse"]
    assert "explanation_fallback_reasons" in schema["properties"]


def test_new_event_changes_next_recommendation(client):
    first = client.get("/v1/users/u5/recommendations", params={"k": 3}).json()
    again = client.get("/v1/users/u5/recommendations", params={"k": 3}).json()
    assert again["cached"] is True and again["items"] == first["items"]
    top = first["items"][0]["item_id"]
    r = client.post("/v1/events", json={"user_id": "u5", "item_id": top, "type": "purchase"})
    assert r.status_code == 201 and r.json()["history_version"] == first["history_version"] + 1
    after = client.get("/v1/users/u5/recommendations", params={"k": 3}).json()
    assert after["cached"] is False and after["history_version"] == first["history_version"] + 1
    assert top not in {it["item_id"] for it in after["items"]}


def test_unknown_user_404(client):
    r = client.get("/v1/users/nobody/recommendations")
    assert r.status_code == 404 and err(r)["type"] == "not_found"
    assert client.get("/v1/users/nobody/history").status_code == 404


@pytest.mark.parametrize(
    "params,field",
    [({"k": 0}, "query.k"), ({"k": 101}, "query.k"), ({"k": "ten"}, "query.k"),
     ({"explain": "maybe"}, "query.explain"),
     ({"adapter": "../../etc/passwd"}, "query.adapter"), ({"adapter": "other"}, "query.adapter")],
)
def test_bad_query_422_names_field(client, params, field):
    r = client.get("/v1/users/u1/recommendations", params=params)
    assert r.status_code == 422 and err(r)["field"] == field


def test_adapter_from_registry_is_passed(client):
    r = client.get("/v1/users/u1/recommendations", params={"adapter": "yesno"})
    assert r.status_code == 200 and client.rec.calls[-1]["adapter"] == "yesno"


@pytest.mark.parametrize(
    "body,field",
    [({"user_id": "u1", "item_id": "nope", "type": "view"}, "body.item_id"),
     ({"user_id": "u1", "item_id": "i1"}, "body.type"),
     ({"user_id": "u1", "item_id": "i1", "type": "like"}, "body.type"),
     ({"user_id": "u1", "item_id": "i1", "type": "rating"}, "body.value"),
     ({"user_id": "u 1/x", "item_id": "i1", "type": "view"}, "body.user_id"),
     ({"user_id": "u1", "item_id": "i1", "type": "view", "timestamp": -5}, "body.timestamp"),
     ({"user_id": "u1", "item_id": "i1", "type": "view", "extra": 1}, "body.extra")],
)
def test_bad_event_422_names_field(client, body, field):
    r = client.post("/v1/events", json=body)
    assert r.status_code == 422, r.text
    assert err(r)["field"] == field


def test_events_idempotency(client):
    ev = {"user_id": "u7", "item_id": "i2", "type": "rating", "value": 4.5, "timestamp": 2_000_000}
    a = client.post("/v1/events", json=ev, headers={"Idempotency-Key": "abc-1"})
    b = client.post("/v1/events", json=ev, headers={"Idempotency-Key": "abc-1"})
    assert a.status_code == 201 and b.status_code == 200
    assert a.json()["event"]["id"] == b.json()["event"]["id"] and b.json()["created"] is False
    c = client.post("/v1/events", json={**ev, "item_id": "i3"}, headers={"Idempotency-Key": "abc-1"})
    assert c.status_code == 409 and err(c)["field"] == "body.idempotency_key"
    hist = client.get("/v1/users/u7/history", params={"limit": 1000}).json()["events"]
    assert sum(e["idempotency_key"] == "abc-1" for e in hist) == 1
    new = client.post("/v1/events", json={"user_id": "brand-new", "item_id": "i1", "type": "click"})
    assert new.status_code == 201
    assert client.get("/v1/users/brand-new/recommendations").status_code == 200


def test_history_and_score(client, tiny_dataset):
    h = client.get("/v1/users/u2/history", params={"limit": 3}).json()
    assert [e["item_id"] for e in h["events"]] == list(tiny_dataset.history("u2", before="all")["item_id"])[-3:]
    assert client.get("/v1/users/u2/history", params={"limit": 0}).status_code == 422
    r = client.post("/v1/score", json={"user_id": "u2", "item_ids": ["i0", "i1", "i2"]})
    assert r.status_code == 200 and [s["item_id"] for s in r.json()["scores"]] == ["i0", "i1", "i2"]
    assert all(0 < s["p_yes"] < 1 for s in r.json()["scores"])
    bad = client.post("/v1/score", json={"user_id": "u2", "item_ids": ["i0", "zzz"]})
    assert bad.status_code == 422 and err(bad)["field"] == "body.item_ids[1]"
    many = client.post("/v1/score", json={"user_id": "u2", "item_ids": ["i0"] * 101})
    assert many.status_code == 422 and err(many)["field"] == "body.item_ids"


def test_backend_down_gives_labelled_fallback(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, rec="down")
    with c:
        r = c.get("/v1/users/u1/recommendations", params={"k": 4})
        assert r.status_code == 200
        b = r.json()
        assert b["degraded"] is True and b["backend"] == "collaborative" and len(b["items"]) == 4
        scores = [it["score"] for it in b["items"]]
        assert scores == sorted(scores, reverse=True)
        # a new user who bought two genre-0 items: item-kNN should propose mostly genre-0 items (planted pattern)
        for item in ("i0", "i4"):
            c.post("/v1/events", json={"user_id": "fresh", "item_id": item, "type": "purchase"})
        fresh = c.get("/v1/users/fresh/recommendations", params={"k": 4}).json()
        assert fresh["degraded"] is True
        assert sum(int(it["item_id"][1:]) % 4 == 0 for it in fresh["items"]) >= 3, fresh["items"]
        s = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
        assert s.status_code == 503 and "backend" in err(s)["message"]
        assert c.get("/health").status_code == 200
        assert 'llmrec_fallbacks_total{reason="ConnectionError"}' in c.get("/metrics").text


def test_backend_down_without_fallback_503(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, rec="down", fallback="none")
    with c:
        r = c.get("/v1/users/u1/recommendations")
        assert r.status_code == 503 and err(r)["type"] == "backend_unavailable"
        assert c.get("/health").json()["status"] == "ok"


def test_backend_timeout_falls_back(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, rec="slow", timeout_s=0.2)
    with c:
        r = c.get("/v1/users/u1/recommendations")
        assert r.status_code == 200 and r.json()["degraded"] is True
        assert 'reason="timeout"' in c.get("/metrics").text


def test_limits_and_api_key(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, api_key="s3cret", max_body_bytes=512)
    with c:
        assert c.get("/v1/users/u1/recommendations").status_code == 401
        assert c.get("/v1/users/u1/recommendations", headers={"Authorization": "Bearer nope"}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/users/u1/recommendations", headers=auth).status_code == 200
        assert c.get("/health").status_code == 200
        big = {"user_id": "u1", "item_id": "i1", "type": "view", "idempotency_key": "x" * 100, "pad": "y" * 600}
        r = c.post("/v1/events", json=big, headers=auth)
        assert r.status_code == 413 and err(r)["type"] == "payload_too_large"


def test_fuzz_no_5xx(client):
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "/%.-_ {}[]\"'\\é"

    def junk(n=12):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    values = [None, True, -1, 0, 3.5, 1e308, "", "u1", "i1", [], {}, ["i1"], {"a": 1}, "x" * 300, float("nan")]
    statuses = []
    for n in range(240):
        kind = n % 4
        if kind == 0:
            r = client.get(f"/v1/users/{junk()}/recommendations",
                           params={"k": rng.choice(values + [junk()]), "explain": junk(4), "adapter": junk(6)})
        elif kind == 1:
            body = {rng.choice(["user_id", "item_id", "type", "value", "timestamp", "idempotency_key", junk(5)]):
                    rng.choice(values + [junk()]) for _ in range(rng.randint(0, 6))}
            if rng.random() < 0.5:
                body.update({"user_id": "u1", "item_id": f"i{rng.randint(0, 60)}"})
            try:
                r = client.post("/v1/events", json=body)
            except ValueError:  # NaN is not JSON: send raw bytes instead
                r = client.post("/v1/events", content=junk(40).encode(), headers={"Content-Type": "application/json"})
        elif kind == 2:
            r = client.post("/v1/score", json={"user_id": rng.choice(["u1", junk()]),
                                               "item_ids": rng.choice([[junk()], ["i1"], [], junk(), None])})
        else:
            r = client.request(rng.choice(["GET", "POST", "PUT", "DELETE"]), "/" + junk(20),
                               content=junk(30).encode())
        statuses.append(r.status_code)
        if r.status_code >= 400:
            err(r)
    assert len(statuses) >= 200 and max(statuses) < 500, sorted(set(statuses))
    assert client.get("/health").status_code == 200


def test_user_ids_not_logged_in_clear(client, caplog):
    caplog.set_level(logging.DEBUG)
    client.post("/v1/events", json={"user_id": "secretuser42", "item_id": "i1", "type": "click"})
    client.get("/v1/users/secretuser42/recommendations")
    client.get("/v1/users/secretuser42/history")
    server_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("llmrec"))
    assert server_logs and "secretuser42" not in server_logs
    assert "u:" in server_logs  # the keyed hash is logged instead


def test_metrics_exposed(client):
    client.get("/v1/users/u1/recommendations")
    client.get("/v1/users/u1/recommendations")
    m = client.get("/metrics").text
    for name in ("llmrec_requests_total", "llmrec_request_latency_seconds_bucket", "llmrec_backend_latency_seconds",
                 "llmrec_cache_hits_total 1.0", "llmrec_batch_size"):
        assert name in m
    assert "u1" not in m


def test_config_env_and_overrides(tmp_path):
    p = tmp_path / "serve.yaml"
    p.write_text("port: 9000\nllm:\n  backend: transformers\n  adapters: {yesno: /a}\n")
    cfg = load_service_config(p, ["max_k=20"], environ={"LLMREC_SERVE_PORT": "9100",
                                                        "LLMREC_SERVE_LLM__TIMEOUT_S": "5"})
    assert cfg.port == 9100 and cfg.max_k == 20 and cfg.llm.backend == "transformers" and cfg.llm.timeout_s == 5.0
    with pytest.raises(ConfigError, match="unknown key"):
        load_service_config(p, ["bogus=1"], environ={})
    with pytest.raises(ConfigError, match="default_adapter"):
        load_service_config(p, ["llm.default_adapter=zzz"], environ={})
    with pytest.raises(ConfigError, match="invalid adapter name"):
        load_service_config(p, ["llm.adapters={../x: /a}"], environ={})
    assert load_service_config(p, ["listings=4"], environ={}).listings == 4
    assert load_service_config(p, ["rank_mode=likelihood"], environ={}).rank_mode == "likelihood"
    with pytest.raises(ConfigError, match="rank_mode"):
        load_service_config(p, ["rank_mode=letters"], environ={})
    with pytest.raises(ConfigError, match="listings: must be >= 1"):
        load_service_config(p, ["listings=0"], environ={})
    for bad, msg in (("candidates=0", "candidates: must be >= 1"), ("batch_max_size=0", "batch_max_size: must be"),
                     ("batch_max_wait_ms=-1", "batch_max_wait_ms: must be >= 0"),
                     ("llm.timeout_s=0", r"llm.timeout_s: must be a finite number > 0 \(got 0"),
                     ("llm.vllm_startup_timeout_s=-5", "llm.vllm_startup_timeout_s: must be a finite number > 0"),
                     # .inf: every vLLM call failed as "not reachable", and the start-up wait had no end
                     ("llm.timeout_s=.inf", r"llm.timeout_s: must be a finite number > 0 \(got inf"),
                     ("llm.vllm_startup_timeout_s=.nan", "llm.vllm_startup_timeout_s: must be a finite number"),
                     ("llm.vllm_startup_timeout_s=1e400", "llm.vllm_startup_timeout_s: must be a finite number")):
        with pytest.raises(ConfigError, match=msg):
            load_service_config(p, [bad], environ={})
    assert load_service_config(p, ["batch_max_wait_ms=0"], environ={}).batch_max_wait_ms == 0


def test_no_llm_mode_is_labelled(tiny_dataset, tmp_path):
    c, _ = make_client(tiny_dataset, tmp_path, rec=None)
    with c:
        assert "fallback" in c.get("/health").json()["backend_note"]
        r = c.get("/v1/users/u1/recommendations").json()
        assert r["degraded"] is True and r["backend"] == "collaborative"


@pytest.mark.parametrize("secret", ["0123", "on", "~", "null", "k3y #2", "1_000"])
def test_secrets_from_env_are_taken_verbatim(secret, tiny_dataset, tmp_path):
    """LLMREC_SERVE_API_KEY / LLMREC_SERVE_USER_HASH_KEY are not YAML-parsed: `~`/`null` must not switch the API key
    off, `0123` must not become `83`; the key the client sends (the variable as is) is the one the server checks.
    Other variables keep YAML parsing."""
    env = {"LLMREC_SERVE_API_KEY": secret, "LLMREC_SERVE_USER_HASH_KEY": secret, "LLMREC_SERVE_MAX_K": "20"}
    cfg = load_service_config(None, [], environ=env)
    assert cfg.api_key == secret and cfg.user_hash_key == secret and cfg.max_k == 20
    assert load_service_config(None, ["api_key=cli"], environ=env).api_key == "cli"  # --set still wins
    c, _ = make_client(tiny_dataset, tmp_path, api_key=cfg.api_key)
    with c:
        assert c.get("/v1/users/u1/recommendations").status_code == 401
        assert c.get("/v1/users/u1/recommendations", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


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

"""The service over the real `Recommender` (tiny LLM built from config, MiniLM text retriever, tiny dataset): a
recommendation is served by the LLM (not degraded), excludes seen items, and changes after a new event."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("faiss")

from llm_fixtures import make_tiny_llm  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_dataset, tmp_path_factory):
    from fastapi.testclient import TestClient

    from llmrec.llm import load_backend
    from llmrec.ranking import RankingConfig, Recommender
    from llmrec.retrieval import TextRetriever
    from llmrec.service.app import create_app
    from llmrec.service.batching import LockedBackend
    from llmrec.service.config import ServiceConfig
    from llmrec.store import EventStore

    root = tmp_path_factory.mktemp("svc_int")
    backend = LockedBackend(load_backend("transformers", model=str(make_tiny_llm(root / "llm")), dtype="float32"))
    retriever = TextRetriever(cache_dir=root / "ret").build(tiny_dataset, progress=False)
    rec = Recommender(tiny_dataset, backend, retriever, RankingConfig(n_candidates=8, max_prompt_tokens=512))
    store = EventStore.from_dataset(tiny_dataset, url=f"sqlite:///{root / 'ev.db'}")
    app = create_app(ServiceConfig(dataset="tiny"), recommender=rec, store=store, catalogue=tiny_dataset,
                     backend_name="transformers", model_name="tiny")
    with TestClient(app) as c:
        yield c


def test_real_recommender_behind_the_service(client, tiny_dataset):
    r = client.get("/v1/users/u2/recommendations", params={"k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is False and body["backend"].startswith("transformers")
    items = [it["item_id"] for it in body["items"]]
    assert len(items) == 4 and len(set(items)) == 4
    assert not set(items) & set(tiny_dataset.history("u2", before="all")["item_id"])
    top = items[0]
    assert client.post("/v1/events", json={"user_id": "u2", "item_id": top, "type": "purchase"}).status_code == 201
    after = client.get("/v1/users/u2/recommendations", params={"k": 4}).json()
    assert after["history_version"] == body["history_version"] + 1 and after["cached"] is False
    assert top not in {it["item_id"] for it in after["items"]}


def test_real_score_route(client):
    r = client.post("/v1/score", json={"user_id": "u3", "item_ids": ["i0", "i1", "i2"]})
    assert r.status_code == 200, r.text
    p = [s["p_yes"] for s in r.json()["scores"]]
    assert len(p) == 3 and all(0.0 < x < 1.0 for x in p)

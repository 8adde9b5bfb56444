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
    assert body["model"] == "tiny"  # the service's model name (as /health and /v1/score give it), not the engine
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


def test_transformers_runtime_serves_every_adapter_from_one_model(tiny_dataset, tiny_home, tmp_path, monkeypatch):
    """`llmrec serve` wiring on the transformers backend: one model is loaded whatever the number of adapters, each
    request's adapter scores like that adapter alone, and no adapter means the base model."""
    import numpy as np
    from fastapi.testclient import TestClient

    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm import load_backend, transformers_backend
    from llmrec.service.config import LLMConfig, ServiceConfig
    from llmrec.service.launch import build_runtime

    llm_dir = make_tiny_llm(tmp_path / "llm")
    adapters = {name: str(random_lora_adapter(llm_dir, tmp_path / name, i, r=4, target_modules=["q_proj", "v_proj"],
                                              std=0.5)) for i, name in enumerate(("a1", "a2"))}
    loads = []
    real = transformers_backend.load_causal_lm
    monkeypatch.setattr(transformers_backend, "load_causal_lm", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    cfg = ServiceConfig(dataset="tiny", store_url=f"sqlite:///{tmp_path / 'ev.db'}", candidates=8, listings=2,
                        rank_mode="likelihood",
                        llm=LLMConfig(backend="transformers", model=str(llm_dir), dtype="float32", adapters=adapters))
    rt = build_runtime(cfg)
    try:
        assert len(loads) == 1  # base + 2 adapters: one model
        assert {(r.cfg.listings, r.cfg.mode) for r in rt.app.state.service.recommenders.values()} == {
            (2, "likelihood")}
        items = ["i0", "i1", "i2", "i3"]
        with TestClient(rt.app) as c:
            assert c.get("/health").json()["batching"] == "micro"  # batching: auto on transformers
            got = {}
            for name in (None, "a1", "a2"):
                body = {"user_id": "u3", "item_ids": items, **({"adapter": name} if name else {})}
                r = c.post("/v1/score", json=body)
                assert r.status_code == 200, r.text
                got[name] = [s["p_yes"] for s in r.json()["scores"]]
            assert c.post("/v1/score", json={"user_id": "u3", "item_ids": items, "adapter": "a3"}).status_code == 422
            # ranked by title likelihood through the micro-batcher (rank_mode: likelihood), not the fallback
            r = c.get("/v1/users/u3/recommendations?k=3")
            assert r.status_code == 200 and len(r.json()["items"]) == 3 and not r.json().get("degraded"), r.text
        # the same scoring on a model loaded with that adapter alone (same prompts: the service's own Recommender
        # settings and the store's history)
        from llmrec.ranking import Recommender

        svc = rt.app.state.service
        history = svc.store.history_with_version("u3", cfg.max_history)[0]
        for name in ("a1", "a2"):
            rec = svc.recommenders[name]
            alone = load_backend("transformers", model=llm_dir, adapter=adapters[name], dtype="float32")
            ref = Recommender(tiny_dataset, alone, rec.retriever, rec.cfg, adapter=name).score_yesno(
                "u3", items, history=history)
            np.testing.assert_allclose(got[name], ref, atol=1e-5)
            assert not np.allclose(got[name], got[None], atol=1e-4)
    finally:
        rt.close()


"""Service audit: metrics count every answer under its route template, non-finite LLM scores are a backend failure
(not `null` scores, not cached), the micro-batcher checks row counts and isolates a caller whose input fails a
shared batch, its wait is bounded, and `--print-config` hides every secret."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmrec.cli import main
from llmrec.config import ConfigError
from llmrec.service.batching import MicroBatchingBackend
from llmrec.service.config import load_service_config
from tests.test_service import err, make_client


def _requests(client) -> dict[tuple[str, str, str], float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("llmrec_requests_total{"):
            labels, value = line[len("llmrec_requests_total{"):].split("} ")
            d = dict(kv.split("=", 1) for kv in labels.split(","))
            out[(d["route"].strip('"'), d["method"].strip('"'), d["status"].strip('"'))] = float(value)
    return out


def test_413_and_401_answers_are_counted_under_their_route(tiny_dataset, tmp_path):
    """The body limit ran outside the metrics middleware, so a 413 was never counted; a 401 (answered before
    routing) was counted under route="unmatched"."""
    c, _ = make_client(tiny_dataset, tmp_path, api_key="s3cret", max_body_bytes=256)
    auth = {"Authorization": "Bearer s3cret"}
    with c:
        r = c.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "type": "view", "pad": "x" * 400},
                   headers=auth)
        assert r.status_code == 413
        assert c.get("/v1/users/u1/recommendations").status_code == 401
        assert c.get("/no/such/route", headers=auth).status_code == 404
        m = _requests(c)
    assert m.get(("/v1/events", "POST", "413")) == 1, m
    assert m.get(("/v1/users/{user_id}/recommendations", "GET", "401")) == 1, m
    assert m.get(("unmatched", "GET", "404")) == 1, m
    assert not any("u1" in k[0] for k in m)  # templates, never raw paths


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_llm_scores_fall_back_instead_of_null_scores(tiny_dataset, tmp_path, bad):
    """NaN / inf scores were sent as `"score": null` (the schema says float), in an order read from NaNs, and cached
    until the user's next event. Now: a backend failure -> labelled collaborative fallback, not cached."""
    c, rec = make_client(tiny_dataset, tmp_path)
    real = rec._scores
    rec._scores = lambda h: {i: bad for i in real(h)}
    with c:
        for _ in range(2):
            r = c.get("/v1/users/u1/recommendations", params={"k": 3})
            assert r.status_code == 200, r.text
            b = r.json()
            assert b["degraded"] is True and b["cached"] is False and b["backend"] == "collaborative"
            assert len(b["items"]) == 3 and all(isinstance(it["score"], float) for it in b["items"])
        assert 'llmrec_fallbacks_total{reason="NonFiniteScores"} 2.0' in c.get("/metrics").text
        rec._scores = real  # the backend recovers: a real answer, then cached
        assert c.get("/v1/users/u1/recommendations", params={"k": 3}).json()["degraded"] is False
        assert c.get("/v1/users/u1/recommendations", params={"k": 3}).json()["cached"] is True


@pytest.mark.parametrize("answer", ["nan", "short"])
def test_score_route_refuses_non_finite_or_missing_probabilities(tiny_dataset, tmp_path, answer):
    """P(Yes) = NaN was sent as `"p_yes": null`; a backend answering fewer values than items had the list silently
    cut by zip. Both are backend failures: 503."""
    c, rec = make_client(tiny_dataset, tmp_path)
    real = rec.score_yesno
    rec.score_yesno = (lambda *a, **k: [math.nan for _ in real(*a, **k)]) if answer == "nan" else \
        (lambda *a, **k: real(*a, **k)[:-1])
    with c:
        r = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1", "i2"]})
        assert r.status_code == 503, r.text
        assert err(r)["type"] == "backend_unavailable"


def test_score_refuses_a_huge_item_id_naming_its_index(tiny_dataset, tmp_path):
    """An unknown item id is echoed in the 422's message: each id is bounded (256 chars, as EventIn.item_id)."""
    c, _ = make_client(tiny_dataset, tmp_path)
    with c:
        r = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1", "x" * 5000]})
        assert r.status_code == 422
        e = err(r)
        assert e["field"] == "body.item_ids[1]" and len(e["message"]) < 500


class _RowsBackend:
    name = "rows"
    tokenizer = None

    def __init__(self, drop: int = 0, poison: str | None = None):
        self.drop, self.poison, self.calls = drop, poison, []

    def score_choices(self, prompts, choices):
        self.calls.append(list(prompts))
        time.sleep(0.05)
        if self.poison is not None and any(self.poison in p for p in prompts):
            raise ValueError(f"prompt too long: {self.poison}")
        n = len(choices) if isinstance(choices[0], str) else len(choices[0])
        out = np.zeros((len(prompts), n))
        out[:, 0] = [float(p[1:]) for p in prompts]  # row i says which prompt it answers
        return out[: len(prompts) - self.drop]


def _concurrent(mb, prompts_per_caller):
    got: dict[int, object] = {}

    def call(i, prompts):
        try:
            got[i] = mb.score_choices(prompts, [" Yes", " No"])
        except Exception as e:  # noqa: BLE001
            got[i] = e

    threads = [threading.Thread(target=call, args=(i, p), daemon=True) for i, p in enumerate(prompts_per_caller)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join(timeout=10)
    return got


def test_a_backend_answer_with_too_few_rows_fails_the_batch_instead_of_shifting_rows():
    """A backend answering one row short: the later callers of the batch got short (or empty) arrays, i.e. rows of
    the wrong prompts, with no error."""
    inner = _RowsBackend(drop=1)
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=200)
    try:
        got = _concurrent(mb, [["p1", "p2"], ["p3", "p4"], ["p5"]])
    finally:
        mb.close()
    assert max(len(c) for c in inner.calls) > 2  # the calls were merged
    assert all(isinstance(v, RuntimeError) and "rows for" in str(v) for v in got.values()), got


def test_one_callers_bad_input_does_not_fail_the_other_callers_of_its_batch():
    """A prompt the backend refuses (ValueError) failed every request merged into its batch; they all fell back to
    degraded answers. Now the batch is rerun one caller at a time: only the bad caller fails, each good one gets its
    own rows."""
    inner = _RowsBackend(poison="p666")
    mb = MicroBatchingBackend(inner, max_batch=64, max_wait_ms=200)
    try:
        got = _concurrent(mb, [["p1", "p2"], ["p666"], ["p3"]])
    finally:
        mb.close()
    assert any(len(c) > 1 for c in inner.calls)  # merged first
    assert isinstance(got[1], ValueError)
    assert got[0][:, 0].tolist() == [1.0, 2.0] and got[2][:, 0].tolist() == [3.0]


@pytest.mark.parametrize("wait", [".inf", "1e12", "nan"])
def test_micro_batch_wait_must_be_finite_and_bounded(wait):
    """batch_max_wait_ms: .inf was accepted; the micro-batcher's worker then died of OverflowError in queue.get and
    every request waited for its llm.timeout_s, then fell back, for ever."""
    with pytest.raises(ConfigError, match="batch_max_wait_ms"):
        load_service_config(None, [f"batch_max_wait_ms={wait}"], environ={})


def test_micro_batcher_refuses_a_wait_that_would_kill_its_worker():
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatchingBackend(_RowsBackend(), max_wait_ms=float("inf"))
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatchingBackend(_RowsBackend(), max_batch=0)
    MicroBatchingBackend(_RowsBackend(), max_wait_ms=60_000).close()  # the bound itself is accepted
    mb = MicroBatchingBackend(_RowsBackend(), max_wait_ms=5)
    pool = ThreadPoolExecutor(1)
    try:
        assert pool.submit(mb.score_choices, ["p7"], [" Yes", " No"]).result(timeout=10)[0, 0] == 7.0
    finally:
        mb.close()
        pool.shutdown(wait=False, cancel_futures=True)


def test_print_config_hides_the_user_hash_key_and_the_database_password(capsys, monkeypatch):
    monkeypatch.setenv("LLMREC_SERVE_USER_HASH_KEY", "hmac-secret-1")
    assert main(["serve", "--no-llm", "--print-config", "--set",
                 "store_url=postgresql+psycopg://svc:db-pass-2@db:5432/llmrec"]) == 0
    out = capsys.readouterr().out
    assert "hmac-secret-1" not in out and "db-pass-2" not in out
    assert "user_hash_key: '***'" in out and "postgresql+psycopg://svc:***@db:5432/llmrec" in out


@pytest.mark.parametrize("flags,named", [(["--mode", "likelihood"], "--mode"),
                                         (["--retriever", "itemcf", "--listings", "4"], "--retriever, --listings"),
                                         (["--dataset", "ml-1m"], "--dataset"),
                                         (["--model", "/m", "--load-in-4bit"], "--model, --load-in-4bit")])
def test_recommend_url_refuses_flags_the_service_would_silently_ignore(capsys, monkeypatch, flags, named):
    """`llmrec recommend --url ... --mode likelihood` printed the service's verbalizer ranking as if it were the
    likelihood one: the in-process flags were dropped without a word. Now refused (exit 2) before any request."""
    import llmrec.service.client as client

    sent = []
    monkeypatch.setattr(client, "fetch_recommendations", lambda *a, **k: sent.append(a) or {"items": []})
    assert main(["recommend", "--url", "http://127.0.0.1:9", "--user-id", "1", *flags]) == 2
    err_text = capsys.readouterr().err
    assert named in err_text and "--url" in err_text and not sent
    # the flags that apply to the service still work
    assert main(["recommend", "--url", "http://127.0.0.1:9", "--user-id", "1", "--k", "3", "--explain",
                 "--adapter", "yesno", "--json"]) == 0
    assert sent == [("http://127.0.0.1:9", "1", 3, True, "yesno")]

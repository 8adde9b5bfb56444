"""VLLMBackend's HTTP path against a small fake OpenAI-compatible server (no vllm needed): request fields, token-id
keyed logprobs, grouping/chunking, order of rows, and clear errors."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request

from llmrec.llm.vllm_backend import VLLMBackend, VLLMError


def fake_logit(prompt: str, tid: int) -> float:
    return float((len(prompt) * 7 + tid * 13) % 17) / 3.0


def make_app(seen: list[dict], drop_token: int | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": [{"id": "base", "root": "/nonexistent/base"}, {"id": "yesno", "root": "/nonexistent/a"}]}

    @app.post("/tokenize")
    async def tokenize(req: Request):
        body = await req.json()
        return {"tokens": [1000 + ord(c) for c in body["prompt"].strip()]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        seen.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("logprob_token_ids"):
                ids = body["logprob_token_ids"]
                logits = np.array([fake_logit(p, t) for t in ids] + [5.0])  # + the rest of the vocabulary
                lse = np.log(np.exp(logits).sum())
                top = {f"token_id:{t}": float(v - lse) for t, v in zip(ids, logits) if t != drop_token}
                top["token_id:2"] = float(5.0 - lse)
                choices.append({"index": i, "text": "", "logprobs": {"top_logprobs": [top]}})
            else:
                choices.append({"index": i, "text": f"{body['model']}:{p[-3:]}"})
        return {"choices": choices}

    return app


@pytest.fixture()
def fake_server():
    def start(drop_token=None):
        seen: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(make_app(seen, drop_token), host="127.0.0.1", port=port,
                                            log_level="warning"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        while not srv.started:
            time.sleep(0.02)
        servers.append((srv, th))
        return f"http://127.0.0.1:{port}/v1", seen

    servers: list = []
    yield start
    for srv, th in servers:
        srv.should_exit = True
        th.join(timeout=10)


def test_score_choices_over_http(fake_server):
    url, seen = fake_server()
    be = VLLMBackend(url=url, model="base", chunk_size=2)
    prompts = ["aaa", "bbbbb", "c", "dddddddd", "ee"]
    letters = [" A", " B", " C"]
    out = be.score_choices(prompts, letters)
    ids = [1000 + ord(c) for c in "ABC"]
    for i, p in enumerate(prompts):
        x = np.array([fake_logit(p, t) for t in ids])
        np.testing.assert_allclose(out[i], x - np.log(np.exp(x).sum()), atol=1e-9)
    assert len(seen) == 3  # 5 prompts in chunks of 2
    assert all(b["max_tokens"] == 1 and b["return_tokens_as_token_ids"] and b["logprobs"] == 3 for b in seen)
    assert sorted(seen[0]["logprob_token_ids"]) == sorted(ids)
    # per-prompt choice lists (same length, different letters) and a shared first token
    per = be.score_choices(["aaa", "bbbbb"], [[" A", " B"], [" C", " A"]])
    assert per.shape == (2, 2) and np.allclose(np.exp(per).sum(axis=1), 1)
    assert be.generate(["xyz1", "xyz2"], max_new_tokens=3) == ["base:yz1", "base:yz2"]
    assert be.with_adapter("yesno").generate(["q12"]) == ["yesno:q12"]
    be.close()


def test_errors_are_clear(fake_server):
    url, _ = fake_server(drop_token=1000 + ord("B"))
    with pytest.raises(VLLMError, match="not served"):
        VLLMBackend(url=url, model="missing")
    be = VLLMBackend(url=url, model="base")
    with pytest.raises(VLLMError, match="no logprob for token ids"):
        be.score_choices(["aaa"], [" A", " B"])
    with pytest.raises(ValueError, match="same"):
        be.score_choices(["a", "b"], [[" A", " B"], [" A"]])
    with pytest.raises(VLLMError, match="not reachable"):
        VLLMBackend(url="http://127.0.0.1:9/v1", model="base", timeout=2)

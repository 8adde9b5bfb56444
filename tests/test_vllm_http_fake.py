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
from fastapi.responses import PlainTextResponse

from llmrec.llm.base import BackendError
from llmrec.llm.vllm_backend import VLLMBackend, VLLMError


def fake_logit(prompt: str, tid: int) -> float:
    return float((len(prompt) * 7 + tid * 13) % 17) / 3.0


def make_app(seen: list[dict], drop_token: int | None = None, fail: str | None = None) -> FastAPI:
    """As vLLM: a text prompt gets the tokenizer's special tokens (here a BOS text "<s>") unless the request says
    `add_special_tokens: false`. `fail`: "tokenize" (POST /tokenize answers 500), "short" (/completions leaves out
    the last prompt's choice), "garbage" (/completions answers 200 with a body that is not JSON), "ignore_allowed"
    (a constrained step samples outside `allowed_token_ids`), "text_tokens" (a step's token as text, not an id),
    "no_models" / "bad_models" (GET /models lists nothing / entries without an id)."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        if fail == "no_models":  # a server still loading, or a proxy in front of none
            return {"object": "list", "data": []}
        if fail == "bad_models":
            return {"object": "list", "data": [{"name": "base"}]}
        return {"data": [{"id": "base", "root": "/nonexistent/base"}, {"id": "yesno", "root": "/nonexistent/a"},
                         {"id": "/models/smollm2-135m", "root": "/nonexistent/m"}]}

    @app.post("/tokenize")
    async def tokenize(req: Request):
        body = await req.json()
        if fail == "tokenize":
            return PlainTextResponse("tokenizer exploded", status_code=500)
        return {"tokens": [1000 + ord(c) for c in body["prompt"].strip()]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        seen.append(body)
        if fail == "garbage":
            return PlainTextResponse("<html>bad gateway</html>")
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if body.get("allowed_token_ids"):
            prompts = [body["prompt"]]  # one prompt given as token ids
        if body.get("add_special_tokens", True):
            prompts = ["<s>" + p if isinstance(p, str) else p for p in prompts]
        choices = []
        for i, p in enumerate(prompts):
            if body.get("allowed_token_ids"):  # one greedy step among the allowed tokens (prompt: token ids)
                assert isinstance(p, int) or all(isinstance(t, int) for t in p)
                pick = max(body["allowed_token_ids"], key=lambda t, key=str(p): fake_logit(key, t))
                if fail == "ignore_allowed":  # an endpoint without allowed_token_ids: any token of the vocabulary
                    pick = max(body["allowed_token_ids"]) + 1
                tok = "?" if fail == "text_tokens" else f"token_id:{pick}"  # without return_tokens_as_token_ids
                choices.append({"index": i, "text": "?", "logprobs": {"tokens": [tok]}})
            elif body.get("logprob_token_ids"):
                ids = body["logprob_token_ids"]
                logits = np.array([fake_logit(p, t) for t in ids] + [5.0])  # + the rest of the vocabulary
                lse = np.log(np.exp(logits).sum())
                top = {f"token_id:{t}": float(v - lse) for t, v in zip(ids, logits) if t != drop_token}
                top["token_id:2"] = float(5.0 - lse)
                choices.append({"index": i, "text": "", "logprobs": {"top_logprobs": [top]}})
            elif body.get("prompt_logprobs") is not None:  # each prompt token's log-prob given the ones before
                assert body["prompt_logprobs"] == 0 and all(isinstance(t, int) for t in p)
                lps = [None] + [{str(t): {"logprob": -fake_logit(str(p[:k]), t), "rank": 1, "decoded_token": "?"}}
                                for k, t in enumerate(p) if k > 0]
                choices.append({"index": i, "text": "", "prompt_logprobs": lps})
            else:
                choices.append({"index": i, "text": f"{body['model']}:{p[-3:]}"})
        if fail == "short" and len(choices) > 1:
            choices = choices[:-1]
        return {"choices": choices}

    return app


@pytest.fixture()
def fake_server():
    def start(drop_token=None, fail=None):
        seen: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(make_app(seen, drop_token, fail), host="127.0.0.1", port=port,
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
    assert per.shape == (2, 2)
    for row, p, letters_p in zip(per, ["aaa", "bbbbb"], ["AB", "CA"]):  # each row in its own list's order
        x = np.array([fake_logit(p, 1000 + ord(c)) for c in letters_p])
        np.testing.assert_allclose(row, x - np.log(np.exp(x).sum()), atol=1e-9)
    assert be.generate(["xyz1", "xyz2"], max_new_tokens=3) == ["base:yz1", "base:yz2"]
    assert be.with_adapter("yesno").generate(["q12"]) == ["yesno:q12"]
    assert (be.name, be.model_name, be.with_adapter("yesno").name) == ("vllm-http:base", "base", "vllm-http:yesno")
    be.with_adapter("yesno").close()  # a view shares the client: closing it leaves the backend working
    assert be.generate(["xyz3"], max_new_tokens=3) == ["base:yz3"]
    be.close()
    # a server started with --model PATH serves the path as the model id: answers name the model, not the path
    by_path = VLLMBackend(url=url, model="/models/smollm2-135m")
    assert (by_path.name, by_path.model_name) == ("vllm-http:smollm2-135m", "smollm2-135m")
    by_path.close()
    # ... and so does the service in front of such an endpoint (its /health and answers report this name)
    from llmrec.service.config import LLMConfig, ServiceConfig
    from llmrec.service.launch import build_backends, plan_backend

    cfg = ServiceConfig(llm=LLMConfig(vllm_url=url, model="/models/smollm2-135m", adapters={"yesno": "unused"}))
    backends, server, model_name = build_backends(cfg, plan_backend(cfg))
    assert server is None and model_name == "smollm2-135m"
    assert backends["yesno"].generate(["q12"]) == ["yesno:q12"]


def test_errors_are_clear(fake_server):
    url, _ = fake_server(drop_token=1000 + ord("B"))
    with pytest.raises(VLLMError, match="not served"):
        VLLMBackend(url=url, model="missing")
    be = VLLMBackend(url=url, model="base")
    # an adapter the server does not list: refused when the view is made (as the service builds its views at
    # startup), not a 404 on every request later
    with pytest.raises(VLLMError, match=r"adapter 'nope' is not served.*served: \['base', 'yesno'"):
        be.with_adapter("nope")
    assert be.with_adapter(None).served_name == "base" and be.with_adapter("base").served_name == "base"
    with pytest.raises(VLLMError, match="no logprob for token ids"):
        be.score_choices(["aaa"], [" A", " B"])
    with pytest.raises(ValueError, match="same"):
        be.score_choices(["a", "b"], [[" A", " B"], [" A"]])
    # two choices with one first token (the fake tokenizer: one token per character) cannot be told apart
    with pytest.raises(BackendError, match=r"' Apple' and ' Avocado' start with the same token"):
        be.score_choices(["aaa", "b"], [[" B", " C"], [" Apple", " Avocado"]])
    with pytest.raises(VLLMError, match="not reachable"):
        VLLMBackend(url="http://127.0.0.1:9/v1", model="base", timeout=2)


def test_constrained_generation_over_http(fake_server, tmp_path):
    """generate_from: prompts go as token ids, tokens the trie forces are not requested, each branching step sends
    the allowed ids and reads the token id back; the picks equal the same greedy walk done locally.
    generate_quoted: one request per prompt with a structured-output regex allowing exactly those quotes."""
    import re

    from llm_fixtures import make_tiny_llm

    from llmrec.llm.base import OptionTrie, constrained_greedy

    url, seen = fake_server()
    tok_dir = make_tiny_llm(tmp_path / "tiny")
    be = VLLMBackend(url=url, model="base", tokenizer=str(tok_dir))
    tok = be.tokenizer
    prompts = ["Action Story 1. Answer:", "Comedy Story 2 Answer:"]
    options = [[" Action Story", " Comedy Story", " Drama Story", " Horror Story"], [" Yes", " No", " A"]]
    got = be.generate_from(prompts, options, n=2)
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    tries = [OptionTrie([tok.encode(o + "\n", add_special_tokens=False) for o in opts], 2, tok.eos_token_id)
             for opts in options]
    want = constrained_greedy(tries, lambda rows, allowed, gen: [
        max(a, key=lambda t, key=str(ids[r] + gen[r]): fake_logit(key, t)) for r, a in zip(rows, allowed)])
    assert got == want and [len(g) for g in got] == [2, 2]
    steps = [b for b in seen if b.get("allowed_token_ids")]
    assert steps and all(len(b["allowed_token_ids"]) > 1 and b["max_tokens"] == 1 for b in steps)
    assert len(steps) < sum(tr.max_new_tokens() for tr in tries)  # fewer requests than tokens written
    seen.clear()
    quotable = [["Heat (1995)", "Face/Off (1997)"], []]
    be.generate_quoted(["a", "b"], quotable, max_new_tokens=5, stop=["\n"])
    regexes = {b["prompt"]: b["structured_outputs"]["regex"] for b in seen}
    assert re.fullmatch(regexes["a"], 'because "Heat (1995)" and "Face/Off (1997)", fine\n')
    assert not re.fullmatch(regexes["a"], 'because "Heat 1995" fits')  # not an allowed quote
    assert not re.fullmatch(regexes["b"], 'say "Heat (1995)"') and re.fullmatch(regexes["b"], "no quotes")
    assert all("frequency_penalty" not in b for b in seen)  # 0 = the server's default, not sent
    seen.clear()
    be.generate_quoted(["a", "b"], quotable, max_new_tokens=5, lead_quote=True)
    regexes = {b["prompt"]: b["structured_outputs"]["regex"] for b in seen}
    assert re.fullmatch(regexes["a"], ' "Face/Off (1997)" and "Heat (1995)", fine')
    assert not re.fullmatch(regexes["a"], 'because "Heat (1995)" fits')  # must open with a quoted title
    assert re.fullmatch(regexes["b"], "no quotes")  # nothing to quote: free text
    seen.clear()
    be.generate_quoted(["a"], quotable[:1], max_new_tokens=5, frequency_penalty=0.7)
    be.generate(["c"], max_new_tokens=5, frequency_penalty=0.7)
    assert [b["frequency_penalty"] for b in seen] == [0.7, 0.7]
    be.close()


def test_title_likelihood_over_http(fake_server, tmp_path):
    """score_continuations: prompt + continuation sent as token ids with prompt_logprobs=0; the continuation's
    tokens' log-probs are summed; refused on a server that lists LoRA modules (prompt log-probs crash it)."""
    from llm_fixtures import make_tiny_llm

    url, seen = fake_server()
    tok_dir = make_tiny_llm(tmp_path / "tiny")
    be = VLLMBackend(url=url, model="base", tokenizer=str(tok_dir), chunk_size=3)
    tok = be.tokenizer
    prompts = ["Action Story 1. Title:", "Comedy Story 2 Title:"]
    conts = [[' "Action Story"', ' "Horror"'], [" Drama Story 3", ' "Comedy"']]
    sums, counts = be.score_continuations(prompts, conts)
    for i, p in enumerate(prompts):
        ids = tok.encode(p, add_special_tokens=False)
        for j, c in enumerate(conts[i]):
            cid = tok.encode(c, add_special_tokens=False)
            full = ids + cid
            want = sum(-fake_logit(str(full[:k]), full[k]) for k in range(len(ids), len(full)))
            assert counts[i, j] == len(cid) and sums[i, j] == pytest.approx(want, abs=1e-9)
    assert len(seen) == 2 and all(b["max_tokens"] == 1 for b in seen)  # 4 rows in chunks of 3
    be._lora_engine = True  # as for a server whose /v1/models lists LoRA modules (parent set)
    with pytest.raises(VLLMError, match="LoRA enabled"):
        be.score_continuations(prompts, conts)
    be.close()


def test_text_prompts_are_sent_without_special_tokens(fake_server):
    """Training and the transformers backend encode prompts with add_special_tokens=False (no BOS); vLLM adds the
    tokenizer's special tokens to a text prompt unless told not to, so every request with a text prompt says so
    (token-id prompts are sent as they are)."""
    url, seen = fake_server()
    be = VLLMBackend(url=url, model="base")
    be.score_choices(["aaa", "bb"], [" A", " B"])
    be.generate(["xyz1"], max_new_tokens=2)
    be.generate_quoted(["q"], [["Heat"]], max_new_tokens=2)
    assert len(seen) == 3 and all(b["add_special_tokens"] is False for b in seen)
    be.close()


def test_http_failures_are_backend_errors(fake_server):
    """A failing /tokenize, an unreachable server, a body that is not JSON, and an answer missing some prompts'
    choices are each a VLLMError (a BackendError) naming the problem, never scores or texts made up for them."""
    url, _ = fake_server(fail="tokenize")
    be = VLLMBackend(url=url, model="base")
    with pytest.raises(VLLMError, match=r"tokenize.*HTTP 500"):
        be.score_choices(["aaa"], [" A", " B"])
    be.close()

    url, _ = fake_server()
    be = VLLMBackend(url=url, model="base")
    be.base_url, be.root_url = "http://127.0.0.1:9/v1", "http://127.0.0.1:9"  # the server went away
    with pytest.raises(VLLMError, match="tokenize"):
        be.score_choices(["aaa"], [" A", " B"])
    with pytest.raises(VLLMError, match="request failed"):
        be.generate(["aaa"])
    be.close()

    url, _ = fake_server(fail="garbage")
    be = VLLMBackend(url=url, model="base")
    with pytest.raises(VLLMError, match="not JSON"):
        be.generate(["aaa"])
    be.close()


def test_an_answer_missing_rows_is_an_error(fake_server, tmp_path):
    from llm_fixtures import make_tiny_llm

    url, _ = fake_server(fail="short")
    be = VLLMBackend(url=url, model="base", tokenizer=str(make_tiny_llm(tmp_path / "tiny")))
    with pytest.raises(VLLMError, match="choices for 2 prompts"):
        be.generate(["aaa", "bbb"])
    with pytest.raises(VLLMError, match="choices for 2 prompts"):
        be.score_choices(["aaa", "bbb"], [" A", " B"])
    with pytest.raises(VLLMError, match="choices for 2 prompts"):
        be.score_continuations(["Action Story"], [[" Yes", " No"]])
    assert be.generate(["aaa"]) == ["base:aaa"]  # one prompt: nothing left out
    be.close()


def test_max_new_tokens_below_one_is_refused_before_any_request(fake_server):
    url, seen = fake_server()
    be = VLLMBackend(url=url, model="base")
    for n in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            be.generate(["aaa"], max_new_tokens=n)
        with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
            be.generate_quoted(["aaa"], [["Heat"]], max_new_tokens=n)
    assert seen == []
    be.close()


def test_constrained_steps_on_an_endpoint_without_vllm_semantics_are_errors(fake_server, tmp_path):
    """generate_from reads each step's token id back: an endpoint that ignores allowed_token_ids (its token ended the
    option walk, silently giving fewer or no picks) or answers the token as text (an IndexError) is a VLLMError that
    says so."""
    from llm_fixtures import make_tiny_llm

    tok_dir = make_tiny_llm(tmp_path / "tiny")
    options = [[" Action Story", " Comedy Story", " Drama Story"]]
    for fail, msg in (("ignore_allowed", "ignores allowed_token_ids"), ("text_tokens", "token_id:<id>")):
        url, _ = fake_server(fail=fail)
        be = VLLMBackend(url=url, model="base", tokenizer=str(tok_dir))
        with pytest.raises(VLLMError, match=msg):
            be.generate_from(["Action Story 1. Answer:"], options, n=2)
        be.close()


def test_a_server_listing_no_usable_model_is_a_clear_error(fake_server):
    """With `model` left out the first served model is used: an empty list was an IndexError, an entry without an
    'id' a KeyError; both are a VLLMError quoting the answer."""
    for fail in ("no_models", "bad_models"):
        url, _ = fake_server(fail=fail)
        for model in (None, "base"):
            with pytest.raises(VLLMError, match="GET /models answered no model list"):
                VLLMBackend(url=url, model=model)

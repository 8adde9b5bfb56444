"""serve/bench_serving.py: the explanation workload it times is the service's own prompt, one per distinct user."""

from __future__ import annotations

import json
import time

import pytest
from conftest import fake_service


@pytest.fixture(scope="module")
def bench_serving(load_script):
    return load_script("serve/bench_serving.py")


def test_explain_prompts_are_the_explain_template_for_distinct_users(tiny_dataset, bench_serving):
    from llmrec.prompts import load_template

    bs = bench_serving
    prompts, source = bs.explain_prompts(6, ds=tiny_dataset)
    tpl = load_template("explain")
    assert source == f"prompts/explain.yaml v{tpl.version}"
    assert len(prompts) == 6 and len(set(prompts)) == 6
    titles = {str(t) for t in tiny_dataset.titles}
    for p in prompts:
        hist_part, rec_part = p.split("Recommended", 1)
        rec_lines = rec_part.split("\n", 1)[1].split("In one or two")[0]
        rec_titles = {t for t in titles if f'"{t}"' in rec_lines}
        assert len(rec_titles) == 3
        first = next(t for t in titles if rec_lines.startswith(f'- "{t}"'))
        assert p.rstrip().split("\n")[-1] == tpl.answer_prefix.format(first_recommended=f'"{first}"')
        assert not any(f'"{t}"' in hist_part for t in rec_titles)  # recommended items are outside the history
    assert bs.explain_prompts(6, ds=tiny_dataset)[0] == prompts  # seeded
    same, quotable, _ = bs.explain_prompts(6, ds=tiny_dataset, with_quotable=True)
    assert same == prompts and len(quotable) == 6
    disliked = 0
    for p, qs in zip(prompts, quotable):  # the quotable titles are the liked history items the prompt lists
        lines = [ln for ln in p.split("Recommended", 1)[0].splitlines() if ln.startswith('- "')]
        liked = [ln.split('"')[1] for ln in lines if ln.endswith("(liked)")]
        disliked += sum(ln.endswith("(disliked)") for ln in lines)
        assert qs and qs == liked, (qs, lines)
    assert disliked  # the prompts do list disliked items, and those are never quotable


def test_load_run_asks_for_explanations_when_told_and_counts_status(bench_serving):
    """load_run sends explain=true|false, one request per user, and tallies status codes and degraded answers."""
    seen: list[tuple[str, str]] = []

    def respond(user, query):
        seen.append((user, query["explain"][0]))
        return (404 if user == "missing" else 200), json.dumps({"degraded": user == "u2"}).encode()

    with fake_service(respond) as base:
        r = bench_serving.load_run(base, ["u1", "u2", "missing", "u3"], 2, 10.0, explain=True)
        assert sorted(seen) == [("missing", "true"), ("u1", "true"), ("u2", "true"), ("u3", "true")]
        assert r["status"] == {"200": 3, "404": 1} and r["degraded"] == 1 and r["requests"] == 4
        seen.clear()
        bench_serving.load_run(base, ["u1"], 1, 10.0)
        assert seen == [("u1", "false")]


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

    def respond(user, query):
        if user.startswith("slow"):
            time.sleep(0.3)
        body = b"not json" if user == "garbled" else json.dumps({"degraded": False}).encode()
        return (500 if "fail" in user else 200), body

    with fake_service(respond) as base:
        r = bench_serving.load_run(base, ["garbled", "u1", "u2", "u3", "slow-fail1", "slow-fail2"], 1, 10.0)
    assert sum(r["status"].values()) == 6, r["status"]
    assert r["status"]["200"] == 3 and r["status"]["500"] == 2
    assert r["errors"] == 3
    assert r["p95_ms"] < 250, r  # the slow failures are not in the latency of the answered requests


def test_report_names_the_machine_of_each_part(tmp_path, monkeypatch, bench_serving):
    # parts are run on different days, possibly on different machines: each carries its own machine line
    import llmrec.bench_utils as bu

    monkeypatch.setattr(bu, "RESULTS_DIR", tmp_path)
    bs = bench_serving
    eng_row = {"engine": "vllm", "start_s": 1.0, "score_prompts": 4, "score_prompts_per_s": 2.0, "gen_prompts": 4,
               "gen_tokens_per_s": 10.0}
    res = {"engines": {"model": "m", "prompt_source": "p", "gen_tokens_per_prompt": 8, "rows": [eng_row],
                       "vllm_vs_transformers_gen_speedup": 1.5, "vllm_vs_transformers_score_speedup": 1.1,
                       "goal_gen_speedup_3x_met": False, "command": "c", "note": "quiet",
                       "machine": "2 x CPU-A (native bf16 (AVX512-BF16/AMX))"},
           "service": {"vllm, batching=none": {
               "backend": "vllm", "service_start_s": 1.0, "batch_size_metrics": [], "note": "n", "command": "c2",
               "runs": [{"concurrency": 1, "requests": 2, "p50_ms": 1.0, "p95_ms": 2.0, "requests_per_s": 1.0,
                         "status": {"200": 2}, "degraded": 0}]}}}
    bs.write(res)
    md = (tmp_path / "serving.md").read_text()
    assert "machine: 2 x CPU-A (native bf16 (AVX512-BF16/AMX))" in md
    assert f"machine: {bs.MACHINE_UNRECORDED}" in md  # the service part had none: said, not guessed


def test_forced_generation_writes_exactly_n_tokens_per_prompt_in_every_batch(tmp_path, bench_serving):
    # the transformers side of `generation`: ragged last batch, prompts of different lengths, EOS not allowed to stop
    import torch
    from llm_fixtures import make_tiny_llm

    from llmrec.llm import load_backend

    be = load_backend("transformers", model=str(make_tiny_llm(tmp_path / "tiny")), dtype="float32")
    eos = be.tokenizer.eos_token_id
    # EOS is every step's first choice: only the forcing keeps rows going (counted: padding after EOS is not)
    be.model.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 100.0)))
    prompts = ["Answer:", "The user watched Action Story 1. Answer:", "liked movie", "Candidates: A. Drama Story"]
    assert be.generate(prompts[:1], max_new_tokens=5) == [""]  # unforced, it stops at once
    n_tok, seconds = bench_serving.hf_forced_generate(be, prompts, 5, batch=3)
    assert n_tok == 5 * len(prompts)
    assert seconds > 0


def test_report_has_the_generation_section_with_the_speedup_per_length(tmp_path, monkeypatch, bench_serving):
    import llmrec.bench_utils as bu

    monkeypatch.setattr(bu, "RESULTS_DIR", tmp_path)
    bs = bench_serving
    rows = [{"engine": "transformers bfloat16", "batch": 16, "gen_tokens_per_prompt": 32, "gen_prompts": 64,
             "gen_s": 40.0, "gen_tokens_per_s": 51.2},
            {"engine": "vLLM server bfloat16", "batch": 64, "gen_tokens_per_prompt": 32, "gen_prompts": 64,
             "gen_s": 10.0, "gen_tokens_per_s": 204.8, "start_s": 50.0}]
    run = {"model": "m", "dtype": "bfloat16", "prompt_source": "p", "rows": rows,
           "vllm_vs_best_transformers_speedup": {"32": 4.0}, "command": "c", "note": "quiet", "machine": "M"}
    bs.write({"generation": {"runs": [run]}})
    md = (tmp_path / "serving.md").read_text()
    assert "### Batched generation by length (forced tokens)\n" in md and "x4.00 at 32 tokens" in md
    assert "machine: M" in md and "| vLLM server bfloat16 | 64 | 32 | 64 | 50.0000 |" in md
    bs.write({"generation": {"runs": [run, {**run, "vllm_vs_best_transformers_speedup": {"32": 2.5}}]}})
    md = (tmp_path / "serving.md").read_text()  # repeats (--append) each keep their table and ratio
    assert "run 1 of 2" in md and "run 2 of 2" in md and "x4.00 at 32 tokens" in md and "x2.50 at 32 tokens" in md


def test_service_part_passes_set_overrides_to_the_service_and_names_them_in_the_row(tiny_dataset, monkeypatch,
                                                                                   bench_serving):
    import argparse
    import sys
    import types

    bs = bench_serving
    started: list[list[str]] = []
    monkeypatch.setattr(bs, "start_service", lambda over, port, log_path: started.append(list(over)) or "proc")
    monkeypatch.setattr(bs, "stop_service", lambda proc: None)
    monkeypatch.setattr(bs, "load_run", lambda base, users, c, timeout, explain=False: {"concurrency": c,
                                                                                          "users": list(users)})

    class Resp:
        text = 'llmrec_batch_size_count{op="score"} 1.0'

        def json(self):
            return {"backend": "transformers"}

    monkeypatch.setitem(sys.modules, "httpx", types.SimpleNamespace(get=lambda *a, **k: Resp()))
    monkeypatch.setattr("llmrec.data.load_prepared", lambda name: tiny_dataset)
    args = argparse.Namespace(dataset="tiny", append=False, backends=[("transformers", "micro")], timeout=5.0,
                              retriever=bs._service_default("retriever"), explain=False, concurrency=[1, 2],
                              requests=2, note="n", set=["llm.dtype=float32", "candidates=10"])
    out = bs.run_service(args)
    assert list(out) == ["transformers, batching=micro, llm.dtype=float32, candidates=10"]
    assert started[0][-2:] == ["llm.dtype=float32", "candidates=10"] and "batching=micro" in started[0]
    users = [u for r in out[next(iter(out))]["runs"] for u in r["users"]]
    assert len(users) == len(set(users)) == 2 + 4  # distinct users across concurrency levels (no cache hits)


@pytest.mark.parametrize("argv, flag", [
    (["--concurrency", "0,8"], "--concurrency"),  # a level with no client thread: every request an "error"
    (["--concurrency", "1,a"], "--concurrency"),  # was a ValueError traceback after the service had started
    (["--requests", "0"], "--requests"),
    (["--timeout", "inf"], "--timeout"),  # the load test must stay bounded
    (["--timeout", "0"], "--timeout"),
    (["--backends", "vlm"], "--backends"),  # was found only when the service refused llm.backend=vlm at its start
    (["--backends", "transformers:batched"], "--backends"),
    (["--gen-lengths", "32,-1"], "--gen-lengths"),
    (["--n-explain", "-1"], "--n-explain"),
])
def test_bad_load_test_arguments_are_usage_errors_before_anything_starts(bench_serving, monkeypatch, capsys, argv,
                                                                         flag):
    import sys

    monkeypatch.setattr(bench_serving, "start_service", lambda *a, **k: pytest.fail("a service was started"))
    monkeypatch.setattr(sys, "argv", ["bench_serving.py", "service", *argv])
    with pytest.raises(SystemExit) as e:
        bench_serving.main()
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_service_part_refuses_more_requests_than_distinct_users_before_starting(tiny_dataset, monkeypatch,
                                                                                bench_serving):
    """Levels past the dataset's last user sent no request (0-request rows in the result); now refused up front."""
    import argparse

    bs = bench_serving
    monkeypatch.setattr(bs, "start_service", lambda *a, **k: pytest.fail("a service was started"))
    monkeypatch.setattr("llmrec.data.load_prepared", lambda name: tiny_dataset)
    n_users = len(tiny_dataset.user_ids)
    args = argparse.Namespace(dataset="tiny", append=False, backends=[("transformers", "micro"), ("none", "none")],
                              timeout=5.0, retriever="hybrid", explain=False, concurrency=[1],
                              requests=n_users // 2 + 1, note="", set=[])
    assert bs.service_users_needed(args) == 2 * (n_users // 2 + 1) > n_users
    with pytest.raises(SystemExit, match=f"ask for {2 * (n_users // 2 + 1)} distinct users; tiny has {n_users}"):
        bs.run_service(args)


def test_list_arguments_parse(bench_serving):
    assert bench_serving.positive_ints("1, 8,16") == [1, 8, 16]
    assert bench_serving.backend_specs("vllm,transformers:micro") == [("vllm", "none"), ("transformers", "micro")]
    assert bench_serving.positive_float("2.5") == 2.5

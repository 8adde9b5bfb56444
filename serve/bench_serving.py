"""Serving benchmark (bounded, loopback only) -> eval/results/serving.{json,md}.

    python serve/bench_serving.py engines [--n-score 64 --n-gen 32 --gen-tokens 32 --n-explain 64]
    python serve/bench_serving.py generation [--n-gen 64 --gen-lengths 32,128 --hf-batches 16,64 --append]
    python serve/bench_serving.py service [--backends vllm,transformers --concurrency 1,8,16 --requests 24]
        [--set key=value ...]                 # service config overrides, named in the row
    python serve/bench_serving.py report          # rewrite the markdown from the JSON (+ serving_kill.json)

`engines`: same model (embedded SmolLM2-135M-Instruct, --dtype: "fast" = bf16 where the hardware has it, else
fp32), same prompts (distinct ml-100k Yes/No prompts, so no prefix-cache reuse; the vLLM server also runs with
--no-enable-prefix-caching): scoring prompts/s (first-token log-softmax over " Yes"/" No"), batched generation
tokens/s (forced length: HF min_new_tokens, vLLM ignore_eos), engine start time, and the service's own generation
workload: explanations per second (`explain` template, greedy, natural stop at a newline / EOS, <= 80 tokens). vLLM
via one request per chunk of prompts ("list") and via concurrent single-prompt requests ("concurrent", continuous
batching); vLLM with a LoRA adapter through --lora-modules vs the same adapter merged.
`generation`: batched forced-length generation by length (transformers at several static batch sizes, its best
counts, vs the vLLM server): where the prompts' prefill or the decoding dominates.
`service`: `llmrec serve` subprocesses on 127.0.0.1; GET /recommendations for distinct users (cache misses;
explain=false, or with --explain the explanation too) at each concurrency level, a fixed number of requests
each; p50/p95 latency and requests/s; the service's own micro-batching vs direct concurrent calls.
Each part updates its key in eval/results/serving.json, so parts can run separately. Every run is bounded
(fixed request counts, timeouts). The CPU is shared with other jobs: figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmrec.cli.args import count, positive_float, positive_int, positive_ints

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results_path() -> Path:
    from llmrec.bench_utils import RESULTS_DIR

    return Path(RESULTS_DIR) / "serving.json"


def load_results() -> dict[str, Any]:
    p = results_path()
    return json.loads(p.read_text()) if p.is_file() else {}


# ------------------------------------------------------------------------------------------------------ prompts
def yesno_prompts(n: int, dataset: str = "ml-100k") -> tuple[list[str], str]:
    """n distinct Yes/No prompts from the prepared dataset's Yes/No examples (valid split)."""
    from llmrec.data import load_prepared

    ds = load_prepared(dataset)
    ex = ds.yesno[ds.yesno["split"] == "valid"].head(n * 3).sample(n=n, random_state=0)
    from llmrec.prompts import history_from_dataset, items_from_dataset, load_template, render

    tpl = load_template("yesno")
    out = []
    for row in ex.itertuples():
        hist = history_from_dataset(
            ds, list(row.hist_items), list(row.hist_labels), list(row.hist_ratings), list(row.hist_timestamps)
        )
        target = items_from_dataset(ds, [row.item_id])[0]
        out.append(render(tpl, history=hist, domain=ds.domain, target=target).text)
    return out, f"prompts/yesno.yaml v{tpl.version}"


def explain_prompts(n: int, dataset: str = "ml-100k", seed: int = 0, ds: Any = None,
                    with_quotable: bool = False) -> Any:
    """n explanation prompts (the service's `explain` template) for distinct users: the history of a valid Yes/No
    row and three catalogue items outside it as the recommended list (seeded). Only the generation speed is
    measured, so which items are "recommended" does not matter; no test event is read. `with_quotable`: also the
    titles each prompt lets an explanation quote (the liked history items it lists, as the Recommender passes them
    to `generate_quoted`)."""
    import numpy as np

    from llmrec.data import load_prepared
    from llmrec.prompts import history_from_dataset, items_from_dataset, load_template, quotable_titles, render

    ds = ds if ds is not None else load_prepared(dataset)
    valid = ds.yesno[ds.yesno["split"] == "valid"]
    rows = valid.drop_duplicates("user_id", keep="last").sample(n=n, random_state=seed)
    rng = np.random.default_rng(seed)
    ids = [str(i) for i in ds.items["item_id"]]
    tpl = load_template("explain")
    out, quotable = [], []
    for row in rows.itertuples():
        seen = set(map(str, row.hist_items))
        rec = [i for i in rng.permutation(ids)[:20] if i not in seen][:3]
        hist = history_from_dataset(
            ds, list(row.hist_items), list(row.hist_labels), list(row.hist_ratings), list(row.hist_timestamps)
        )
        r = render(tpl, history=hist, domain=ds.domain, recommended=items_from_dataset(ds, rec))
        out.append(r.text)
        quotable.append(quotable_titles(tpl, hist, r))
    if with_quotable:
        return out, quotable, f"prompts/explain.yaml v{tpl.version}"
    return out, f"prompts/explain.yaml v{tpl.version}"


def _explain_settings() -> dict[str, Any]:
    """The Recommender's own generation settings for an explanation (RankingConfig.explain_max_new_tokens and
    explain_frequency_penalty)."""
    from llmrec.ranking.recommender import RankingConfig

    cfg = RankingConfig()
    return {"max_new_tokens": cfg.explain_max_new_tokens, "frequency_penalty": cfg.explain_frequency_penalty}


def explain_row(be: Any, prompts: list[str], tokenizer: Any, quotable: list[list[str]] | None = None) -> dict:
    """The product's generation workload: one explanation per prompt, greedy, natural stop (newline / EOS), at most
    the Recommender's explain_max_new_tokens; free text (`explain_*`) and, with `quotable`, as the Recommender now
    generates them: quoted titles constrained (`explain_quoted_*`, `generate_quoted`). Tokens counted by
    re-tokenising the returned texts (same tokenizer on both sides)."""
    out: dict[str, Any] = {}
    runs = [("explain", None)] + ([("explain_quoted", quotable)] if quotable is not None else [])
    for key, q in runs:
        t0 = time.perf_counter()
        if q is None:
            texts = be.generate(prompts, stop=["\n"], **_explain_settings())
        else:  # as the Recommender: the explain template's lead_quote (v3: the text opens with a quoted title)
            from llmrec.prompts import load_template

            texts = be.generate_quoted(prompts, q, stop=["\n"], lead_quote=load_template("explain").options.lead_quote,
                                       **_explain_settings())
        s = time.perf_counter() - t0
        n_tok = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out.update({f"{key}_prompts": len(prompts), f"{key}_s": s, f"{key}_per_s": len(prompts) / s,
                    f"{key}_tokens": n_tok, f"{key}_tokens_per_s": n_tok / s,
                    f"{key}_mean_tokens": n_tok / max(len(texts), 1)})
    return out


# ------------------------------------------------------------------------------------------------------ engines
def hf_forced_generate(be: Any, prompts: list[str], gen_tokens: int, batch: int) -> tuple[int, float]:
    """Greedy generation of exactly `gen_tokens` new tokens per prompt (HF min_new_tokens) in static batches of
    `batch` prompts (left padding, as the backend pads). Returns (tokens generated, seconds); padding after a row
    that ended early is not counted."""
    import torch

    tok = be.tokenizer
    n_tok = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(prompts), batch):
            enc = tok(prompts[b:b + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = be.model.generate(**enc, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False,
                                    temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
            n_tok += int((out[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
    return n_tok, time.perf_counter() - t0


def bench_transformers(model: str, score_prompts: list[str], gen_prompts: list[str], gen_tokens: int,
                       dtype: str = "float32", expl_prompts: list[str] | None = None,
                       expl_quotable: list[list[str]] | None = None) -> dict:
    import torch

    from llmrec.llm import load_backend

    t0 = time.perf_counter()
    be = load_backend("transformers", model=model, dtype=dtype, batch_size=16)
    start = time.perf_counter() - t0
    be.score_choices(score_prompts[:2], [" Yes", " No"])  # warm-up
    t0 = time.perf_counter()
    lp = be.score_choices(score_prompts, [" Yes", " No"])
    score_s = time.perf_counter() - t0
    tok = be.tokenizer
    n_tok, gen_s = hf_forced_generate(be, gen_prompts, gen_tokens, 16)
    expl = explain_row(be, expl_prompts, tok, expl_quotable) if expl_prompts else {}
    return {"engine": f"transformers {dtype} (batch 16)", "start_s": start, "score_prompts": len(score_prompts),
            "score_s": score_s, "score_prompts_per_s": len(score_prompts) / score_s, "gen_prompts": len(gen_prompts),
            "gen_tokens": n_tok, "gen_s": gen_s, "gen_tokens_per_s": n_tok / gen_s, **expl,
            "p_yes": [float(x) for x in torch.tensor(lp[:, 0]).exp().tolist()]}


def bench_vllm_server(model: str, score_prompts: list[str], gen_prompts: list[str], gen_tokens: int,
                      served_name: str | None = None, lora: dict[str, str] | None = None, label: str = "",
                      modes: tuple[str, ...] = ("list", "concurrent"), dtype: str = "float32",
                      expl_prompts: list[str] | None = None,
                      expl_quotable: list[list[str]] | None = None) -> list[dict]:
    from llmrec.llm.vllm_backend import VLLMBackend
    from llmrec.service.launch import VLLMServer

    srv = VLLMServer(model, port=free_port(), served_name=served_name, lora_modules=lora, python=str(VLLM_PY),
                     extra_args=["--no-enable-prefix-caching"], max_lora_rank=8, dtype=dtype)
    rows = []
    with srv:
        name = next(iter(lora)) if lora else None
        for mode in modes:
            be = VLLMBackend(url=srv.url, model=served_name or model, tokenizer=model,
                             chunk_size=64 if mode == "list" else 1, max_concurrency=16)
            if name:
                be = be.with_adapter(name)
            be.score_choices(score_prompts[:2], [" Yes", " No"])  # warm-up
            t0 = time.perf_counter()
            lp = be.score_choices(score_prompts, [" Yes", " No"])
            score_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = be.generate(gen_prompts, max_new_tokens=gen_tokens, ignore_eos=True)
            gen_s = time.perf_counter() - t0
            n_tok = len(gen_prompts) * gen_tokens
            assert all(isinstance(o, str) for o in outs)
            expl = explain_row(be, expl_prompts, be.tokenizer, expl_quotable) if expl_prompts else {}
            rows.append({"engine": f"vLLM server {dtype}{label}, {mode}", "start_s": srv.start_s,
                         "score_prompts": len(score_prompts), "score_s": score_s,
                         "score_prompts_per_s": len(score_prompts) / score_s, "gen_prompts": len(gen_prompts),
                         "gen_tokens": n_tok, "gen_s": gen_s, "gen_tokens_per_s": n_tok / gen_s, **expl,
                         "p_yes": [float(x) for x in __import__("numpy").exp(lp[:, 0])]})
            be.close()
            print(rows[-1]["engine"], f"{rows[-1]['score_prompts_per_s']:.2f} p/s",
                  f"{rows[-1]['gen_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def make_adapter(model: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    p = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    p.save_pretrained(out)
    return out


def run_engines(args: argparse.Namespace) -> dict:
    import numpy as np

    from llmrec.llm import default_model_path
    from llmrec.llm.loading import resolve_dtype
    from llmrec.service.launch import merge_adapter

    dt = resolve_dtype(args.dtype)
    model = str(default_model_path())
    prompts, source = yesno_prompts(args.n_score + args.n_gen)
    score_p, gen_p = prompts[:args.n_score], prompts[args.n_score:]
    expl_p, expl_q, expl_source = (explain_prompts(args.n_explain, args.dataset, with_quotable=True)
                                   if args.n_explain else ([], None, None))
    rows = [bench_transformers(model, score_p, gen_p, args.gen_tokens, dtype=dt, expl_prompts=expl_p,
                               expl_quotable=expl_q)]
    hf = rows[-1]
    print(hf["engine"], f"{hf['score_prompts_per_s']:.2f} p/s", f"{hf['gen_tokens_per_s']:.1f} tok/s", flush=True)
    rows += bench_vllm_server(model, score_p, gen_p, args.gen_tokens, dtype=dt, expl_prompts=expl_p,
                              expl_quotable=expl_q)
    if not args.skip_lora:
        tmp = Path(tempfile.mkdtemp(prefix="llmrec-bench-"))
        adapter = make_adapter(model, tmp / "bench-lora")
        n = args.n_lora
        rows += bench_vllm_server(model, score_p[:n], gen_p[:n], args.gen_tokens, lora={"bench-lora": str(adapter)},
                                  label=" + LoRA via --lora-modules", modes=("list",), dtype=dt)
        merged = merge_adapter(model, str(adapter), out=tmp / "merged")
        rows += bench_vllm_server(str(merged), score_p[:n], gen_p[:n], args.gen_tokens, served_name="bench-lora",
                                  label=" + same LoRA merged", modes=("list",), dtype=dt)
    ref = np.array(rows[0]["p_yes"])
    for r in rows:
        p = np.array(r.pop("p_yes"))
        if r["engine"].startswith(f"vLLM server {dt},"):
            r["max_abs_diff_p_yes_vs_transformers"] = float(np.abs(p - ref[:len(p)]).max())
    hf = rows[0]
    best = max((r for r in rows if r["engine"].startswith(f"vLLM server {dt},")), key=lambda r: r["gen_tokens_per_s"])
    expl: dict[str, Any] = {}
    if expl_p:
        best_e = max((r for r in rows if r["engine"].startswith(f"vLLM server {dt},")),
                     key=lambda r: r["explain_per_s"])
        best_q = max((r for r in rows if r["engine"].startswith(f"vLLM server {dt},")),
                     key=lambda r: r["explain_quoted_per_s"])
        expl = {"explain_prompt_source": expl_source, "explain_max_tokens": _explain_settings()["max_new_tokens"],
                "vllm_vs_transformers_explain_speedup": best_e["explain_per_s"] / hf["explain_per_s"],
                "goal_explain_speedup_3x_met": best_e["explain_per_s"] / hf["explain_per_s"] >= 3.0,
                "vllm_vs_transformers_explain_quoted_speedup": best_q["explain_quoted_per_s"]
                / hf["explain_quoted_per_s"]}
    return {"model": model, "dtype": dt, "prompt_source": source, "gen_tokens_per_prompt": args.gen_tokens,
            "rows": rows, **expl,
            "vllm_vs_transformers_gen_speedup": best["gen_tokens_per_s"] / hf["gen_tokens_per_s"],
            "vllm_vs_transformers_score_speedup": best["score_prompts_per_s"] / hf["score_prompts_per_s"],
            "goal_gen_speedup_3x_met": best["gen_tokens_per_s"] / hf["gen_tokens_per_s"] >= 3.0}


def run_generation(args: argparse.Namespace) -> dict:
    """Batched forced-length generation by length: the same `n_gen` Yes/No prompts (~330 tokens) with each length in
    `gen_lengths` new tokens; transformers at each static batch size in `hf_batches` (its best counts), the vLLM
    server with one request for all prompts. At 32 tokens the prompts' prefill (compute-bound on a CPU, where vLLM
    has less of an edge) is most of the work; the longer the generation, the more the run measures decoding."""
    import gc

    from llmrec.llm import default_model_path, load_backend
    from llmrec.llm.loading import resolve_dtype
    from llmrec.llm.vllm_backend import VLLMBackend
    from llmrec.service.launch import VLLMServer

    dt = resolve_dtype(args.dtype)
    model = str(default_model_path())
    prompts, source = yesno_prompts(args.n_gen)
    lengths, batches = args.gen_lengths, args.hf_batches
    rows: list[dict] = []
    be = load_backend("transformers", model=model, dtype=dt, batch_size=max(batches))
    hf_forced_generate(be, prompts[:2], 4, 2)  # warm-up
    for n_new in lengths:
        for batch in batches:
            n_tok, s = hf_forced_generate(be, prompts, n_new, batch)
            rows.append({"engine": f"transformers {dt}", "batch": batch, "gen_tokens_per_prompt": n_new,
                         "gen_prompts": len(prompts), "gen_tokens": n_tok, "gen_s": s, "gen_tokens_per_s": n_tok / s})
            print(rows[-1], flush=True)
    del be
    gc.collect()
    srv = VLLMServer(model, port=free_port(), python=str(VLLM_PY), extra_args=["--no-enable-prefix-caching"],
                     dtype=dt)
    with srv:
        vb = VLLMBackend(url=srv.url, model=model, tokenizer=model, chunk_size=len(prompts), max_concurrency=16)
        vb.generate(prompts[:2], max_new_tokens=4, ignore_eos=True)  # warm-up
        for n_new in lengths:
            t0 = time.perf_counter()
            outs = vb.generate(prompts, max_new_tokens=n_new, ignore_eos=True)
            s = time.perf_counter() - t0
            assert len(outs) == len(prompts)
            n_tok = len(prompts) * n_new
            rows.append({"engine": f"vLLM server {dt}", "batch": len(prompts), "gen_tokens_per_prompt": n_new,
                         "gen_prompts": len(prompts), "gen_tokens": n_tok, "gen_s": s, "gen_tokens_per_s": n_tok / s,
                         "start_s": srv.start_s})
            print(rows[-1], flush=True)
        vb.close()
    speedups = {}
    for n_new in lengths:
        hf = max(r["gen_tokens_per_s"] for r in rows if r["engine"].startswith("transformers")
                 and r["gen_tokens_per_prompt"] == n_new)
        vl = max(r["gen_tokens_per_s"] for r in rows if r["engine"].startswith("vLLM")
                 and r["gen_tokens_per_prompt"] == n_new)
        speedups[str(n_new)] = vl / hf
    return {"model": model, "dtype": dt, "prompt_source": source, "rows": rows,
            "vllm_vs_best_transformers_speedup": speedups}


# ------------------------------------------------------------------------------------------------------ service
def start_service(overrides: list[str], port: int, log_path: Path, timeout: float = 900) -> subprocess.Popen:
    from llmrec.service.client import wait_until_up

    cli = "import sys; from llmrec.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", cli, "serve", "--config", str(ROOT / "serve" / "config.yaml"), "--port", str(port),
           "--set", *overrides]
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, timeout, name="service", log_path=log_path)
    except BaseException:  # timed out, exited early, Ctrl-C (the service's own session never gets the terminal's)
        stop_service(proc)
        raise
    return proc


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM to the service's session (the service stops the vLLM server it launched), SIGKILL after 60 s, and
    SIGKILL to whatever of the session outlived the service."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ascending `sorted_vals` (the smallest value with at least q of them at or below
    it); None when there are none."""
    if not sorted_vals:
        return None
    rank = math.ceil(round(q * len(sorted_vals), 9))  # round: 0.95 * 100 is 95.00000000000001 in floats
    return sorted_vals[min(max(rank, 1), len(sorted_vals)) - 1]


def load_run(base: str, users: list[str], concurrency: int, timeout: float, explain: bool = False) -> dict:
    """len(users) GET /recommendations with `concurrency` client threads; bounded by the request timeout. Every
    request is tallied under `status` (HTTP code, or the exception's name); `errors` counts the ones that were not a
    readable 200; p50/p95 are the latencies of the 200 answers (a fast error would otherwise lower them), and
    requests_per_s the 200 answers per second of the whole run (fast errors would otherwise raise it)."""
    import httpx

    lat: list[float] = []
    codes: dict[str, int] = {}
    degraded = 0
    it = iter(users)
    lock = threading.Lock()

    def worker() -> None:
        nonlocal degraded
        with httpx.Client(timeout=timeout) as c:
            while True:
                with lock:
                    u = next(it, None)
                if u is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.get(f"{base}/v1/users/{u}/recommendations",
                              params={"k": 10, "explain": str(explain).lower()})
                    code = str(r.status_code)
                    deg = r.status_code == 200 and r.json().get("degraded")
                except Exception as e:  # noqa: BLE001 - counted (an unreadable body too), never a dead client thread
                    code, deg = type(e).__name__, False
                dt = time.perf_counter() - t0
                with lock:
                    if code == "200":
                        lat.append(dt)
                    codes[code] = codes.get(code, 0) + 1
                    degraded += int(bool(deg))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    p50, p95 = (statistics.median(lat) if lat else None), percentile(lat, 0.95)
    return {"concurrency": concurrency, "requests": len(users), "wall_s": wall,
            "requests_per_s": codes.get("200", 0) / wall,
            "p50_ms": None if p50 is None else 1000 * p50, "p95_ms": None if p95 is None else 1000 * p95,
            "status": codes, "errors": len(users) - codes.get("200", 0), "degraded": degraded}


def _service_default(field: str) -> Any:
    import dataclasses

    from llmrec.service.config import ServiceConfig

    return {f.name: f.default for f in dataclasses.fields(ServiceConfig)}[field]


def run_service(args: argparse.Namespace, cmd: str = "") -> dict:
    from llmrec.data import load_prepared

    ds = load_prepared(args.dataset)
    all_users = [str(u) for u in ds.user_ids]
    out: dict[str, Any] = load_results().get("service", {}) if args.append else {}
    offset = 0
    need = service_users_needed(args)
    if need > len(all_users):  # checked before any service starts: a level past the last user sent no request
        raise SystemExit(f"bench_serving.py service: {len(args.backends)} backend(s) x concurrency {args.concurrency} "
                         f"with --requests {args.requests} ask for {need} distinct users; {args.dataset} has "
                         f"{len(all_users)}: lower --requests or --concurrency, or run fewer --backends at once")
    for kind, batching in args.backends:
        port = free_port()
        tmp = Path(tempfile.mkdtemp(prefix="llmrec-bench-svc-"))
        over = [f"dataset={args.dataset}", f"store_url=sqlite:///{tmp / 'events.db'}", f"batching={batching}",
                f"llm.timeout_s={args.timeout}", "fallback=none", f"llm.vllm_port={free_port()}",
                f"retriever={args.retriever}"]
        over.append("llm.backend=vllm" if kind == "vllm" else f"llm.backend={kind}")
        over += args.set
        log_path = tmp / "service.log"
        t0 = time.perf_counter()
        proc = start_service(over, port, log_path)
        start_s = time.perf_counter() - t0
        key = (f"{kind}, batching={batching}" + (", explain" if args.explain else "")
               + (f", {args.retriever}" if args.retriever != _service_default("retriever") else "")
               + "".join(f", {kv}" for kv in args.set))
        try:
            import httpx

            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            runs = []
            for c in args.concurrency:
                n = max(args.requests, 2 * c)  # at least two requests per client thread
                users = all_users[offset:offset + n]  # distinct users: no cache hits
                offset += n
                r = load_run(f"http://127.0.0.1:{port}", users, c, args.timeout + 30, explain=args.explain)
                print(key, r, flush=True)
                runs.append(r)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            batch_lines = [ln for ln in metrics.splitlines() if ln.startswith("llmrec_batch_size_") and "_sum" in ln
                           or ln.startswith("llmrec_batch_size_count")]
        finally:
            stop_service(proc)
        out[key] = {"backend": health.get("backend"), "backend_note": health.get("backend_note"),
                    "model": health.get("model"), "service_start_s": start_s, "runs": runs,
                    "retriever": args.retriever, "explain": args.explain, "note": args.note, "command": cmd,
                    "batch_size_metrics": batch_lines, "machine": machine_info()}
    return out


# ------------------------------------------------------------------------------------------------------ report
# parts run on different days can come from different machines (the file's own `machine` line is the last writer's)
MACHINE_UNRECORDED = "not recorded with this part"


def machine_info() -> str:
    from llmrec.bench_utils import machine_info as info

    return info()


def write(res: dict) -> None:
    from llmrec.bench_utils import md_table, write_result

    kill_p = results_path().parent / "serving_kill.json"
    if kill_p.is_file():
        k = json.loads(kill_p.read_text())
        res["kill_test"] = {key: k.get(key) for key in (
            "sent", "acknowledged_201", "present_after_restart", "acknowledged_missing", "duplicates",
            "committed_but_unacknowledged", "after_retry_present", "after_retry_duplicates", "passed", "created")}
    shared = "The CPU (2 cores) was shared with other jobs during this part: figures are noisy."
    md = []
    eng = res.get("engines")
    if eng:
        md.append(f"## Engines (same model, same prompts)\n\n{eng.get('note') or shared}\n\n"
                  f"`{eng.get('command', '')}`; machine: {eng.get('machine', MACHINE_UNRECORDED)}; "
                  f"model `{eng['model']}`, "
                  f"prompts: {eng['prompt_source']}; generation: {eng['gen_tokens_per_prompt']} forced tokens per "
                  "prompt.\n")
        md.append(md_table([{**r, "start_s": r.get("start_s")} for r in eng["rows"]],
                           ["engine", "start_s", "score_prompts", "score_prompts_per_s", "gen_prompts",
                            "gen_tokens_per_s", "max_abs_diff_p_yes_vs_transformers"]))
        md.append(f"\nvLLM / transformers: generation x{eng['vllm_vs_transformers_gen_speedup']:.2f}, "
                  f"scoring x{eng['vllm_vs_transformers_score_speedup']:.2f} "
                  f"(goal >= 3x on batched generation; here {eng['rows'][0]['gen_prompts']} prompts x "
                  f"{eng['gen_tokens_per_prompt']} forced tokens: "
                  f"{'met' if eng['goal_gen_speedup_3x_met'] else 'NOT met'}; "
                  "more prompts and longer outputs: the generation runs below).\n")
        if eng.get("vllm_vs_transformers_explain_speedup"):
            md.append(f"\n### The service's generation workload: explanations\n\n{eng['explain_prompt_source']}, one "
                      f"per user, greedy, stop at the first newline or EOS, at most {eng['explain_max_tokens']} new "
                      "tokens (the Recommender's settings); transformers generates in static batches of 16 (a batch "
                      "runs until its longest row ends), vLLM schedules each sequence on its own (continuous "
                      "batching).\n")
            quoted = eng.get("vllm_vs_transformers_explain_quoted_speedup")
            md.append(md_table([r for r in eng["rows"] if r.get("explain_prompts")],
                               ["engine", "explain_prompts", "explain_per_s", "explain_tokens_per_s",
                                "explain_mean_tokens"]
                               + (["explain_quoted_per_s", "explain_quoted_tokens_per_s"] if quoted else [])))
            md.append(f"\nvLLM / transformers on explanations: x{eng['vllm_vs_transformers_explain_speedup']:.2f} "
                      f"(goal >= 3x: {'met' if eng['goal_explain_speedup_3x_met'] else 'NOT met'}).\n")
            if quoted:
                md.append(f"\nWith quoted titles constrained (`generate_quoted`, how the Recommender now explains; "
                          f"transformers: a logits processor, vLLM: a structured-output regex per request): "
                          f"x{quoted:.2f}.\n")
    gen_runs = res.get("generation", {}).get("runs", [])
    for n, gen in enumerate(gen_runs, 1):
        run = f" — run {n} of {len(gen_runs)}" if len(gen_runs) > 1 else ""
        md.append(f"\n### Batched generation by length (forced tokens){run}\n\n{gen.get('note') or shared}\n\n"
                  f"`{gen.get('command', '')}`; machine: {gen.get('machine', MACHINE_UNRECORDED)}; model "
                  f"`{gen['model']}` ({gen['dtype']}), prompts: {gen['prompt_source']} (the same prompts for every "
                  "row); transformers in static batches of `batch` prompts, vLLM one request for all of them.\n")
        md.append(md_table(gen["rows"], ["engine", "batch", "gen_tokens_per_prompt", "gen_prompts", "start_s", "gen_s",
                                         "gen_tokens_per_s"]))
        md.append("\nvLLM / the best transformers batch: " + ", ".join(
            f"x{v:.2f} at {k} tokens" for k, v in gen["vllm_vs_best_transformers_speedup"].items())
            + " (goal >= 3x on batched generation).\n")
    svc = res.get("service")
    if svc:
        rows = []
        for key, v in svc.items():
            for r in v["runs"]:
                rows.append({"service": key, "retriever": v.get("retriever", "text"),
                             "explain": v.get("explain", False), "concurrency": r["concurrency"],
                             "requests": r["requests"],
                             "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "requests_per_s": r["requests_per_s"],
                             "status": json.dumps(r["status"]), "degraded": r["degraded"]})
        runs_md = []  # each run of this part (--append keeps earlier ones): its note and command
        for v in svc.values():
            command = v.get("command") or res.get("commands", {}).get("service", "")
            item = (f"- {v.get('note') or res.get('service_note') or shared} `{command}`; machine: "
                    f"{v.get('machine', MACHINE_UNRECORDED)}")
            if item not in runs_md:
                runs_md.append(item)
        md.append("\n## Service: GET /v1/users/{id}/recommendations?k=10 (distinct users, no cache hits)\n\n"
                  + "\n".join(runs_md) + "\n\n")
        md.append(md_table(rows, ["service", "retriever", "explain", "concurrency", "requests", "p50_ms", "p95_ms",
                                  "requests_per_s", "status", "degraded"]))
        for explain in (False, True):  # requests/s at the highest concurrency: best vLLM row vs best transformers row
            best: dict[str, tuple[int, float]] = {}
            for r in rows:
                kind = r["service"].split(",")[0]
                if (r["explain"] == explain and r["retriever"] == _service_default("retriever")
                        and r["status"] == json.dumps({"200": r["requests"]})):
                    c, rps = best.get(kind, (0, 0.0))
                    if (r["concurrency"], r["requests_per_s"]) > (c, rps):
                        best[kind] = (r["concurrency"], r["requests_per_s"])
            v_, t_ = best.get("vllm"), best.get("transformers")
            if v_ and t_ and v_[0] == t_[0]:
                md.append(f"\n{'With' if explain else 'Without'} explanations, concurrency {v_[0]}: vLLM "
                          f"{v_[1]:.2f} requests/s vs transformers {t_[1]:.2f} (best batching mode of each): "
                          f"x{v_[1] / t_[1]:.2f}.\n")
        starts = []
        for key, v in svc.items():
            row = {"service": key, "backend": v["backend"], "service_start_s": v["service_start_s"]}
            for op, label in (("score", "rank"), ("quoted", "explain")):  # micro-batches per backend operation
                vals = {ln.split("{")[0].rsplit("_", 1)[-1]: float(ln.split()[-1])
                        for ln in v["batch_size_metrics"] if f'op="{op}"' in ln}
                if vals.get("count"):
                    row[f"{label}_calls"] = vals["count"]
                    row[f"{label}_mean_prompts_per_call"] = vals["sum"] / vals["count"]
            starts.append(row)
        md.append("\nService start (includes the vLLM server start for vllm rows) and micro-batch sizes "
                  "(`llmrec_batch_size` per operation, over the whole run: backend calls and prompts per call):\n\n")
        md.append(md_table(starts, ["service", "backend", "service_start_s", "rank_calls",
                                    "rank_mean_prompts_per_call", "explain_calls", "explain_mean_prompts_per_call"]))
    if res.get("kill_test"):
        k = res["kill_test"]
        md.append("\n## Kill test (serve/kill_test.py)\n\n")
        md.append(md_table([{"measure": a, "value": b} for a, b in k.items()], ["measure", "value"]))
    payload = {k: v for k, v in res.items() if k not in ("commit", "machine", "command", "created")}
    payload.setdefault("dataset", "ml-100k")
    write_result("serving", payload, "\n".join(md))


BACKEND_KINDS, BATCHING = ("vllm", "transformers", "none"), ("none", "micro", "auto")


def backend_specs(text: str) -> list[tuple[str, str]]:
    """argparse type of --backends: `kind[:batching],...` -> [(kind, batching)] (batching default none)."""
    out = []
    for spec in (x.strip() for x in text.split(",")):
        kind, _, batching = spec.partition(":")
        if kind not in BACKEND_KINDS or (batching or "none") not in BATCHING:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected kind[:batching] with kind one of "
                                             f"{'|'.join(BACKEND_KINDS)} and batching one of {'|'.join(BATCHING)}")
        out.append((kind, batching or "none"))
    return out


def service_users_needed(args: argparse.Namespace) -> int:
    """Distinct users the service part asks for: every backend's levels, max(--requests, 2 x concurrency) each."""
    return len(args.backends) * sum(max(args.requests, 2 * c) for c in args.concurrency)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["engines", "generation", "service", "report"])
    ap.add_argument("--n-score", type=positive_int, default=64)
    ap.add_argument("--n-gen", type=positive_int, default=32)
    ap.add_argument("--dtype", default="fast", help="engines / generation: both engines in this dtype")
    ap.add_argument("--n-lora", type=positive_int, default=16,
                    help="prompts for the LoRA vs merged rows (LoRA is slow on CPU)")
    ap.add_argument("--gen-tokens", type=positive_int, default=32)
    ap.add_argument("--gen-lengths", type=positive_ints, default="32,128",
                    help="generation: forced new tokens per prompt, comma list")
    ap.add_argument("--hf-batches", type=positive_ints, default="16,64",
                    help="generation: transformers static batch sizes, comma list")
    ap.add_argument("--n-explain", type=count, default=64,
                    help="explanation prompts (natural stop) per engine; 0 skips that workload")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--backends", type=backend_specs, default="vllm,transformers",
                    help="comma list of kind[:batching], kind in vllm|transformers|none, batching none|micro")
    ap.add_argument("--concurrency", type=positive_ints, default="1,8,16",
                    help="service: client threads of each level, comma list")
    ap.add_argument("--requests", type=positive_int, default=8,
                    help="requests per concurrency level (at least 2 x concurrency)")
    ap.add_argument("--timeout", type=positive_float, default=300.0,
                    help="service: llm.timeout_s of the service; each request waits at most this + 30 s")
    ap.add_argument("--append", action="store_true", help="service / generation: keep the earlier runs' rows")
    ap.add_argument("--explain", action="store_true", help="service: ask for the explanation too (explain=true)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="service: extra config overrides (e.g. exclude_seen_titles=false), named in the row")
    ap.add_argument("--retriever", default=_service_default("retriever"),
                    help="service: candidate retriever (default: the service's own default)")
    ap.add_argument("--note", default="", help="how the machine was during this part (e.g. quiet); stored with it")
    args = ap.parse_args()
    res = load_results()
    from llmrec.bench_utils import command_line

    cmd = command_line()
    if args.part == "engines":
        res["engines"] = {**run_engines(args), "command": cmd, "note": args.note, "machine": machine_info()}
    elif args.part == "generation":
        runs = res.get("generation", {}).get("runs", []) if args.append else []
        runs.append({**run_generation(args), "command": cmd, "note": args.note, "machine": machine_info()})
        res["generation"] = {"runs": runs}
    elif args.part == "service":
        res["service"] = run_service(args, cmd)
        res.setdefault("commands", {})["service"] = cmd
        res["service_note"] = args.note
    res["dataset"] = args.dataset
    write(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`llmrec demo`: the first hour of a new user, end to end on the embedded defaults.

1. prepare ML-100K (and ML-1M) and print their statistics;
2. fine-tune the embedded SmolLM2-135M briefly (QLoRA, Yes/No, rank and next-title recipes, small step budgets);
3. benchmark every method side by side on the same split with demo budgets (`$LLMREC_HOME/demo/bench_<dataset>.md`;
   `llmrec bench` writes the full run to `eval/results/`);
4. start the recommendation service, ask for one user's recommendations with an explanation, post a feedback event,
   show the changed answer, stop the service.
Each stage reuses what an earlier run built (prepared data, adapters, converted model).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmrec.config import llmrec_home

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


def _stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/4] {text} ===", flush=True)


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# demo budgets: (train steps, train examples, Yes/No examples and users the bench scores per method)
DEMO_BUDGET = {"steps": 32, "n_train": 256, "rank_users": 100, "yesno_examples": 200, "explanations": 5,
               "generate_users": 5}
FAST_BUDGET = {"steps": 2, "n_train": 16, "rank_users": 10, "yesno_examples": 20, "explanations": 2,
               "generate_users": 2}


def finetune_stage(dataset: str, budget: dict) -> dict[str, str]:
    """Run the three default recipes with the demo step budget unless their adapters already exist. The tuned-vs-
    zero-shot comparison is the bench's job, so the recipe's own test passes are switched off here."""
    out = {}
    for task in ("yesno", "rank", "next_title"):
        out_dir = llmrec_home() / "finetune" / f"demo_{task}_{dataset}_{budget['steps']}steps"
        if not (out_dir / "adapter" / "adapter_config.json").is_file():
            _run(
                [
                    sys.executable,
                    "finetune/train.py",
                    "--config",
                    f"finetune/recipes/{task}_smollm2_qlora.yaml",
                    f"dataset={dataset}",
                    f"output_dir={out_dir}",
                    f"train.max_steps={budget['steps']}",
                    f"data.n_train={budget['n_train']}",
                    "data.n_valid=0",
                    "data.n_test=0",
                    "eval_before=false",
                    "eval_after=false",
                ]
            )
        else:
            print(f"reusing {out_dir}/adapter")
        out[task] = str(out_dir / "adapter")
    return out


def service_stage(dataset: str, user_id: str, adapter: str | None) -> None:
    import httpx

    from llmrec.service.client import format_recommendations, wait_until_up

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "llmrec.cli",
        "serve",
        "--config",
        "serve/config.yaml",
        "--set",
        f"dataset={dataset}",
        f"port={port}",
        "llm.backend=auto",
    ]
    if adapter:
        cmd += [f"llm.adapters={{demo: {adapter}}}", "llm.default_adapter=demo"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        wait_until_up(f"{url}/ready", proc, 900, interval_s=2, name="the service")
        health = httpx.get(f"{url}/health", timeout=5).json()
        print(f"service ready at {url}: {health}")
        q = {"k": 5, "explain": "true"}
        r1 = httpx.get(f"{url}/v1/users/{user_id}/recommendations", params=q, timeout=600).json()
        print(f"\n--- GET /v1/users/{user_id}/recommendations?k=5&explain=true")
        print(format_recommendations(r1))
        top = r1["items"][0]
        event = {
            "user_id": user_id,
            "item_id": top["item_id"],
            "type": "rating",
            "value": 1.0,
            "timestamp": int(time.time()),
        }
        ack = httpx.post(
            f"{url}/v1/events", json=event, headers={"Idempotency-Key": f"demo-{time.time()}"}, timeout=30
        )
        print(f"\n--- POST /v1/events (user {user_id} rates '{top['title']}' 1/5) -> {ack.status_code}")
        r2 = httpx.get(f"{url}/v1/users/{user_id}/recommendations", params=q, timeout=600).json()
        print("\n--- the same request after the feedback event")
        print(format_recommendations(r2))
        before, after = [i["item_id"] for i in r1["items"]], [i["item_id"] for i in r2["items"]]
        print(
            f"\nchanged: {before != after}; '{top['title']}' now "
            f"{'absent' if top['item_id'] not in after else 'present'}"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print("service stopped", flush=True)


def run_demo(dataset: str = "ml-100k", user_id: str = "1", fast: bool = False) -> int:
    from llmrec.cli.data import format_stats
    from llmrec.data import dataset_dir, load_prepared, prepare

    t0 = time.time()
    _stage(1, "data")
    for name in dict.fromkeys([dataset, "ml-1m"]):
        if (dataset_dir(name) / "manifest.json").is_file():
            print(format_stats(name, load_prepared(name).manifest["stats"]) + "\n(reused)")
        else:
            rep = prepare(name)
            print(format_stats(name, rep.stats, rep.seconds))
    budget = FAST_BUDGET if fast else DEMO_BUDGET
    _stage(2, f"fine-tune the embedded SmolLM2-135M (QLoRA, {budget['steps']} steps per task)")
    adapters = finetune_stage(dataset, budget)
    _stage(3, "benchmark every method on the same split")
    out_dir = llmrec_home() / "demo"
    bench = [
        sys.executable,
        "-m",
        "llmrec.cli",
        "bench",
        "--dataset",
        dataset,
        "--set",
        f"adapter_yesno={adapters['yesno']}",
        f"adapter_rank={adapters['rank']}",
        f"adapter_title={adapters['next_title']}",
        f"rank_users={budget['rank_users']}",
        f"yesno_examples={budget['yesno_examples']}",
        f"yesno_valid_examples={budget['yesno_examples']}",  # as many validation rows for the thresholds
        f"explanations={budget['explanations']}",
        f"generate_users={budget['generate_users']}",
        f"results_dir={out_dir}",
    ]
    if fast:
        bench.extend(["baselines=[pop,mf,bpr]", "retriever=hybrid"])  # no SASRec to fit: item-CF candidates
    done = out_dir / f"bench_{dataset}.md"
    if done.is_file() and (out_dir / f"bench_{dataset}.json").stat().st_mtime > max(
        Path(a).stat().st_mtime for a in adapters.values()
    ):
        print(done.read_text() + f"\n(reused {done}; delete it to re-run the benchmark)")
    else:
        _run(bench)
    print(f"(the demo's bench files are in {out_dir}; `make bench` writes eval/results/ with the full recipes)")
    _stage(4, "serve, query a user, post feedback, query again")
    service_stage(dataset, user_id, adapters["rank"])
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")
    return 0

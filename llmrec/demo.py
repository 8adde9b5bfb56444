"""`llmrec demo`: the first hour of a new user, end to end on the embedded defaults.

1. prepare ML-100K (and ML-1M) and print their statistics;
2. fine-tune the embedded SmolLM2-135M briefly (QLoRA, Yes/No, rank and next-title recipes, small step budgets);
3. benchmark every method side by side on the same split with demo budgets (`$LLMREC_HOME/demo/bench_<dataset>.md`;
   `llmrec bench` writes the full run to `eval/results/`);
4. start the recommendation service (on an event store of its own, `$LLMREC_HOME/demo/store_<dataset>.db`, emptied
   first), ask for one user's recommendations with an explanation, post a feedback event, show the changed answer,
   stop the service.
Each stage reuses what an earlier run built (prepared data, adapters, converted model) when it was built with the
same settings (an adapter's recipe, the bench's config), and says so; anything else is built again. Every step runs in
the checkout with the same `$LLMREC_HOME` as the demo (made absolute). A failed step, an unknown user or a service
answer that does not show what the demo claims (an LLM answer, changed by the feedback) ends the demo with exit
status 1 and one line saying which step and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmrec.config import llmrec_home

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


class DemoError(RuntimeError):
    """A step of the demo failed, or its result is not what the demo shows; the message says which and why."""


def _stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/4] {text} ===", flush=True)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run one step in the checkout; DemoError naming the command when it fails (its own output is above)."""
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise DemoError(f"`{shlex.join(cmd)}` exited with code {rc} (its output is above)")


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


def finetune_stage(dataset: str, budget: dict, home: Path | None = None,
                   env: dict[str, str] | None = None) -> dict[str, str]:
    """Run the three default recipes with the demo step budget unless their adapters already exist, trained with the
    same recipe (its recipe.yaml; else trained again). The tuned-vs-zero-shot comparison is the bench's job, so the
    recipe's own test passes are switched off here."""
    from llmrec.finetune.runs import RecipeRunError, train_recipes

    home = home or llmrec_home().resolve()
    overrides = [
        f"train.max_steps={budget['steps']}",
        f"data.n_train={budget['n_train']}",
        "data.n_valid=0",
        "data.n_test=0",
        "eval_before=false",
        "eval_after=false",
    ]
    try:
        return train_recipes(dataset, lambda task: home / "finetune" / f"demo_{task}_{dataset}_{budget['steps']}steps",
                             overrides, env, run=_run)
    except RecipeRunError as e:
        raise DemoError(str(e)) from None


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of `folder` and its files (an adapter saved again overwrites its files in place,
    which leaves the folder's own time as it was)."""
    return max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir() if f.is_file())])


def bench_reuse(out_dir: Path, dataset: str, sets: list[str], adapters: dict[str, str]) -> tuple[bool, str]:
    """(reusable, why not): an earlier bench in `out_dir` is the one this run would make when it ran with the same
    config (every BenchConfig key: budgets, baselines, retriever, adapter folders) after those adapters were last
    saved."""
    from llmrec.bench import BenchConfig
    from llmrec.config import load_config

    js, md = out_dir / f"bench_{dataset}.json", out_dir / f"bench_{dataset}.md"
    if not (js.is_file() and md.is_file()):
        return False, ""
    try:
        saved = json.loads(js.read_text()).get("config")
    except (OSError, ValueError, AttributeError) as e:
        return False, f"{js} is unreadable ({e})"
    want = json.loads(json.dumps(vars(load_config(BenchConfig, None, [f"dataset={dataset}", *sets])), default=str))
    if not isinstance(saved, dict):
        return False, f"{js} records no config"
    if saved != want:
        diff = sorted(k for k in {*want, *saved} if want.get(k) != saved.get(k))
        return False, f"{js} was run with other settings ({', '.join(diff)})"
    newer = [a for a in adapters.values() if _newest_mtime(Path(a)) > js.stat().st_mtime]
    if newer:
        return False, f"{js} is older than the adapter(s) {', '.join(newer)}"
    return True, ""


def demo_store(home: Path, dataset: str) -> Path:
    """The demo service's own SQLite event store: its feedback event stays out of the store `llmrec serve` answers
    from (`$LLMREC_HOME/store/<dataset>.db`), and each run starts from the prepared data, not from earlier runs'
    feedback."""
    return home / "demo" / f"store_{dataset}.db"


def service_stage(dataset: str, user_id: str, adapter: str | None, env: dict[str, str] | None = None,
                  store: Path | None = None) -> None:
    """Start the service, ask for `user_id`'s recommendations, post a 1/5 rating of the top item, ask again. DemoError
    when the service does not start or answer, answers without the LLM (degraded), or still recommends the item the
    user just rated 1/5. With `store`, the service uses that SQLite file, emptied first (the service's default store
    otherwise)."""
    import httpx

    from llmrec.service.client import (
        ServiceClientError,
        _error_message,
        fetch_recommendations,
        format_recommendations,
        wait_until_up,
    )

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
    if store is not None:
        for f in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
            f.unlink(missing_ok=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        cmd.append(f"store_url=sqlite:///{store}")
    if adapter:  # JSON is YAML: a folder name with ': ' or '#' stays one string
        cmd += [f"llm.adapters={json.dumps({'demo': adapter})}", "llm.default_adapter=demo"]
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    key = (env or os.environ).get("LLMREC_SERVE_API_KEY")  # the key the service was started with, if any
    try:
        try:
            wait_until_up(f"{url}/ready", proc, 900, interval_s=2, name="the service")
        except (RuntimeError, TimeoutError) as e:
            raise DemoError(str(e)) from None
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            print(f"service ready at {url}: {health}")
            r1 = fetch_recommendations(url, user_id, k=5, explain=True, api_key=key, timeout=600)
            print(f"\n--- GET /v1/users/{user_id}/recommendations?k=5&explain=true")
            print(format_recommendations(r1))
            _check_answer(r1)
            top = r1["items"][0]
            event = {
                "user_id": user_id,
                "item_id": top["item_id"],
                "type": "rating",
                "value": 1.0,
                "timestamp": int(time.time()),
            }
            headers = {"Idempotency-Key": f"demo-{time.time()}", **({"Authorization": f"Bearer {key}"} if key else {})}
            ack = httpx.post(f"{url}/v1/events", json=event, headers=headers, timeout=30)
            print(f"\n--- POST /v1/events (user {user_id} rates '{top['title']}' 1/5) -> {ack.status_code}")
            if ack.status_code not in (200, 201):
                raise DemoError(f"POST /v1/events: {_error_message(ack)}")
            r2 = fetch_recommendations(url, user_id, k=5, explain=True, api_key=key, timeout=600)
        except (ServiceClientError, httpx.HTTPError, ValueError) as e:  # ValueError: a body that is not JSON
            raise DemoError(f"the service at {url}: {e}") from None
        print("\n--- the same request after the feedback event")
        print(format_recommendations(r2))
        _check_answer(r2)
        before, after = [i["item_id"] for i in r1["items"]], [i["item_id"] for i in r2["items"]]
        print(
            f"\nchanged: {before != after}; '{top['title']}' now "
            f"{'absent' if top['item_id'] not in after else 'present'}"
        )
        if top["item_id"] in after:
            raise DemoError(f"'{top['title']}' ({top['item_id']}) is still recommended after the feedback event that "
                            f"rated it 1/5: the event did not reach the user's history")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a service that exited by itself has no group left
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print("service stopped", flush=True)


def _check_answer(rec: dict) -> None:
    if not rec.get("items"):
        raise DemoError("the service answered with no items")
    if rec.get("degraded"):
        raise DemoError("the service answered degraded (the LLM did not answer: collaborative fallback); its log "
                        "above says why (llm.timeout_s, the backend's start)")


def run_demo(dataset: str = "ml-100k", user_id: str = "1", fast: bool = False) -> int:
    """The demo; 0 when every stage did what it shows, else 1 with `llmrec demo: error: ...` on stderr."""
    stage = ["", ""]

    def at(n: int, text: str) -> None:
        stage[:] = [str(n), text]
        _stage(n, text)

    try:
        _demo(dataset, user_id, fast, at)
    except DemoError as e:
        print(f"llmrec demo: error: stage {stage[0]}/4 ({stage[1]}) failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _demo(dataset: str, user_id: str, fast: bool, at) -> None:
    from llmrec.cli.data import format_stats
    from llmrec.data import dataset_dir, load_prepared, prepare

    t0 = time.time()
    # the steps run in the checkout: a relative $LLMREC_HOME (default ./artifacts) is the one here, made absolute
    home = llmrec_home().resolve()
    env = {**os.environ, "LLMREC_HOME": str(home)}
    at(1, "data")
    for name in dict.fromkeys([dataset, "ml-1m"]):
        if (dataset_dir(name, home) / "manifest.json").is_file():
            print(format_stats(name, load_prepared(name, home=home).manifest["stats"]) + "\n(reused)")
        else:
            rep = prepare(name, home=home)
            print(format_stats(name, rep.stats, rep.seconds))
    if not load_prepared(dataset, home=home).has_user(user_id):  # the service stage asks for this user
        raise DemoError(f"--user-id {user_id!r}: no such user in {dataset}")
    budget = FAST_BUDGET if fast else DEMO_BUDGET
    at(2, f"fine-tune the embedded SmolLM2-135M (QLoRA, {budget['steps']} steps per task)")
    adapters = finetune_stage(dataset, budget, home, env)
    at(3, "benchmark every method on the same split")
    out_dir = home / "demo"
    sets = [
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
        sets.extend(["baselines=[pop,mf,bpr]", "retriever=hybrid"])  # no SASRec to fit: item-CF candidates
    done = out_dir / f"bench_{dataset}.md"
    reuse, why_not = bench_reuse(out_dir, dataset, sets, adapters)
    if reuse:
        print(done.read_text() + f"\n(reused {done}: same settings, newer than the adapters; delete it to re-run "
                                 "the benchmark)")
    else:
        if why_not:
            print(f"{why_not}: running the benchmark again")
        _run([sys.executable, "-m", "llmrec.cli", "bench", "--dataset", dataset, "--set", *sets], env)
        if not done.is_file():
            raise DemoError(f"the benchmark ended without writing {done}")
    print(f"(the demo's bench files are in {out_dir}; `make bench` writes eval/results/ with the full recipes)")
    at(4, "serve, query a user, post feedback, query again")
    service_stage(dataset, user_id, adapters["rank"], env, store=demo_store(home, dataset))
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")

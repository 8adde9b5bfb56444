"""`llmrec bench` (every method on one split) and `llmrec demo` (the first-hour walk-through)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="every method on the same split -> eval/results/bench_<dataset>.{json,md}, "
                                     "bench_<dataset>_{metrics,roc,latency}.png and ranking_<dataset>.{json,md}")
    p.add_argument("--dataset", help="prepared dataset name (default: the --config file's dataset, else ml-100k)")
    p.add_argument("--config", help="YAML file with BenchConfig keys (llmrec/bench.py documents each)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override BenchConfig keys (repeatable)")
    p.add_argument("--train", action="store_true",
                   help="first train the shipped recipes finetune/recipes/<task>_smollm2_qlora.yaml of the adapters "
                        "the config does not name (yesno, rank, next_title) into "
                        "$LLMREC_HOME/finetune/bench_<task>_<dataset>, reused when trained there with the same "
                        "recipe; then benchmark with them: the bench's tuned rows from one command (about 45 min of "
                        "training on 2 cores)")
    p.set_defaults(func=cmd_bench)
    d = sub.add_parser("demo", help="set up data, train, fine-tune briefly, benchmark, serve, query, feedback")
    d.add_argument("--dataset", default="ml-100k",
                   help="dataset the demo prepares, fine-tunes on, benchmarks and serves (default %(default)s)")
    d.add_argument("--user-id", default="1",
                   help="the user whose recommendations the service stage asks for (default %(default)s)")
    d.add_argument("--fast", action="store_true", help="tiny step budgets (a smoke run of every stage)")
    d.set_defaults(func=cmd_demo)


def cmd_bench(args: argparse.Namespace) -> int:
    from llmrec.bench import BenchConfig, run_bench
    from llmrec.bench_utils import command_line
    from llmrec.cli.args import UsageError
    from llmrec.config import load_config

    overrides = list(args.set)
    if args.dataset is not None:  # only when given: a default here would override the --config file's dataset
        given = [p.split("=", 1)[1].strip() for p in overrides if "=" in p and p.split("=", 1)[0].strip() == "dataset"]
        other = given[-1] if given else args.dataset  # as typed: YAML reads `--set dataset=0123` as 83
        if other != args.dataset:
            raise UsageError(f"--dataset {args.dataset} and --set dataset={other} name different datasets; give one")
        overrides.insert(0, f"dataset={args.dataset}")
    cfg = load_config(BenchConfig, args.config, overrides)
    if args.train:
        from llmrec.finetune.runs import RecipeRunError

        try:
            cfg = train_bench_adapters(cfg)
        except RecipeRunError as e:  # the failed step's own output is above: one line saying which
            print(f"llmrec bench: error: {e}", file=sys.stderr)
            return 1
    path = run_bench(cfg, command=command_line())
    print(path.with_suffix(".md").read_text())
    return 0


def train_bench_adapters(cfg):  # noqa: ANN001, ANN201 - BenchConfig in, BenchConfig out (imported lazily)
    """`cfg` with adapter_yesno / adapter_rank / adapter_title (those it does not name and its LLM rows use) set to
    adapters trained with the shipped recipes in `$LLMREC_HOME/finetune/bench_<task>_<dataset>`: trained now unless
    an earlier run trained that folder with the same recipe. The recipes' own test passes are off (the bench scores
    zero-shot and tuned on its own subsets)."""
    import dataclasses
    import os

    from llmrec.config import llmrec_home
    from llmrec.finetune.runs import train_recipes

    keys = {"yesno": "adapter_yesno", "rank": "adapter_rank", "next_title": "adapter_title"}
    used = {"yesno": True, "rank": "verbalizer" in cfg.rank_modes, "next_title": "likelihood" in cfg.rank_modes}
    tasks = tuple(t for t in keys if cfg.llm and used[t] and not getattr(cfg, keys[t]))
    if not tasks:
        return cfg
    home = llmrec_home().resolve()  # the steps run in the checkout: a relative $LLMREC_HOME is made absolute
    env = {**os.environ, "LLMREC_HOME": str(home)}
    got = train_recipes(cfg.dataset, lambda task: home / "finetune" / f"bench_{task}_{cfg.dataset}",
                        ["eval_before=false", "eval_after=false"], env, tasks=tasks)
    return dataclasses.replace(cfg, **{keys[t]: a for t, a in got.items()})


def cmd_demo(args: argparse.Namespace) -> int:
    from llmrec.demo import run_demo

    return run_demo(args.dataset, args.user_id, fast=args.fast)

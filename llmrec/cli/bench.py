"""`llmrec bench` (every method on one split) and `llmrec demo` (the first-hour walk-through)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="every method on the same split -> eval/results/bench_<dataset>.{json,md}, "
                                     "bench_<dataset>_{metrics,roc,latency}.png and ranking_<dataset>.{json,md}")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--config", help="YAML file with BenchConfig keys (llmrec/bench.py documents each)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BenchConfig keys")
    p.set_defaults(func=cmd_bench)
    d = sub.add_parser("demo", help="set up data, train, fine-tune briefly, benchmark, serve, query, feedback")
    d.add_argument("--dataset", default="ml-100k")
    d.add_argument("--user-id", default="1")
    d.add_argument("--fast", action="store_true", help="tiny step budgets (a smoke run of every stage)")
    d.set_defaults(func=cmd_demo)


def cmd_bench(args: argparse.Namespace) -> int:
    from llmrec.bench import BenchConfig, run_bench
    from llmrec.bench_utils import command_line
    from llmrec.config import load_config

    cfg = load_config(BenchConfig, args.config, [f"dataset={args.dataset}", *args.set])
    path = run_bench(cfg, command=command_line())
    print(path.with_suffix(".md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmrec.demo import run_demo

    return run_demo(args.dataset, args.user_id, fast=args.fast)

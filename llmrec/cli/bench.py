"""`llmrec bench` (every method on one split) and `llmrec demo` (the first-hour walk-through)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="every method on the same split -> eval/results/bench_<dataset>.{json,md}, "
                                     "bench_<dataset>_{metrics,roc,latency}.png and ranking_<dataset>.{json,md}")
    p.add_argument("--dataset", help="prepared dataset name (default: the --config file's dataset, else ml-100k)")
    p.add_argument("--config", help="YAML file with BenchConfig keys (llmrec/bench.py documents each)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BenchConfig keys")
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
    from llmrec.config import load_config, parse_overrides

    overrides = list(args.set)
    if args.dataset is not None:  # only when given: a default here would override the --config file's dataset
        other = parse_overrides(overrides).get("dataset", args.dataset)
        if str(other) != args.dataset:
            raise UsageError(f"--dataset {args.dataset} and --set dataset={other} name different datasets; give one")
        overrides.insert(0, f"dataset={args.dataset}")
    cfg = load_config(BenchConfig, args.config, overrides)
    path = run_bench(cfg, command=command_line())
    print(path.with_suffix(".md").read_text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmrec.demo import run_demo

    return run_demo(args.dataset, args.user_id, fast=args.fast)

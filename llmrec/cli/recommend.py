"""`llmrec recommend` (in-process or against a running service) and `llmrec eval yesno|rank|contamination`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmrec.cli.args import UsageError, count, nonneg_float, positive_int

# = llmrec.ranking.factory.RETRIEVERS / DEFAULT_* (kept literal so the CLI starts without pandas; a test checks they
# agree, and with the service's defaults)
RETRIEVER_CHOICES = ["text", "hybrid", "hybrid:itemcf", "hybrid:sasrec", "hybrid:bert_lstm", "itemcf", "sasrec",
                     "bert_lstm", "ensemble"]
DEFAULT_RETRIEVER = "hybrid"
DEFAULT_RETRIEVAL_WEIGHT = 4.0



# `llmrec eval yesno` flags that only apply to --dataset rows (with --file, every row of the file is scored)
FILE_IGNORES = ("split", "max_examples", "valid_examples", "seed", "template")
# `llmrec eval yesno` flags of the shared model arguments that only shape next-item ranking: a Yes/No row's prompt
# holds the history and the target, no retrieved candidates
RANK_ONLY = ("mode", "retriever", "retrieval_weight", "listings")
# `llmrec recommend` flags that only shape in-process ranking (--url asks a service that has its own config)
IN_PROCESS_ONLY = ("dataset", "backend", "model", "vllm_url", "dtype", "load_in_4bit", "merge_adapter", "retriever",
                   "mode", "retrieval_weight", "listings", "batch_size", "template")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="transformers (in-process, the default) or vllm (--vllm-url, else an in-process engine)")
    p.add_argument("--model", help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT save_pretrained); `recommend --url`: the name of an "
                                      "adapter in the service's registry (llm.adapters), never a path")
    p.add_argument("--vllm-url", help="OpenAI-compatible endpoint for --backend vllm (else an in-process engine)")
    p.add_argument("--dtype", default="fast", choices=["fast", "bfloat16", "float32"],
                   help="fast (default): bfloat16 where the hardware computes it natively (GPU, AVX512-BF16/AMX "
                        "CPU), else float32")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="transformers backend: nf4 4-bit base (the base a QLoRA adapter was trained on; less memory)")
    p.add_argument("--no-merge-adapter", dest="merge_adapter", action="store_false",
                   help="transformers backend: keep --adapter as separate LoRA layers (default: merged into a "
                        "full-precision base at load, faster; a 4-bit base always keeps it separate)")
    p.add_argument("--retriever", default=DEFAULT_RETRIEVER, choices=RETRIEVER_CHOICES,
                   help="candidate retriever: text, hybrid (text + item-CF, fitted in seconds; the default, as in "
                        "the service), hybrid:sasrec (text + SASRec: `llmrec baselines train --model sasrec` first, "
                        "else it is fitted now; hybrid:bert_lstm likewise), itemcf (item-CF alone, no "
                        "sentence-transformer), sasrec / bert_lstm (that baseline's ranking alone), ensemble "
                        "(BERT+LSTM and SASRec fused by RRF: the best full ranking of ML-100K)")
    p.add_argument("--mode", default="verbalizer", choices=["verbalizer", "likelihood", "generate"],
                   help="verbalizer: candidate letters' log-probs, one forward pass (default); likelihood: each "
                        "candidate title's mean log-prob as the answer to the next_title prompt (an adapter tuned "
                        "with finetune/recipes/next_title_smollm2_qlora.yaml); generate: the model writes titles")
    p.add_argument("--retrieval-weight", type=nonneg_float, default=DEFAULT_RETRIEVAL_WEIGHT,
                   help="verbalizer / likelihood: rank by LLM score + W x log(1/retrieval rank); 0 = the LLM's order "
                        "alone (default %(default)s, as in the service)")
    p.add_argument("--listings", type=positive_int, default=1,
                   help="verbalizer: list the candidates N times in cyclically shifted orders and average each one's "
                        "letter log-probs, cancelling the model's letter / position preference (N forward passes "
                        "per user; default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass (default %(default)s)")
    p.add_argument("--template", action="append", default=[], type=_task_template, metavar="TASK=NAME",
                   help="prompt template per task, e.g. yesno=yesno_stats (default: the adapter's own, else the "
                        "task's name); repeatable")


def _task_template(text: str) -> tuple[str, str]:
    task, sep, name = text.partition("=")
    from llmrec.prompts.templates import TASKS

    if not sep or task not in TASKS or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=NAME with TASK one of {', '.join(TASKS)} "
                                         "(e.g. yesno=yesno_stats)")
    return task, name


def _flags(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> dict[str, tuple[str, object]]:
    """{dest: (its first option string, its default)} of `parser`'s arguments named in `dests`."""
    return {a.dest: (a.option_strings[0], a.default) for a in parser._actions if a.dest in dests}


def _set_flags(args: argparse.Namespace, flags: dict[str, tuple[str, object]]) -> list[str]:
    """The option strings of `flags` (from `_flags`) the command line set to something other than their default."""
    return [flag for dest, (flag, default) in flags.items() if getattr(args, dest, default) != default]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="ranked items and an explanation for one user")
    p.add_argument("--dataset", default="ml-100k",
                   help="prepared dataset name or folder: its users, catalogue and histories (default %(default)s)")
    p.add_argument("--user-id", "--user", dest="user_id", required=True,
                   help="the user to recommend for (an id of --dataset, or of the service's event store with --url)")
    p.add_argument("--k", type=positive_int, default=10, help="items to return (default %(default)s)")
    p.add_argument("--explain", action="store_true",
                   help="add an explanation of the top item, citing the history items it is grounded in")
    p.add_argument("--url", help="ask a running llmrec service instead of ranking in-process (then only --user-id, "
                                  "--k, --explain, --adapter and --json apply; bearer key: $LLMREC_SERVE_API_KEY)")
    p.add_argument("--json", action="store_true",
                   help="print the answer as JSON (the service's response shape; in-process without its cached and "
                        "history_version fields) instead of a table")
    _add_model_args(p)
    # with --url the service ranks with its own config: these in-process flags would be silently ignored
    p.set_defaults(func=cmd_recommend, url_ignores=_flags(p, IN_PROCESS_ONLY))

    e = sub.add_parser("eval", help="evaluate the LLM recommender (yes/no, rank, contamination)")
    s = e.add_subparsers(dest="eval_command", metavar="TASK")
    y = s.add_parser("yesno", help="AUC/accuracy/F1 of P(Yes) on a prepared split or a TALLRec JSON file")
    src = y.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset: score its time-split Yes/No rows")
    src.add_argument("--file", help="TALLRec-format JSON: [{instruction, input, output}]")
    y.add_argument("--split", default="test", choices=["train", "valid", "test"],
                   help="--dataset: the Yes/No split to score (default %(default)s)")
    y.add_argument("--max-examples", type=count, default=500, help="fixed seeded subset (0 = all)")
    y.add_argument("--valid-examples", type=count, default=200,
                   help="--dataset with --split test: also score this many seeded validation rows and report "
                        "accuracy/F1 at the threshold of best validation accuracy (P(Yes) of a tuned model is not "
                        "calibrated, so 0.5 can say No to every row); 0 = at 0.5 only (default %(default)s)")
    y.add_argument("--seed", type=int, default=0, help="seed of the row subsets (default %(default)s)")
    y.add_argument("--out", help="write the metrics as JSON here")
    _add_model_args(y)
    # with --file the rows are the file's, in its own TALLRec prompt: these flags would be silently ignored
    y.set_defaults(func=cmd_eval_yesno, file_ignores=_flags(y, FILE_IGNORES), rank_only=_flags(y, RANK_ONLY))
    r = s.add_parser("rank", help="full-ranking metrics of retrieve + LLM rerank on the leave-one-out test split")
    r.add_argument("--dataset", required=True, help="prepared dataset name or folder")
    r.add_argument("--max-users", type=count, default=200, help="fixed seeded subset of users (0 = all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the user subset (default %(default)s)")
    r.add_argument("--out", help="write the metrics as JSON here")
    _add_model_args(r)
    r.set_defaults(func=cmd_eval_rank)
    c = s.add_parser("contamination", help="does the base LLM complete catalogue titles from memory?")
    c.add_argument("--dataset", required=True, help="prepared dataset whose catalogue titles are probed")
    c.add_argument("--n", type=positive_int, default=100,
                   help="seeded catalogue items probed (and as many shuffled controls; default %(default)s)")
    c.add_argument("--out", help="write the metrics as JSON here")
    _add_model_args(c)
    c.set_defaults(func=cmd_eval_contamination)


def _check_model_args(args: argparse.Namespace) -> None:
    """Model flags that cannot go together: a usage error before any data or model is read."""
    if args.backend == "vllm" and args.load_in_4bit:
        raise UsageError("--load-in-4bit is for --backend transformers (vLLM quantizes with its own options)")


def _backend(args: argparse.Namespace):
    from llmrec.llm import load_backend

    kw: dict = {"dtype": args.dtype, "batch_size": args.batch_size, "load_in_4bit": args.load_in_4bit,
                "merge_adapter": getattr(args, "merge_adapter", True)}
    if args.backend == "vllm":
        kw = {"url": args.vllm_url, "dtype": args.dtype} if args.vllm_url else {"dtype": args.dtype}
    return load_backend(args.backend, model=args.model, adapter=args.adapter, **kw)


def _recommender(args: argparse.Namespace, dataset: str, user_id: str | None = None, ds=None):  # noqa: ANN001
    """The Recommender the flags describe (over `ds` when given, else the prepared `dataset`); with `user_id`, an
    unknown user fails before any model is loaded."""
    from llmrec.data import load_prepared
    from llmrec.ranking import RankingConfig
    from llmrec.ranking.factory import build_recommender

    ds = ds if ds is not None else load_prepared(dataset, prepare_if_missing=True)
    if user_id is not None and not ds.has_user(user_id):
        raise KeyError(f"unknown user {user_id!r} in dataset {ds.name}")
    cfg = RankingConfig(mode=args.mode, batch_size=args.batch_size,
                        retrieval_weight=args.retrieval_weight, listings=args.listings, templates=dict(args.template))
    return build_recommender(ds, _backend(args), adapter=args.adapter, retriever=args.retriever, cfg=cfg)


def _write(out: str | None, data: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        from llmrec.bench_utils import write_json

        write_json(Path(out), {k: v for k, v in data.items() if not k.startswith("_")})  # a one-class AUC: null


def cmd_recommend(args: argparse.Namespace) -> int:
    from llmrec.service.client import ServiceClientError, fetch_recommendations, format_recommendations

    if args.url:
        ignored = _set_flags(args, getattr(args, "url_ignores", {}))
        if ignored:
            print(f"llmrec: error: {', '.join(ignored)}: not used with --url (the service ranks with its own config: "
                  "serve/config.yaml, `llmrec serve --set ...`); drop them or rank in-process without --url",
                  file=sys.stderr)
            return 2
        try:
            rec_json = fetch_recommendations(args.url, args.user_id, args.k, args.explain, args.adapter)
        except ServiceClientError as e:
            print(f"llmrec: error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(rec_json, indent=2) if args.json else format_recommendations(rec_json))
        return 0
    _check_model_args(args)
    rec = _recommender(args, args.dataset, user_id=args.user_id)
    r = rec.recommend(args.user_id, k=args.k, explain=args.explain)
    payload = {
        "user_id": r.user_id,
        "items": [vars(i) for i in r.items],
        "explanation": r.explanation,
        "explanation_fallback": r.explanation_fallback,
        "explanation_fallback_reasons": r.explanation_fallback_reasons,
        "explanation_evidence": r.evidence,
        "model": r.model,
        "adapter": r.adapter,
        "backend": r.backend,
        "degraded": False,
        "latency_ms": 1000 * r.stats.get("seconds_per_user", 0.0),
    }
    print(json.dumps(payload, indent=2) if args.json else format_recommendations(payload))
    return 0


def _print_metrics(title: str, m: dict, keys: list[str]) -> None:
    print(title)
    w = max([18] + [len(k) for k in keys if k in m])  # contamination's keys are longer than 18
    for k in keys:
        if k in m:
            v = m[k]
            print(f"  {k:<{w}} {v:.4f}" if isinstance(v, float) else f"  {k:<{w}} {v}")


def cmd_eval_yesno(args: argparse.Namespace) -> int:
    from llmrec.ranking.evaluate import eval_yesno_dataset, eval_yesno_tallrec, load_tallrec

    _check_model_args(args)
    unused = _set_flags(args, getattr(args, "rank_only", {}))
    if unused:
        raise UsageError(f"{', '.join(unused)}: not used by eval yesno (they shape next-item ranking; a Yes/No prompt "
                         "holds the history and the target only); drop them, or use eval rank")
    if args.file:
        ignored = _set_flags(args, getattr(args, "file_ignores", {}))
        if ignored:
            raise UsageError(f"{', '.join(ignored)}: not used with --file (every row of the file is scored with its "
                             "own TALLRec prompt); drop them, or score a prepared dataset with --dataset")
        data = load_tallrec(args.file)  # a malformed file fails here, before the model is loaded
        backend = _backend(args)
        m = eval_yesno_tallrec(backend, args.file, args.batch_size, data=data)
        title = f"yes/no on {args.file}"
    else:
        from llmrec.data import load_prepared

        ds = load_prepared(args.dataset, prepare_if_missing=True)
        if not (ds.yesno["split"] == args.split).any():  # before the model loads: no row would give AUC nan, exit 0
            raise ValueError(f"dataset {ds.name} has no Yes/No rows in split {args.split!r}")
        rec = _recommender(args, args.dataset, ds=ds)
        backend = rec.backend
        m = eval_yesno_dataset(rec, rec.ds, args.split, args.max_examples or None, args.seed,
                               valid_examples=args.valid_examples)
        m["template"] = f"{rec.templates['yesno'].name} v{rec.templates['yesno'].version}"
        title = f"yes/no on {args.dataset}/{args.split} (subset of {m['n']}, seed {args.seed}, {m['template']})"
    m["adapter"] = args.adapter
    m["backend"] = getattr(backend, "name", args.backend)  # e.g. transformers:<model>:4bit+<adapter>
    _print_metrics(
        title + (f" with adapter {args.adapter}" if args.adapter else " (no adapter)"),
        m,
        ["n", "auc", "accuracy", "f1", "precision", "recall", "threshold_valid", "valid_n", "accuracy@t_valid",
         "f1@t_valid", "precision@t_valid", "recall@t_valid", "seconds"],
    )
    if "threshold_valid" not in m and len({p >= 0.5 for p in m.get("_probs", [])}) == 1:
        print("  note: every P(Yes) is on one side of 0.5, so accuracy/F1 at 0.5 say little; AUC ranks the rows"
              + (" (--valid-examples N picks a threshold on validation rows)" if args.dataset else ""))
    _write(args.out, m)
    return 0


def cmd_eval_rank(args: argparse.Namespace) -> int:
    from llmrec.ranking.evaluate import eval_rank

    _check_model_args(args)
    rec = _recommender(args, args.dataset)
    m = eval_rank(rec, rec.ds, args.max_users or None, args.seed, args.mode)
    m.update(retriever=args.retriever, n_candidates=rec.cfg.n_candidates, mode=args.mode,
             retrieval_weight=rec.cfg.retrieval_weight, listings=rec.cfg.listings, adapter=args.adapter,
             backend=getattr(rec.backend, "name", args.backend))
    listed = f", {rec.cfg.listings} listings" if args.mode == "verbalizer" and rec.cfg.listings > 1 else ""
    _print_metrics(
        f"full ranking on {args.dataset} (retrieve {rec.cfg.n_candidates} with {args.retriever} + {args.mode} rerank, "
        f"retrieval weight {rec.cfg.retrieval_weight:g}{listed}; {m['backend']})",
        m,
        ["n_users", "hr@10", "recall@10", "ndcg@10", "ndcg@20", "mrr@10", "seconds_per_user"],
    )
    _write(args.out, m)
    return 0


def cmd_eval_contamination(args: argparse.Namespace) -> int:
    from llmrec.data import load_prepared
    from llmrec.ranking.evaluate import contamination_probe

    _check_model_args(args)
    m = contamination_probe(_backend(args), load_prepared(args.dataset, prepare_if_missing=True), args.n)
    _print_metrics(f"contamination probe on {args.dataset}", m, list(m))
    _write(args.out, m)
    return 0

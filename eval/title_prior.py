"""Does the title-likelihood rerank gain from subtracting each title's history-free log-prob?
-> eval/results/title_prior_<dataset>.{json,md}

    python eval/title_prior.py --adapter artifacts/finetune/bench_next_title_ml-100k/adapter [--users 200]

The bench's `likelihood` mode scores each candidate by its title's mean log-prob per token as the answer to the
user's `next_title` prompt, c. A model also finds some titles likely after *any* history (short, common words,
popular films); p is the same log-prob after the prompt with no history ("(none)"). Score =
c - a p + w log(1 / retrieval rank) (`RankingConfig.likelihood_prior_weight` a, `retrieval_weight` w; a = 1 is
the pointwise mutual information of title and history, Holtzman et al. 2021). For the base model (zero-shot) and
the adapter, a and w are chosen together on the bench's validation users (ties: the smaller a, then w), and the
test rows (the bench's seeded test users, full ranking, a test item the retriever missed counts 0) give
- a = 0, w chosen on valid: the bench's own likelihood row;
- a and w chosen on valid; and each one's LLM order alone (w = 0);
with paired-bootstrap NDCG@10 ratios against the a = 0 row and against the retrieval order (the candidates'
retriever, BERT+LSTM by default: the best baseline of the bench). Every prompt is scored once (`llm_cache`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from functools import partial

import numpy as np

from llmrec.bench_utils import command_line, count_or_all, md_table, positive_int, write_result
from llmrec.cli.args import nonneg_float
from llmrec.data import load_prepared
from llmrec.evaluation import ranking_targets
from llmrec.llm import load_backend
from llmrec.metrics import ndcg_at_k, paired_bootstrap_ratio
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.evaluate import eval_rank
from llmrec.ranking.factory import RETRIEVERS, build_retriever, with_adapter_templates

log = logging.getLogger("title_prior")
KEYS = ("ndcg@10", "hr@10", "mrr@10", "n_users")


def choose(valid: dict[tuple[float, float], float]) -> tuple[float, float]:
    """The (a, w) of best validation NDCG@10; ties: the smaller a, then the smaller w."""
    return max(valid, key=lambda aw: (valid[aw], -aw[0], -aw[1]))


def rerank(rec: Recommender, ds, users: int, seed: int, a: float, w: float, split: str) -> dict:
    """eval_rank in likelihood mode at prior weight `a` and fusion weight `w` (scores come from `rec.llm_cache`)."""
    rec.cfg.likelihood_prior_weight, rec.cfg.retrieval_weight = a, w
    return eval_rank(rec, ds, users, seed, mode="likelihood", split=split, return_ranks=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--adapter", default=None, help="a next_title adapter (its rows follow the base model's)")
    ap.add_argument("--users", type=count_or_all, default=200, help="test users (0: all)")
    ap.add_argument("--valid-users", type=count_or_all, default=None,
                    help="users for the choices (0: all; default: --users)")
    ap.add_argument("--models", nargs="+", choices=["zero-shot", "tuned"], default=["zero-shot", "tuned"])
    ap.add_argument("--name", default=None, help="result name (default: title_prior_<dataset>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retriever", default="bert_lstm", choices=RETRIEVERS)
    ap.add_argument("--candidates", type=positive_int, default=20)
    ap.add_argument("--prior-grid", type=nonneg_float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--grid", type=nonneg_float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
                    help="w (the bench's)")
    ap.add_argument("--dtype", default="fast")
    args = ap.parse_args()
    if "tuned" in args.models and not args.adapter:  # its rows would be left out without a word
        ap.error("--models tuned needs --adapter (a next_title adapter); without one use --models zero-shot")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    retriever = build_retriever(ds, args.retriever)
    base_cfg = RankingConfig(n_candidates=args.candidates, mode="likelihood")
    users = args.users or None
    n_valid = users if args.valid_users is None else (args.valid_users or None)
    r = eval_rank(Recommender(ds, None, retriever, base_cfg), ds, users, args.seed, retrieval_only=True,
                  return_ranks=True)
    retrieval_ranks = np.asarray(r.pop("ranks"))
    rows = [{"model": "-", "method": f"retrieval alone ({args.retriever})", **{k: r[k] for k in KEYS}}]
    selection: dict[str, dict] = {}
    models = [("zero-shot", None), *([("tuned", args.adapter)] if args.adapter else [])]
    for label, adapter in [(m, a) for m, a in models if m in args.models]:
        backend = load_backend("transformers", adapter=adapter, dtype=args.dtype)
        rec = Recommender(ds, backend, retriever, with_adapter_templates(replace(base_cfg), adapter))
        rec.llm_cache = {}
        run = partial(rerank, rec, ds, users, args.seed)
        valid = {(a, w): rerank(rec, ds, n_valid, args.seed, a, w, "valid")["ndcg@10"]
                 for a in sorted({0.0, *args.prior_grid}) for w in args.grid}  # a = 0 always: the reference row
        plain_w = choose({k: v for k, v in valid.items() if k[0] == 0.0})[1]
        best = choose(valid)
        selection[label] = {"chosen": best, "plain_w": plain_w,
                            "valid_ndcg@10": {f"a={a} w={w}": v for (a, w), v in valid.items()}}
        plain = run(0.0, plain_w, "test")
        plain_ranks = np.asarray(plain["ranks"])
        cases = [("a = 0 (the bench's likelihood mode)", (0.0, plain_w)), ("a = 0, LLM order alone", (0.0, 0.0))]
        if best[0] != 0.0:  # else the same two rows again
            cases += [("a chosen on valid", best), ("a chosen on valid, LLM order alone", (best[0], 0.0))]
        for name, (a, w) in cases:
            t = run(a, w, "test")
            ranks = np.asarray(t.pop("ranks"))
            ndcg = lambda rk: ndcg_at_k(rk, 10)  # noqa: E731
            vs_plain = paired_bootstrap_ratio(ndcg, ranks, plain_ranks, seed=args.seed)
            vs_ret = paired_bootstrap_ratio(ndcg, ranks, retrieval_ranks, seed=args.seed)
            rows.append({"model": label, "method": name, "a": a, "w": w, **{k: t[k] for k in KEYS},
                         "valid_ndcg@10": valid.get((a, w)),
                         "vs_a0": f"{vs_plain['ratio']:.3f} ({vs_plain['lo']:.2f}-{vs_plain['hi']:.2f})",
                         "vs_retrieval": f"{vs_ret['ratio']:.3f} ({vs_ret['lo']:.2f}-{vs_ret['hi']:.2f})"})
            log.info("%s %s: %s", label, name, rows[-1])
    cols = ["model", "method", "a", "w", "ndcg@10", "hr@10", "mrr@10", "valid_ndcg@10", "vs_a0", "vs_retrieval",
            "n_users"]
    md = md_table(rows, cols) + (
        f"\n{r['n_users']} test users (seed {args.seed}, the bench's), {args.candidates} candidates from "
        f"`{args.retriever}`; score = c - a p + w log(1 / retrieval rank), c / p: the title's mean log-prob per token "
        f"after the user's `next_title` prompt / after the same prompt with no history; (a, w) chosen together on "
        f"{n_valid or 'all'} validation users over a in {args.prior_grid}, w in {args.grid}. vs_a0 / vs_retrieval: "
        f"NDCG@10 ratio to the a = 0 row / to the retrieval order, 95% paired-bootstrap interval over the same users. "
        f"Adapter: {args.adapter}.\n")
    write_result(args.name or f"title_prior_{args.dataset}",
                 {"dataset": args.dataset, "rows": rows, "selection": selection,
                  **{f"{split}_user_ids": ranking_targets(ds, split, n, args.seed)["user_id"].astype(str).tolist()
                     for split, n in (("test", users), ("valid", n_valid))},
                  "args": vars(args)}, md,
                 command=command_line())


if __name__ == "__main__":
    main()

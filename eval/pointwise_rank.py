"""Can the Yes/No adapter rank? TALLRec-style pointwise reranking -> eval/results/pointwise_rank_<dataset>.

    python eval/pointwise_rank.py --adapter artifacts/finetune/bench_yesno_ml-100k/adapter [--users 200]

The bench's seeded test users and retrieved candidates (`--retriever`, 20 per user): every candidate gets the Yes/No
question with the user's history ("will the user enjoy X?", the adapter's own template) and is scored by P(Yes):
20 prompts per user where the verbalizer needs one. Rows, all full ranking over the catalogue minus the history (a
test item the retriever missed counts 0, as in the bench):
- retrieval alone: the candidates in the retriever's order;
- P(Yes) alone: the candidates ordered by P(Yes);
- P(Yes) + retrieval: logit P(Yes) + w log(1 / retrieval rank), w chosen on the validation split (same number of
  users; ties: the smaller w), as the bench chooses the verbalizer's;
- the same two for the counts figure alone (no model; the `yesno_estimate` prompt's figure: the candidate's
  smoothed like rate among other users' ratings, since the user's own count is the same for every candidate).
Counts never see what the split hides: for the valid users only training events, for the test users training and
validation events, each strictly before the user's target time; so no test interaction of any user reaches a
prompt. The adapter's own training rows do: the Yes/No rows are split by a global time cut-off, not leave-one-out,
and the recipe's 768 seeded training rows (data.n_train 768, seed 0, as in yesno_ml-100k_1206b and the
bench_yesno_ml-100k run behind the recorded result) hold 14 (user, item) pairs that are leave-one-out test targets
and 8 that are validation targets, with their labels; 4 of the 14 are targets of the 200 test users scored here,
2 of the 8 of the 200 validation users that choose w.
The example's run folder is made by `python finetune/bench.py run --task yesno` (or pass another yesno run's
adapter, e.g. artifacts/finetune/yesno_ml-100k_1206b/adapter).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from llmrec.bench_utils import command_line, md_table, positive_int, write_result
from llmrec.cli.args import nonneg_float
from llmrec.data import load_prepared
from llmrec.data.stats import ItemFeedbackStats, counts_estimate
from llmrec.evaluation import ranking_targets
from llmrec.finetune.data import yesno_training_pairs
from llmrec.llm import load_backend
from llmrec.metrics import logit, ranking_metrics
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.factory import RETRIEVERS, build_retriever, with_adapter_templates
from llmrec.ranking.recommender import fuse_with_retrieval

log = logging.getLogger("pointwise_rank")

VISIBLE = {"valid": ("train",), "test": ("train", "valid")}  # the events a split's features may count


def target_ranks(cands: list[list[str]], targets: list[str], scores: list[np.ndarray], weight: float,
                 missing: int) -> np.ndarray:
    """1-based rank of each target once its user's candidates (retrieval order) are ordered by
    score + weight * log(1 / retrieval rank) (`weight` inf: the retrieval order); `missing` for a target the
    retriever did not list (every candidate ranks above it)."""
    out = []
    for ids, t, s in zip(cands, targets, scores):
        order = ids if np.isinf(weight) else [i for i, _ in fuse_with_retrieval(ids, s, weight)]
        out.append(order.index(t) + 1 if t in order else missing)
    return np.asarray(out, dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--adapter", required=True, help="the tuned Yes/No adapter (its template is read from it)")
    ap.add_argument("--users", type=positive_int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retriever", default="bert_lstm", choices=RETRIEVERS)
    ap.add_argument("--candidates", type=positive_int, default=20)
    ap.add_argument("--grid", type=nonneg_float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                    help="fusion weights w tried on validation (finite, >= 0)")
    ap.add_argument("--dtype", default="fast")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    backend = load_backend("transformers", adapter=args.adapter, dtype=args.dtype)
    cfg = with_adapter_templates(RankingConfig(n_candidates=args.candidates), args.adapter)
    rec = Recommender(ds, backend, build_retriever(ds, args.retriever), cfg)
    # the Yes/No rows are split by time, so the adapter may have trained on some users' next-item targets
    trained = yesno_training_pairs(ds, args.adapter)
    data: dict[str, dict] = {}
    for split in ("valid", "test"):
        tg = ranking_targets(ds, split, args.users, args.seed)
        seen = ds.interactions[ds.interactions["split"].isin(VISIBLE[split])]
        stats = ItemFeedbackStats(seen)
        hs = [rec.dataset_history(str(u), split) for u in tg["user_id"]]
        cands = [[i for i, _ in rec.candidates(h, exclude_seen_titles=False)] for h in hs]
        fb = [[stats.at(i, int(t)) for i in ids] for ids, t in zip(cands, tg["timestamp"])]
        t0 = time.perf_counter()
        flat = rec.yesno_probs([h for h, ids in zip(hs, cands) for _ in ids], [i for ids in cands for i in ids],
                               desc=f"P(Yes) {split}",
                               feedback=[f for fs in fb for f in fs] if rec.yesno_uses_stats else None)
        seconds = time.perf_counter() - t0
        cuts = np.cumsum([0] + [len(ids) for ids in cands])
        data[split] = {
            "cands": cands, "targets": tg["item_id"].astype(str).tolist(), "users": tg["user_id"].astype(str).tolist(),
            "s_per_user": seconds / max(1, len(tg)),
            "P(Yes)": [logit(flat[a:b]) for a, b in zip(cuts[:-1], cuts[1:])],
            "counts figure": [logit([counts_estimate(f.n, f.liked, 0, 0) for f in fs]) for fs in fb],
        }
        pairs = zip(tg["user_id"].astype(str), tg["item_id"].astype(str), strict=True)
        data[split]["targets_trained_on"] = None if trained is None else sum(p in trained for p in pairs)
        log.info("%s: %d users, %.2f s/user; targets among the adapter's Yes/No training rows: %s", split, len(tg),
                 data[split]["s_per_user"], data[split]["targets_trained_on"])

    def metrics(split: str, scorer: str, w: float) -> dict:
        d = data[split]
        m = ranking_metrics(target_ranks(d["cands"], d["targets"], d[scorer], w, ds.n_items + 1), ks=(10,))
        return {k: m[k] for k in ("ndcg@10", "hr@10", "mrr@10", "n_users")}

    test = data["test"]
    rows = [{"method": f"retrieval alone ({args.retriever})", **metrics("test", "P(Yes)", np.inf)}]
    selection = {}
    for scorer in ("P(Yes)", "counts figure"):
        valid = {w: metrics("valid", scorer, w)["ndcg@10"] for w in args.grid}
        best = max(valid, key=lambda w: (valid[w], -w))
        selection[scorer] = {"selected": best, "valid_ndcg@10": valid}
        s = test["s_per_user"] if scorer == "P(Yes)" else None
        rows.append({"method": f"{scorer} alone", "w": 0.0, **metrics("test", scorer, 0.0), "s_per_user": s})
        rows.append({"method": f"{scorer} + retrieval rank", "w": best, **metrics("test", scorer, best),
                     "valid_ndcg@10": valid[best], "s_per_user": s})
    cols = ["method", "w", "ndcg@10", "hr@10", "mrr@10", "valid_ndcg@10", "s_per_user", "n_users"]
    md = md_table(rows, cols) + (
        f"\n{len(test['targets'])} test users (seed {args.seed}, the bench's), {args.candidates} candidates from "
        f"`{args.retriever}`; P(Yes) from adapter {args.adapter} (template `{rec.templates['yesno'].name}`), "
        f"{args.candidates} Yes/No prompts per user; w: the fusion weight, chosen on "
        f"{len(data['valid']['targets'])} validation users "
        f"over {args.grid}. s_per_user: the P(Yes) pass on the test users. Test targets among the adapter's Yes/No "
        f"training rows (the Yes/No split is by time; `data.exclude_eval_targets` leaves them out): "
        f"{'unknown (no data_manifest.json beside the adapter)' if trained is None else test['targets_trained_on']}"
        f" of {len(test['targets'])}.\n")
    write_result(f"pointwise_rank_{args.dataset}", {"dataset": args.dataset, "rows": rows, "selection": selection,
                                                    "test_targets_trained_on": test["targets_trained_on"],
                                                    "test_user_ids": test["users"],
                                                    "valid_user_ids": data["valid"]["users"],
                                                    "args": vars(args)}, md,
                 command=command_line())


if __name__ == "__main__":
    main()

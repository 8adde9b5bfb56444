"""Does the tuned LLM add anything to an ensemble of the baselines? -> eval/results/rank_ensemble_<dataset>.{json,md}

    python eval/rank_ensemble.py --adapter artifacts/finetune/bench_next_title_ml-100k/adapter [--users 0]

The bench's title-likelihood rerank ties the list it reorders (BERT+LSTM's top 20). An ensemble asks the fairer
question: once the baselines' own opinions of the same 20 candidates are combined, is there anything left that the
LLM knows? Each user's candidates (the retriever's top `--candidates`, in its order) get the features
    r_m = log(1 / rank of the candidate among the candidates by model m)   for the retriever and each `--baselines` m,
    c   = the title's mean log-prob per token after the user's `next_title` prompt (the bench's `likelihood` mode),
and are ordered by score = sum_m w_m r_m + w_c c. The weights are chosen on the validation users (histories stop
before the validation target) from `--grid`, ties to the smaller weights in order:
- baselines' ensemble: w_c = 0, the retriever's weight 1, every other w_m from the grid;
- ensemble + LLM: w_c = 1, every w_m (the retriever's too) from the grid;
- LLM + retriever: w_c = 1, the retriever's weight from the grid, others 0 (the bench's likelihood row).
Test rows (all test users by default, seeded subset otherwise) are full ranking: a target the retriever left out of
the candidates counts 0, as every baseline row's, which rank the whole catalogue on their own. Ratios are paired
bootstraps over the same users (`llmrec.metrics.paired_bootstrap_ratio`): ensemble + LLM against the ensemble
(what the LLM adds), and every fused row against the best baseline's full ranking. Each prompt is scored once.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from llmrec.baselines import MODELS
from llmrec.bench_utils import command_line, count_or_all, md_table, positive_int, write_result
from llmrec.cli.args import nonneg_float
from llmrec.data import load_prepared
from llmrec.evaluation import evaluate_ranking, ranking_targets
from llmrec.metrics import ndcg_at_k, paired_bootstrap_ratio, ranking_metrics
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.factory import RETRIEVERS, build_retriever, collaborative_model, with_adapter_templates
from llmrec.retrieval.hybrid import row_ranks

log = logging.getLogger("rank_ensemble")
KEYS = ("ndcg@10", "hr@10", "mrr@10", "n_users")
BASELINES = ("itemcf", *MODELS)  # what `collaborative_model` builds


def target_ranks(feats: np.ndarray, w: np.ndarray, target: np.ndarray, missing_rank: int) -> np.ndarray:
    """Rank of each user's target among the candidates ordered by feats @ w ([users, candidates, features]); ties go
    to the earlier candidate (retriever order); `target` -1 (not among the candidates) gets `missing_rank`."""
    s = feats @ w
    ranks = np.full(len(s), missing_rank, dtype=np.int64)
    hit = np.flatnonzero(target >= 0)
    if hit.size:
        st = s[hit, target[hit]][:, None]
        col = np.arange(s.shape[1])[None, :]
        ranks[hit] = 1 + ((s[hit] > st) | ((s[hit] == st) & (col < target[hit][:, None]))).sum(1)
    return ranks


def ratio_cell(r: dict) -> str:
    """A paired-bootstrap ratio as a table cell: point (95% interval, share of resamples strictly ahead, share at
    least as good). Two rows with the same ranks are ahead in 0% of resamples and at least as good in 100%."""
    return f"{r['ratio']:.3f} ({r['lo']:.2f}-{r['hi']:.2f}, ahead {r['p_gt_1']:.0%}, >= {r['p_ge_1']:.0%})"


def choose_weights(feats: np.ndarray, target: np.ndarray, free: list[int], fixed: dict[int, float],
                   grid: list[float], missing_rank: int) -> tuple[np.ndarray, float]:
    """The weights of best NDCG@10 over `grid` for the `free` features (others: `fixed`, else 0); ties: the smaller
    weights in order. Returns (weights, validation NDCG@10)."""
    best: tuple[float, tuple[float, ...]] | None = None
    w = np.zeros(feats.shape[2])
    for i, v in fixed.items():
        w[i] = v
    for combo in itertools.product(sorted(grid), repeat=len(free)):
        w[free] = combo
        v = float(ndcg_at_k(target_ranks(feats, w, target, missing_rank), 10))
        if best is None or v > best[0] + 1e-12:
            best = (v, combo)
    w[free] = best[1]
    return w.copy(), best[0]


def features(rec: Recommender, ds, models: dict, split: str, users: int | None, seed: int, llm: bool,
             chunk: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """([users, candidates, 1 + len(models) + llm] features, target position among the candidates or -1, users)."""
    targets = ranking_targets(ds, split, users, seed)
    uids, items = targets["user_id"].tolist(), targets["item_id"].tolist()
    k = rec.cfg.n_candidates
    feats = np.zeros((len(uids), k, 1 + len(models) + int(llm)))
    target = np.full(len(uids), -1, dtype=np.int64)
    for b in tqdm(range(0, len(uids), chunk), desc=f"features:{split}"):
        ub = uids[b : b + chunk]
        hs = [rec.dataset_history(u, split) for u in ub]
        cands = [rec.candidates(h, exclude_seen_titles=False) for h in hs]
        if any(len(c) != k for c in cands):
            raise ValueError(f"a user got {min(len(c) for c in cands)} candidates, expected {k}")
        ids = [[c for c, _ in cs] for cs in cands]
        idx = np.array([[ds.item_index[i] for i in row] for row in ids])
        rows = np.arange(b, b + len(ub))
        feats[rows, :, 0] = -np.log(np.arange(1, k + 1))[None, :]
        for m, model in enumerate(models.values(), start=1):
            full = np.asarray(model.score_items(ub, split), dtype=np.float64)
            feats[rows, :, m] = -np.log(row_ranks(np.take_along_axis(full, idx, axis=1)))
        if llm:
            ranked = rec.rank_candidates(hs, cands, "likelihood")  # retrieval_weight 0: the title scores alone
            for j, (row, r) in enumerate(zip(ids, ranked)):
                got = dict(r)
                feats[b + j, :, -1] = [got[i] for i in row]
        for j, (row, t) in enumerate(zip(ids, items[b : b + chunk])):
            target[b + j] = row.index(t) if t in row else -1
    return feats, target, uids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--adapter", default=None, help="a next_title adapter (default: the base model, zero-shot)")
    ap.add_argument("--users", type=count_or_all, default=0, help="test users (0: all)")
    ap.add_argument("--valid-users", type=count_or_all, default=0, help="validation users for the weights (0: all)")
    ap.add_argument("--retriever", default="bert_lstm", choices=RETRIEVERS)
    ap.add_argument("--baselines", nargs="+", default=["sasrec", "bpr", "mf", "pop"], choices=BASELINES,
                    metavar="MODEL", help=f"models ({', '.join(BASELINES)}) whose order of the candidates is a "
                                          "feature (checkpoints, else fitted and saved)")
    ap.add_argument("--candidates", type=positive_int, default=20)
    ap.add_argument("--grid", type=nonneg_float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                    help="feature weights tried on validation (finite, >= 0)")
    ap.add_argument("--name", default=None, help="result name (default: rank_ensemble_<dataset>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fast")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from llmrec.llm import load_backend

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    retriever = build_retriever(ds, args.retriever)
    models = {m: collaborative_model(ds, m) for m in args.baselines if m != args.retriever}
    backend = load_backend("transformers", adapter=args.adapter, dtype=args.dtype)
    cfg = with_adapter_templates(replace(RankingConfig(n_candidates=args.candidates, mode="likelihood"),
                                         retrieval_weight=0.0), args.adapter)
    rec = Recommender(ds, backend, retriever, cfg)
    users, valid_users = args.users or None, args.valid_users or None
    miss = ds.n_items  # a target outside the candidates: below every candidate, 0 in every @10 metric
    fv, tv, valid_uids = features(rec, ds, models, "valid", valid_users, args.seed, llm=True)
    ft, tt, test_uids = features(rec, ds, models, "test", users, args.seed, llm=True)
    names = [f"{args.retriever} (retriever)", *models, "llm"]
    llm = len(names) - 1  # the last feature; 0 is the retriever's order, 1 .. llm - 1 the other baselines'
    cases = {
        f"{args.retriever}'s order (the candidates as retrieved)": (np.eye(len(names))[0], None),
        "baselines' ensemble (no LLM)": choose_weights(fv, tv, list(range(1, llm)), {0: 1.0}, args.grid, miss),
        "LLM + retriever (the bench's likelihood row)": choose_weights(fv, tv, [0], {llm: 1.0}, args.grid, miss),
        "LLM order alone": (np.eye(len(names))[llm], None),
        "baselines' ensemble + LLM": choose_weights(fv, tv, list(range(llm)), {llm: 1.0}, args.grid, miss),
    }
    test_ranks = {name: target_ranks(ft, w, tt, miss) for name, (w, _) in cases.items()}
    full: dict[str, dict] = {}
    for m, model in {args.retriever: retriever, **models}.items():
        r = evaluate_ranking(ds, lambda ub, model=model: model.score_items(ub, "test"), "test", ks=(10, 20),
                             max_users=users, seed=args.seed, return_ranks=True)
        full[m] = r
    best = max(full, key=lambda m: full[m]["ndcg@10"])
    best_ranks = np.asarray(full[best]["ranks"])
    ndcg = lambda rk: ndcg_at_k(rk, 10)  # noqa: E731

    def ratio(a: np.ndarray, b: np.ndarray) -> str:
        return ratio_cell(paired_bootstrap_ratio(ndcg, a, b, seed=args.seed))

    rows = [{"method": f"{m} alone, full ranking", **{k: r[k] for k in KEYS}} for m, r in full.items()]
    for name, (w, v) in cases.items():
        rk = test_ranks[name]
        met = ranking_metrics(rk, (10, 20))
        rows.append({"method": name, **{k: met[k] for k in KEYS}, "valid_ndcg@10": v,
                     "weights": ", ".join(f"{n} {x:g}" for n, x in zip(names, w) if x),
                     f"vs_best_{best}": ratio(rk, best_ranks),
                     "vs_baselines_ensemble": ratio(rk, test_ranks["baselines' ensemble (no LLM)"])})
        log.info("%s", rows[-1])
    cols = ["method", "ndcg@10", "hr@10", "mrr@10", "valid_ndcg@10", "weights", f"vs_best_{best}",
            "vs_baselines_ensemble", "n_users"]
    md = md_table(rows, cols) + (
        f"\n{len(tt)} test users (seed {args.seed}), {args.candidates} candidates from `{args.retriever}`, "
        f"{int((tt >= 0).sum())} of them with the test item among the candidates; weights chosen on "
        f"{len(tv)} validation users over {args.grid}. Features: log(1 / rank among the candidates) by each model, "
        f"and the LLM's title mean log-prob per token (adapter: {args.adapter or 'none, the base model'}). "
        f"vs_best_{best} (the best full ranking above, the retriever's included, on these users) / "
        f"vs_baselines_ensemble: NDCG@10 ratio, 95% paired "
        f"bootstrap interval, the share of resamples where the row is ahead (ratio > 1) and where it is at least as "
        f"good (>= 1).\n")
    write_result(args.name or f"rank_ensemble_{args.dataset}",
                 {"dataset": args.dataset, "rows": rows, "best_baseline": best, "features": names,
                  "test_user_ids": [str(u) for u in test_uids], "valid_user_ids": [str(u) for u in valid_uids],
                  "args": vars(args)}, md,
                 command=command_line())


if __name__ == "__main__":
    main()

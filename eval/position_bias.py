"""Does the LLM's candidate order echo the order the candidates are listed in? -> eval/results/position_bias_<dataset>.

    python eval/position_bias.py [--dataset ml-100k] [--users 200] [--retriever bert_lstm] [--adapter PATH]
                                 [--listings 4] [--name position_bias_<dataset>]

The same seeded test users as `llmrec bench` (`--users`, `--seed`), the same retrieved candidates; each model (the
base model zero-shot, and the tuned rank adapter with `--adapter`) scores them twice with the verbalizer, LLM order
alone (retrieval weight 0): listed in retrieval order (A = the retriever's best, as the Recommender lists them) and
listed in a seeded random order. Per row:
- ndcg@10 / hr@10: of the LLM's order, full ranking (a user whose test item was not retrieved counts 0, as in the
  bench);
- top1_listed_first: share of users whose top LLM choice is the candidate listed first (chance: 1/20);
- top1_retrieval_rank: mean retrieval rank (1 = best) of the LLM's top choice (chance: 10.5 of 20);
- rho_listed: mean over users of Spearman's rho between listed position and LLM score, sign flipped so > 0 means
  earlier-listed candidates score higher (0 = no position effect);
- rho_retrieval: the same against retrieval rank.
If the retrieval-order listing's NDCG drops to the random-order listing's level once shuffled while rho_listed stays,
the LLM ranks by where a candidate is listed, not by what it is. A third row per model removes the letter prior
(contextual calibration): each listed position's mean log-prob over the same number of *validation* users' prompts
is subtracted from the test scores before ordering; what is left is what the model says about the items. A fourth
row is the product's own remedy (`RankingConfig.listings`, `--listings`): the candidates listed `--listings` times in
cyclically shifted orders (the first is the retrieval order), each one's letter log-probs averaged; no validation
prompts needed, `--listings` forward passes per user.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from llmrec.bench_utils import command_line, md_table, positive_int, write_result
from llmrec.data import load_prepared
from llmrec.evaluation import ranking_targets
from llmrec.llm import load_backend
from llmrec.metrics import spearman
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.factory import RETRIEVERS, build_retriever, with_adapter_templates

log = logging.getLogger("position_bias")


def order_stats(ranked: list[list[tuple[str, float]]], listed: list[list[str]], retrieved: list[list[str]],
                targets: list[str]) -> dict[str, float]:
    """Metrics of the LLM orders `ranked` ((item_id, score) best first) for candidates shown in the order `listed`;
    `retrieved` is each user's retrieval order, `targets` the test items. See the module docstring."""
    ndcg, hit, first, r1, rho_l, rho_r = [], [], [], [], [], []
    for rk, li, re, t in zip(ranked, listed, retrieved, targets):
        ids = [i for i, _ in rk]
        pos = ids.index(t) + 1 if t in ids else None
        ndcg.append(1.0 / np.log2(pos + 1) if pos is not None and pos <= 10 else 0.0)
        hit.append(float(pos is not None and pos <= 10))
        if not ids:
            continue
        first.append(float(ids[0] == li[0]))
        r1.append(float(re.index(ids[0]) + 1))
        score = dict(rk)
        if len(li) > 1:
            rho_l.append(spearman([-p for p in range(len(li))], [score[i] for i in li]))
            rho_r.append(spearman([-p for p in range(len(re))], [score[i] for i in re]))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"ndcg@10": mean(ndcg), "hr@10": mean(hit), "top1_listed_first": mean(first),
            "top1_retrieval_rank": mean(r1), "rho_listed": mean(rho_l), "rho_retrieval": mean(rho_r),
            "users": len(ranked)}


def letter_prior(rec: Recommender, users: list[str], n: int) -> np.ndarray:
    """Mean letter log-prob per listed position over `users`' validation prompts (candidates in retrieval order;
    prompts with fewer than `n` candidates left out)."""
    hs = [rec.dataset_history(u, "valid") for u in users]
    cands = [rec.candidates(h, exclude_seen_titles=False) for h in hs]
    ranked = rec.rank_candidates(hs, cands, "verbalizer")
    rows = [[dict(r)[i] for i, _ in c] for r, c in zip(ranked, cands) if len(c) == n]
    if not rows:
        raise ValueError(f"no validation prompt has {n} candidates to estimate the letter prior from")
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0)


def calibrate(ranked: list[tuple[str, float]], listed: list[str], prior: np.ndarray) -> list[tuple[str, float]]:
    """`ranked`'s letter scores (retrieval weight 0) minus the prior of the position each item was listed at,
    best first (ties keep the listed order)."""
    score = dict(ranked)
    s = np.array([score[i] - prior[j] for j, i in enumerate(listed)])
    return [(listed[j], float(s[j])) for j in np.argsort(-s, kind="stable")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--users", type=positive_int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retriever", default="bert_lstm", choices=RETRIEVERS)
    ap.add_argument("--candidates", type=positive_int, default=20)
    ap.add_argument("--adapter", default=None, help="tuned rank adapter (a second model row)")
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--listings", type=positive_int, default=4,
                    help="cyclic listings averaged in the fourth row per model")
    ap.add_argument("--name", default=None, help="result name (default position_bias_<dataset>)")
    args = ap.parse_args()
    if args.listings > args.candidates:  # the recommender stops at one listing per candidate: the row would say more
        ap.error(f"--listings {args.listings} is more than --candidates {args.candidates} (at most one listing per "
                 "candidate: each at every position once)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    retriever = build_retriever(ds, args.retriever)
    users = [str(u) for u in ranking_targets(ds, "test", args.users, args.seed)["user_id"]]
    valid_users = [str(u) for u in ranking_targets(ds, "valid", args.users, args.seed)["user_id"]]
    targets = dict(zip(ds.targets("test")["user_id"].astype(str), ds.targets("test")["item_id"].astype(str)))
    rows = []
    for label, adapter in [("zero-shot", None), *([("tuned", args.adapter)] if args.adapter else [])]:
        backend = load_backend("transformers", adapter=adapter, dtype=args.dtype)
        cfg = with_adapter_templates(RankingConfig(n_candidates=args.candidates, retrieval_weight=0.0), adapter)
        rec = Recommender(ds, backend, retriever, cfg)
        rec.llm_cache = {}  # the retrieval-order prompts are the averaged row's first listing: scored once
        hs = [rec.dataset_history(u, "test") for u in users]
        cands = [rec.candidates(h, exclude_seen_titles=False) for h in hs]
        retrieved = [[i for i, _ in c] for c in cands]
        shuffled = [[c[j] for j in np.random.default_rng([args.seed, n]).permutation(len(c))]
                    for n, c in enumerate(cands)]
        in_order = rec.rank_candidates(hs, cands, "verbalizer")
        in_random_order = rec.rank_candidates(hs, shuffled, "verbalizer")
        prior = letter_prior(rec, valid_users, args.candidates)
        rec.cfg.listings = args.listings  # the last row's; every row above is one listing
        averaged = rec.rank_candidates(hs, cands, "verbalizer")
        for listing, ranked, listed in (
            ("retrieval order", in_order, retrieved),
            ("random order", in_random_order, [[i for i, _ in c] for c in shuffled]),
            ("retrieval order, letter prior removed",
             [calibrate(r, ids, prior) for r, ids in zip(in_order, retrieved)], retrieved),
            (f"retrieval order + {args.listings - 1} cyclic shifts, averaged", averaged, retrieved),
        ):
            st = order_stats(ranked, listed, retrieved, [targets[u] for u in users])
            rows.append({"model": label, "candidates listed in": listing, **st})
            log.info("%s", rows[-1])
        backend.close()
    cols = ["model", "candidates listed in", "ndcg@10", "hr@10", "top1_listed_first", "top1_retrieval_rank",
            "rho_listed", "rho_retrieval", "users"]
    md = md_table(rows, cols) + (
        f"\n{len(users)} test users (seed {args.seed}, the bench's), {args.candidates} candidates from "
        f"`{args.retriever}`, verbalizer, LLM order alone; adapter: {args.adapter or 'none'}; averaged rows: "
        f"{args.listings} listings, shifted by {args.candidates / args.listings:g} places each. Chance: "
        f"top1_listed_first {1 / args.candidates:.2f}, top1_retrieval_rank {(args.candidates + 1) / 2:g}, rho 0.\n")
    write_result(args.name or f"position_bias_{args.dataset}",
                 {"dataset": args.dataset, "rows": rows, "test_user_ids": users, "valid_user_ids": valid_users,
                  "args": vars(args)}, md,
                 command=command_line())


if __name__ == "__main__":
    main()

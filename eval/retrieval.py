"""Candidate retrieval benchmark: Recall@20/50/100 of text-only, collaborative-only and hybrid (RRF) retrieval on
the leave-one-out test split (full ranking over the catalogue minus the user's history), item encoding
throughput and query latency.

The hybrid's text weight is chosen on the *validation* split (grid below, best Recall@20) and then evaluated once
on test; the equal-weight hybrid is reported too. The collaborative side is `llmrec.retrieval.ItemCF` (item-item
cosine over training sequences), plus the BPR, SASRec and BERT+LSTM baselines from `llmrec.baselines` (checkpoint,
else fitted here; each sequential one alone and as a hybrid's side); the goal row is the hybrid with the best
validation Recall@20.

    .venv/bin/python eval/retrieval.py --datasets ml-100k ml-1m
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmrec.bench_utils import md_table, peak_rss_mb, positive_int, write_result  # noqa: E402
from llmrec.cli.args import positive_float  # noqa: E402

log = logging.getLogger("eval.retrieval")
KS = (20, 50, 100)
GRID = (0.1, 0.25, 0.5, 1.0)
ENSEMBLE_GRID = (0.5, 1.0, 2.0, 4.0)  # `ensemble`: the weight of every model after the first (whose weight is 1)


def recalls(ds: Any, model: Any, split: str, max_users: int | None) -> dict[str, float]:
    from llmrec.evaluation import evaluate_ranking

    t0 = time.perf_counter()
    r = evaluate_ranking(ds, lambda ub: model.score_items(list(ub), split), split, ks=KS, max_users=max_users,
                         desc=f"{getattr(model, 'name', 'model')}:{split}")
    out = {f"recall@{k}": round(float(r[f"recall@{k}"]), 4) for k in KS}
    out["ndcg@20"] = round(float(r["ndcg@20"]), 4)
    out["n_users"] = int(r["n_users"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def user_ranks(ds: Any, model: Any, split: str, max_users: int | None = None, batch: int = 256) -> np.ndarray:
    """Per-user pessimistic ranks of the target (the same computation, users and order as evaluate_ranking at
    `max_users`, seed 0: the users `recalls` reports on), for paired tests."""
    from llmrec.evaluation import history_indices, ranking_targets
    from llmrec.metrics import ranks_from_scores

    tg = ranking_targets(ds, split, max_users)
    users = tg["user_id"].tolist()
    t_idx = np.array([ds.item_index[i] for i in tg["item_id"]], dtype=np.int64)
    hist = history_indices(ds, users, split)
    out = []
    for b in range(0, len(users), batch):
        s = np.asarray(model.score_items(users[b : b + batch], split), dtype=np.float64)
        out.append(ranks_from_scores(s, t_idx[b : b + batch], hist[b : b + batch]))
    return np.concatenate(out)


def paired(ds: Any, a: Any, b: Any, split: str, k: int = 20, max_users: int | None = None) -> dict[str, Any]:
    """Users where a hits@k and b misses, the reverse, and an exact two-sided sign test on them (over the users
    `recalls` scores at the same `max_users`)."""
    from scipy.stats import binomtest

    ha, hb = user_ranks(ds, a, split, max_users) <= k, user_ranks(ds, b, split, max_users) <= k
    only_a, only_b = int((ha & ~hb).sum()), int((hb & ~ha).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"k": k, "only_hybrid": only_a, "only_single": only_b, "both": int((ha & hb).sum()),
            "sign_test_p": round(float(p), 4)}


def latency_ms(fn: Any, histories: list[list], reps: int = 1) -> dict[str, float]:
    times = []
    for h in histories:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(h)
            times.append((time.perf_counter() - t0) * 1000)
    a = np.array(times)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(a)}


def try_bpr(ds: Any, time_budget_s: float) -> tuple[Any, str | None]:
    """The BPR baseline: its saved checkpoint when there is one, else fitted here (bounded by `time_budget_s`)."""
    try:
        from llmrec.baselines import checkpoint_dir, get_model, load_model
    except ImportError as e:
        return None, f"llmrec.baselines not importable: {e}"
    try:
        t0 = time.perf_counter()
        if (checkpoint_dir(ds.name, "bpr")).is_dir() and any(checkpoint_dir(ds.name, "bpr").iterdir()):
            m = load_model("bpr", ds.name, ds=ds)
            how = f"loaded from {checkpoint_dir(ds.name, 'bpr')}"
        else:
            m = get_model("bpr", time_budget_s=time_budget_s)
            m.fit(ds, progress=False)
            how = f"fitted here in {time.perf_counter() - t0:.0f} s (llmrec.baselines BPRMF defaults)"
        log.info("BPR %s", how)
        return m, how
    except Exception as e:  # a baseline that fails is reported, not hidden
        return None, f"BPR failed: {type(e).__name__}: {e}"


def select_weight(ds: Any, label: str, grid: tuple[float, ...], make: Any, valid: dict,
                  max_users: int | None) -> float:
    """Validation Recall@20 (then @50) of `make(w)` for w in `grid`, recorded in `valid` as `label.format(w=w)`;
    returns the best w."""
    for w in grid:
        valid[label.format(w=w)] = recalls(ds, make(w), "valid", max_users)
    return max(grid, key=lambda w: (valid[label.format(w=w)]["recall@20"], valid[label.format(w=w)]["recall@50"]))


def select_text_weight(ds: Any, text: Any, cf: Any, label: str, valid: dict, max_users: int | None) -> float:
    """The hybrid's text weight (`label(w_text=w)`, w in GRID) of best validation Recall@20."""
    from llmrec.retrieval import HybridRetriever

    return select_weight(ds, label + "(w_text={w})", GRID, lambda w: HybridRetriever(text, cf, weights=(w, 1.0)),
                         valid, max_users)


def select_ensemble_weight(ds: Any, models: list[Any], valid: dict, max_users: int | None) -> float:
    """The weight of every model after the first (whose weight is 1) in an ensemble (`ensemble(w=w)`, w in
    ENSEMBLE_GRID) of best validation Recall@20."""
    from llmrec.retrieval import EnsembleRetriever

    return select_weight(ds, "ensemble(w={w})", ENSEMBLE_GRID,
                         lambda w: EnsembleRetriever(models, [1.0] + [w] * (len(models) - 1)), valid, max_users)


def try_model(ds: Any, name: str) -> tuple[Any, str]:
    """The baseline `name` (sasrec, bert_lstm) a `hybrid:<name>` / `<name>` retriever uses: its checkpoint, else
    fitted (and saved) here."""
    from llmrec.baselines import checkpoint_dir
    from llmrec.ranking.factory import collaborative_model

    t0 = time.perf_counter()
    had = (checkpoint_dir(ds.name, name) / "meta.json").is_file()
    try:
        m = collaborative_model(ds, name)
    except Exception as e:  # a baseline that fails is reported, not hidden
        return None, f"{name} failed: {type(e).__name__}: {e}"
    how = "loaded from its checkpoint" if had else f"fitted here in {time.perf_counter() - t0:.0f} s"
    epochs = m.fit_info.get("epochs") or m.fit_info.get("next_epochs")  # bert_lstm: its next-item head's
    return m, f"{how} ({epochs} epochs; config in {checkpoint_dir(ds.name, name)}/meta.json)"


def run(name: str, args: argparse.Namespace) -> dict:
    from llmrec.data import load_prepared
    from llmrec.ranking.factory import ENSEMBLE_WEIGHTS
    from llmrec.retrieval import EnsembleRetriever, HybridRetriever, ItemCF, TextEncoder, TextRetriever, history_before

    ds = load_prepared(name)
    res: dict[str, Any] = {"dataset": name, "n_items": int(ds.n_items), "n_users": int(len(ds.targets("test")))}

    # encoding throughput (no cache), after the model is loaded
    enc = TextEncoder(use_cache=False, batch_size=args.batch_size)
    t0 = time.perf_counter()
    _ = enc.model
    load_s = time.perf_counter() - t0
    texts = ds.item_texts()
    t0 = time.perf_counter()
    enc.encode_uncached(texts)
    enc_s = time.perf_counter() - t0
    res["encoding"] = {"model": enc.key, "model_load_seconds": round(load_s, 2), "items": len(texts),
                       "seconds": round(enc_s, 2), "items_per_second": round(len(texts) / enc_s, 1),
                       "batch_size": args.batch_size,
                       "mean_text_chars": round(float(np.mean([len(t) for t in texts])), 1)}
    log.info("%s: encoded %d items in %.1f s (%.0f items/s)", name, len(texts), enc_s, len(texts) / enc_s)

    text = TextRetriever(encoder=TextEncoder(batch_size=args.batch_size)).build(ds, progress=False)
    text.encoder._model = enc.model
    t0 = time.perf_counter()
    cf = ItemCF().fit(ds)
    res["itemcf_fit_seconds"] = round(time.perf_counter() - t0, 2)
    text_mean = TextRetriever(encoder=text.encoder, scoring="mean").build(ds, progress=False)
    text_mean.name = "text(mean)"
    res["settings"] = {"text": {"recency_half_life": text.half_life, "disliked_weight": text.disliked_weight,
                                "index": text.kind, "scoring": text.scoring, "knn_tau": text.knn_tau,
                                "knn_neighbors": text.knn_neighbors},
                       "itemcf": {"recency_half_life": cf.half_life, "disliked_weight": cf.disliked_weight,
                                  "shrink": cf.shrink},
                       "rrf_k": 60, "hybrid_depth": 200, "text_weight_grid": list(GRID)}

    # hybrid text weight selected on validation
    valid: dict[str, Any] = {"text": recalls(ds, text, "valid", args.max_users),
                             "text(mean)": recalls(ds, text_mean, "valid", args.max_users),
                             "itemcf": recalls(ds, cf, "valid", args.max_users)}
    best_w = select_text_weight(ds, text, cf, "hybrid", valid, args.max_users)
    res["valid"] = valid
    res["selected_text_weight"] = best_w

    test: dict[str, Any] = {"text": recalls(ds, text, "test", args.max_users),
                            "text(mean)": recalls(ds, text_mean, "test", args.max_users),
                            "itemcf": recalls(ds, cf, "test", args.max_users)}
    hyb = HybridRetriever(text, cf, weights=(best_w, 1.0))
    test["hybrid"] = recalls(ds, hyb, "test", args.max_users)
    for w in sorted({1.0, 0.5} - {best_w}):  # for reference only: the goal row is the validation-selected one
        test[f"hybrid(w_text={w}, not selected)"] = recalls(ds, HybridRetriever(text, cf, weights=(w, 1.0)), "test",
                                                            args.max_users)
    bpr, how = (None, "skipped (--no-bpr)") if args.no_bpr else try_bpr(ds, args.bpr_budget)
    res["bpr"] = how
    if bpr is not None:
        test["bpr"] = recalls(ds, bpr, "test", args.max_users)
        test[f"hybrid text+bpr (w_text={best_w})"] = recalls(ds, HybridRetriever(text, bpr, weights=(best_w, 1.0)),
                                                             "test", args.max_users)
    # sequential baselines as the collaborative side (`--retriever hybrid:sasrec`) or alone (`--retriever sasrec`,
    # `bert_lstm`): each its own text weight, chosen on valid
    hybrids = {"hybrid": (hyb, valid[f"hybrid(w_text={best_w})"]["recall@20"])}
    singles_m: dict[str, Any] = {"text": text, "text(mean)": text_mean, "itemcf": cf, "bpr": bpr}
    for mname in args.models:
        m, res[mname] = try_model(ds, mname)
        if m is None:
            continue
        singles_m[mname] = m
        valid[mname] = recalls(ds, m, "valid", args.max_users)
        sw = select_text_weight(ds, text, m, f"hybrid:{mname}", valid, args.max_users)
        res[f"selected_text_weight_{mname}"] = sw
        test[mname] = recalls(ds, m, "test", args.max_users)
        h = HybridRetriever(text, m, weights=(sw, 1.0))
        test[f"hybrid:{mname}"] = recalls(ds, h, "test", args.max_users)
        hybrids[f"hybrid:{mname}"] = (h, valid[f"hybrid:{mname}(w_text={sw})"]["recall@20"])
    ens = None
    if all(m in singles_m for m in ENSEMBLE_WEIGHTS):  # `--retriever ensemble`: the sequential models fused by RRF
        members = [singles_m[m] for m in ENSEMBLE_WEIGHTS]
        ew = select_ensemble_weight(ds, members, valid, args.max_users)
        res["ensemble"] = {"models": list(ENSEMBLE_WEIGHTS), "selected_weight": ew, "grid": list(ENSEMBLE_GRID)}
        ens = EnsembleRetriever(members, [1.0] + [ew] * (len(members) - 1))
        test["ensemble"] = recalls(ds, ens, "test", args.max_users)
    res["test"] = test
    # the goal row: the hybrid with the best *validation* Recall@20, against the best single retriever on test
    goal_h = max(hybrids, key=lambda k: hybrids[k][1])
    singles = {k: v["recall@20"] for k, v in test.items() if not k.startswith(("hybrid", "ensemble"))}
    best_single = max(singles, key=singles.get)
    res["goal"] = {"hybrid": goal_h, "hybrid_recall@20": test[goal_h]["recall@20"], "best_single": best_single,
                   "best_single_recall@20": singles[best_single],
                   "met": bool(test[goal_h]["recall@20"] >= singles[best_single]),
                   "paired": paired(ds, hybrids[goal_h][0], singles_m[best_single], "test",
                                    max_users=args.max_users)}

    # query latency: one user at a time, top-100, through the persisted faiss index
    rng = np.random.default_rng(0)
    users = rng.choice(ds.targets("test")["user_id"].to_numpy(), size=min(args.latency_users, res["n_users"]),
                       replace=False)
    hists = [history_before(ds, u, "test") for u in users]
    res["query_latency"] = {
        "text_knn(flat)": latency_ms(lambda h: text.query(h, k=100), hists),
        "text_mean(flat)": latency_ms(lambda h: text_mean.query(h, k=100), hists),
        "hybrid(itemcf)": latency_ms(lambda h: hyb.query(h, k=100), hists),
    }
    for key, (hr, _) in hybrids.items():
        if key != "hybrid":
            res["query_latency"][f"hybrid({key.split(':')[1]})"] = latency_ms(lambda h, r=hr: r.query(h, k=100), hists)
    if ens is not None:
        res["query_latency"]["ensemble"] = latency_ms(lambda h: ens.query(h, k=100), hists)
    ivf = TextRetriever(encoder=text.encoder, index="ivf", nprobe=8, scoring="mean").build(ds, progress=False)
    res["query_latency"]["text_mean(ivf, nprobe=8)"] = latency_ms(lambda h: ivf.query(h, k=100), hists)
    overlap = [len({i for i, _ in ivf.query(h, k=100)} & {i for i, _ in text_mean.query(h, k=100)}) / 100
               for h in hists]
    res["ivf_top100_overlap_with_flat"] = round(float(np.mean(overlap)), 4)
    res["ivf_nlist"] = int(ivf.index.nlist)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def _p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"= {p}"


def table(r: dict) -> str:
    label = {"hybrid": f"hybrid (text+itemcf, w_text={r['selected_text_weight']} chosen on valid)"}
    for k in r["test"]:
        if k.startswith("hybrid:"):
            m = k.split(":", 1)[1]
            label[k] = f"{k} (text+{m}, w_text={r.get(f'selected_text_weight_{m}')} chosen on valid)"
    if "ensemble" in r:
        en = r["ensemble"]
        label["ensemble"] = (f"ensemble ({' + '.join(en['models'])} by RRF, weights 1 / {en['selected_weight']} "
                             "chosen on valid)")
    gk = r["goal"].get("hybrid", "hybrid")
    label[gk] = f"**{label[gk]}**"
    rows = [{"retriever": label.get(k, k),
             **{c: v.get(c) for c in ("recall@20", "recall@50", "recall@100", "ndcg@20", "n_users")}}
            for k, v in r["test"].items()]
    t = md_table(rows, ["retriever", "recall@20", "recall@50", "recall@100", "ndcg@20", "n_users"])
    vrows = [{"retriever": k, **{c: v.get(c) for c in ("recall@20", "recall@50", "recall@100")}}
             for k, v in r["valid"].items()]
    lat = [{"query (top-100, one user)": k, **v} for k, v in r["query_latency"].items()]
    e = r["encoding"]
    g = r["goal"]
    st = r["settings"]["text"]
    # `n_users` is every test user; with --max-users the rows score a seeded subset, which the heading must say
    scored = {v.get("n_users") for v in r["test"].values()} - {None}
    who = (f"{r['n_users']:,} users" if scored <= {r["n_users"]} else
           f"a seeded subset of {', '.join(f'{n:,}' for n in sorted(scored))} of the {r['n_users']:,} test users "
           f"by --max-users; query latency over {r['query_latency'].get('text_knn(flat)', {}).get('n', '?')} users "
           "drawn from all")
    return (
        f"Leave-one-out **test** split, full ranking over all {r['n_items']:,} items minus each user's history "
        f"({who}). Recall@K = HR@K (one target per user).\n\n{t}\n"
        f"Goal (hybrid Recall@20 >= best single retriever, {g['best_single']} {g['best_single_recall@20']}): "
        f"**{'met' if g['met'] else 'NOT met'}** ({gk} {g['hybrid_recall@20']}; of the hybrids, the one with the best "
        f"validation Recall@20 is the goal row). Paired over users at K=20: "
        f"{g['paired']['only_hybrid']} users hit only with the hybrid, {g['paired']['only_single']} only with "
        f"{g['best_single']} (exact sign test p {_p(g['paired']['sign_test_p'])}).\n\n"
        f"Text side: all-MiniLM-L6-v2 item embeddings; `text` = soft nearest-neighbour vote of the history items "
        f"(score(i) = sum_h w_h exp((cos(e_h, e_i) - 1) / {st.get('knn_tau')}), {st.get('knn_neighbors')} neighbours "
        f"per item; the default), `text(mean)` = cosine to the recency-weighted mean of the history embeddings.\n"
        f"Collaborative side: ItemCF (llmrec.retrieval.cf); BPR: {r['bpr']}"
        + "".join(f"; {m}: {r[m]}" for m in ("sasrec", "bert_lstm") if m in r) + ".\n"
        f"Hybrid = RRF, score = sum w/(60 + rank), top-200 per side; text weights {r['selected_text_weight']} "
        f"(itemcf)" + "".join(f", {r[f'selected_text_weight_{m}']} ({m})" for m in ("sasrec", "bert_lstm")
                             if f"selected_text_weight_{m}" in r) + " chosen on the validation split:\n\n"
        f"{md_table(vrows, ['retriever', 'recall@20', 'recall@50', 'recall@100'])}\n"
        f"Encoding (all-MiniLM-L6-v2, CPU, no cache): {e['items']:,} items in {e['seconds']} s = "
        f"**{e['items_per_second']} items/s** (batch {e['batch_size']}, mean text {e['mean_text_chars']} chars; "
        f"model load {e['model_load_seconds']} s).\n\n"
        f"{md_table(lat, ['query (top-100, one user)', 'p50_ms', 'p95_ms', 'mean_ms', 'n'])}\n"
        f"IVF (nlist={r['ivf_nlist']}, nprobe=8) top-100 overlap with the exact index (mean scoring): "
        f"{r['ivf_top100_overlap_with_flat']}.\n\n"
        "Timings were taken on a 2-core machine shared with other jobs (noisy, upper bounds).\n"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    p.add_argument("--max-users", type=positive_int, default=None, help="seeded user subset (default: all)")
    p.add_argument("--latency-users", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--no-bpr", action="store_true")
    p.add_argument("--models", nargs="*", default=["sasrec", "bert_lstm"], choices=["sasrec", "bert_lstm"],
                   help="sequential baselines scored alone and as a hybrid's collaborative side (checkpoint, else "
                        "fitted and saved); none: --models")
    p.add_argument("--bpr-budget", type=positive_float, default=900.0,
                   help="seconds for fitting BPR when no checkpoint")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    for name in args.datasets:
        r = run(name, args)
        path = write_result(f"retrieval_{name}", r, table(r))
        print(f"wrote {path}")
        print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

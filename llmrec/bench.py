"""One-run benchmark: every method on the same split, the same users and the same Yes/No examples.

Next item: full ranking over all items minus the user's history (leave-one-out test), on a fixed seeded subset of
users shared by every method (the LLM is slow on CPU; the subset size is in the report), plus the baselines on all
users. Yes/No: AUC / accuracy / F1 on a fixed seeded subset of the time-split test examples, shared by every method;
accuracy and F1 both at 0.5 and at each method's own threshold chosen on a fixed subset of the validation examples.
Writes `eval/results/bench_<dataset>.{json,md}` and PNG plots beside them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.bench_utils import RESULTS_DIR, md_table, write_result
from llmrec.evaluation import evaluate_ranking, evaluate_yesno, ranking_targets, yesno_subset

log = logging.getLogger(__name__)

RANK_KEYS = ["hr@10", "recall@10", "ndcg@10", "mrr@10"]
YESNO_KEYS = ["auc", "accuracy", "f1"]  # accuracy / F1 at P(Yes) >= 0.5
THRESHOLD_KEYS = ["t_valid", "accuracy@t_valid", "f1@t_valid"]  # at the threshold chosen on validation rows


@dataclass
class BenchConfig:
    """What `llmrec bench` runs. Every key has a default; `--set key=value` overrides."""

    dataset: str = "ml-100k"
    baselines: list[str] = field(default_factory=lambda: ["pop", "mf", "bpr", "bert_lstm", "sasrec"])
    baseline_overrides: dict[str, Any] = field(default_factory=dict)  # per model: constructor kwargs (fast settings)
    rank_users: int = 200  # fixed seeded user subset shared by every method (0 = all users)
    yesno_examples: int = 500  # fixed seeded Yes/No test subset shared by every method
    # fixed seeded Yes/No validation subset: each method's decision threshold (max accuracy there) for
    # accuracy@t_valid / f1@t_valid on the test rows; 0 = accuracy / F1 at 0.5 only
    yesno_valid_examples: int = 500
    seed: int = 0
    llm: bool = True
    backend: str = "transformers"
    model: str | None = None  # default: the embedded SmolLM2-135M-Instruct
    # LoRA adapters; default: $LLMREC_HOME/finetune/<task>_<dataset> (`llmrec finetune`), else bench_<task>_<dataset>
    # (`llmrec bench --train` trains the shipped recipes there)
    adapter_yesno: str | None = None  # LoRA adapter tuned on the yesno task
    adapter_rank: str | None = None  # LoRA adapter tuned on the rank task (verbalizer mode)
    adapter_title: str | None = None  # LoRA adapter tuned on the next_title task (likelihood mode)
    # LLM rerank modes scored, each zero-shot and tuned: verbalizer (letters, adapter_rank) and likelihood (titles'
    # log-probs, adapter_title); the headline's tuned LLM is the tuned row of best validation NDCG@10
    rank_modes: list[str] = field(default_factory=lambda: ["verbalizer", "likelihood"])
    # candidates: the BERT+LSTM baseline's own top 20 (fitted above when "bert_lstm" is in `baselines`), so the LLM
    # reranks the best baseline's list. On ML-100K's validation split the tuned LLM's best fused NDCG@10 was 0.086 over
    # these vs 0.079 over `hybrid:sasrec` (text + SASRec by RRF, the best candidate *recall*,
    # eval/results/retrieval_*.md). "hybrid" = text + item-CF (no training); see llmrec.ranking.factory.RETRIEVERS.
    retriever: str = "bert_lstm"
    n_candidates: int = 20
    # LLM + retrieval-rank fusion weights tried on the validation split (same number of users as rank_users);
    # the best one ranks the test users. [] = the LLM's order alone.
    fusion_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    generate_users: int = 10  # users timed in `generate` mode against the verbalizer (slow on CPU); 0 = not timed
    dtype: str = "fast"
    explanations: int = 5  # example explanations in the report
    results_dir: str | None = None


def _finetune_default(task: str, dataset: str) -> str | None:
    """The adapter a bench without `adapter_<task>` uses: the recipe's default output (`llmrec finetune`,
    `make finetune`), else `llmrec bench --train`'s; never another folder that merely matches the names (a demo's
    32-step adapter, a memory benchmark's 2-step one)."""
    from llmrec.config import llmrec_home

    root = llmrec_home() / "finetune"
    for name in (f"{task}_{dataset}", f"bench_{task}_{dataset}"):
        if (root / name / "adapter").is_dir():
            return str(root / name / "adapter")
    return None


def goal_line(key: str, g: dict) -> str:
    """One markdown bullet for a goal of the bench report (with its paired-bootstrap interval when there is one)."""
    verdict = "met" if g["met"] else "NOT met"
    if key == "verbalizer_speedup":
        return f"- verbalizer vs generate: {g['ratio']:.1f}x faster per user (goal {g['goal_ratio']:.0f}x): {verdict}"
    ci = g.get("ci")
    unc = (f"; {100 * ci['level']:.0f}% paired-bootstrap interval {ci['lo']:.2f}-{ci['hi']:.2f}x over the same "
           f"{ci['n']} {g.get('rows', 'rows')}, tuned LLM >= {g.get('best_other_name', 'best other')} in "
           f"{100 * ci['p_ge_1']:.0f}% of resamples" if ci else "")
    return (
        f"- {key}: tuned LLM{' (' + g['tuned_name'] + ')' if g.get('tuned_name') not in (None, 'llm tuned') else ''}"
        f" {g['tuned_llm']:.4f} vs best other"
        f"{' (' + g['best_other_name'] + ')' if g.get('best_other_name') else ''} {g['best_other']:.4f} = "
        f"{g['ratio']:.2f}x (goal {g['goal_ratio']}x): {verdict}{unc}{runner_up_note(g.get('runner_up'))}"
    )


def runner_up_note(r: dict | None) -> str:
    """The goal line's clause on the tuned row validation did not pick (llmrec.bench.runner_up), '' without one."""
    if not r:
        return ""
    ci = r.get("ci")
    unc = f", {100 * ci['level']:.0f}% {ci['lo']:.2f}-{ci['hi']:.2f}x" if ci else ""
    return (f". Not picked: {r['name']} {r['ratio']:.2f}x on test{unc}; validation NDCG@10 {r['valid']:.4f} against "
            f"the picked row's {r['valid_picked']:.4f}")


def goal_interval(key: str, tuned: str, other: str, ranks: dict, curves: dict, labels: Any,
                  seed: int = 0) -> dict | None:
    """The paired-bootstrap interval of the tuned LLM's / the best other method's `key` (ndcg@10 over the same
    users, auc over the same Yes/No rows; llmrec.metrics.paired_bootstrap_ratio), None without both methods' rows."""
    from llmrec.metrics import ndcg_at_k, paired_auc_ratio, paired_bootstrap_ratio

    if key == "ndcg@10" and tuned in ranks and other in ranks:
        return paired_bootstrap_ratio(lambda r: ndcg_at_k(r, 10), np.asarray(ranks[tuned]), np.asarray(ranks[other]),
                                      seed=seed)
    if key == "auc" and tuned in curves and other in curves:
        return paired_auc_ratio(labels, curves[tuned], curves[other], seed=seed)
    return None


def yesno_row(probs: Any, ex: Any, valid_probs: Any = None, ex_valid: Any = None) -> dict[str, float]:
    """A method's Yes/No columns: AUC, accuracy and F1 at 0.5 on the test rows `ex`, and with validation scores
    the threshold t* chosen on them (llmrec.metrics.best_threshold) with accuracy / F1 on the test rows at t*."""
    from llmrec.metrics import metrics_at_valid_threshold

    m = evaluate_yesno(probs, ex)
    row = {k: float(m[k]) for k in YESNO_KEYS}
    if valid_probs is not None:  # callers score the validation rows only when there are some
        t = metrics_at_valid_threshold(ex_valid["label"].to_numpy(), valid_probs, ex["label"].to_numpy(), probs)
        row.update({"t_valid": t["threshold"], "accuracy@t_valid": t["accuracy"], "f1@t_valid": t["f1"]})
    return row


def run_baselines(ds: Any, cfg: BenchConfig, ex: Any, methods: dict, curves: dict, ex_valid: Any = None,
                  ranks: dict | None = None) -> dict:
    """Fit and score each baseline; returns the fitted models by name (a `hybrid:<name>` retriever reuses one).
    `ranks` gets each method's per-user target ranks on the shared user subset, `curves` its Yes/No P(Yes)."""
    from llmrec.baselines import get_model

    ranks = {} if ranks is None else ranks
    fitted = {}
    for name in cfg.baselines:
        t0 = time.perf_counter()
        model = get_model(name, **cfg.baseline_overrides.get(name, {}))
        model.fit(ds)
        fitted[name] = model
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        sub = evaluate_ranking(
            ds,
            lambda u, m=model: m.score_items(list(u), "test"),
            max_users=cfg.rank_users or None,
            seed=cfg.seed,
            desc=name,
            return_ranks=True,
        )
        ranks[name] = sub.pop("ranks")
        rank_s = (time.perf_counter() - t1) / max(1, sub.get("user_subset", {}).get("n", sub["n_users"]))
        full = evaluate_ranking(ds, lambda u, m=model: m.score_items(list(u), "test"), desc=name)
        row: dict[str, Any] = {k: sub[k] for k in RANK_KEYS}
        row.update({f"all_users_{k}": full[k] for k in RANK_KEYS})
        row.update({"train_s": train_s, "rank_s_per_user": rank_s})
        if hasattr(model, "predict_proba"):
            try:
                probs = np.asarray(model.predict_proba(ex))
            except NotImplementedError:
                probs = None
            if probs is not None:
                # baselines train on the `train` rows only (valid: early stopping), so valid scores are held out
                vp = np.asarray(model.predict_proba(ex_valid)) if ex_valid is not None and len(ex_valid) else None
                row.update(yesno_row(probs, ex, vp, ex_valid))
                curves[name] = probs.tolist()
        methods[name] = row
        log.info("%s: %s", name, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    return fitted


def explanation_users(ds: Any, n_examples: int, seed: int = 0) -> list[str]:
    """The seeded users the report's explanations are generated for: 4 per example shown, drawn from the users with a
    leave-one-out test target (their history is the test history), all of them when there are fewer."""
    targets = ds.targets("test")["user_id"]
    return targets.sample(n=min(n_examples * 4, len(targets)), random_state=seed).tolist()


TUNED_RANK_ROWS = ("llm tuned", "llm tuned, title likelihood")  # the tuned rerank modes the headline picks from


def _valid_ndcg(methods: dict, fusion: dict) -> dict[str, float]:
    """Each tuned rerank row's validation NDCG@10 at its selected fusion weight."""
    rows = [n for n in TUNED_RANK_ROWS if isinstance(methods.get(n, {}).get("ndcg@10"), float)]
    return {n: fusion[n]["valid"][fusion[n]["selected"]]["ndcg@10"] for n in rows if n in fusion}


def best_tuned_rank(methods: dict, fusion: dict) -> str:
    """The tuned LLM rerank row the headline compares: of `llm tuned` (verbalizer) and `llm tuned, title likelihood`,
    the one with the best *validation* NDCG@10 at its selected fusion weight (never chosen on the test users);
    `llm tuned` when there is no validation figure."""
    valid = _valid_ndcg(methods, fusion)
    if not valid:
        return "llm tuned"
    return max(valid, key=lambda n: (valid[n], n == "llm tuned"))


def runner_up(picked: str, other: str, methods: dict, fusion: dict, ranks: dict, seed: int = 0) -> dict | None:
    """The tuned rerank row the headline did not pick, beside the one it did: its test NDCG@10 / the best other
    method's (with the paired-bootstrap interval) and both rows' validation NDCG@10, so that a pick decided by a
    small validation margin shows; None with fewer than two tuned rows."""
    valid = _valid_ndcg(methods, fusion)
    alt = next((n for n in valid if n != picked), None)
    if alt is None or picked not in valid:
        return None
    base = methods[other]["ndcg@10"]
    return {"name": alt, "ratio": methods[alt]["ndcg@10"] / base if base > 0 else float("inf"), "valid": valid[alt],
            "valid_picked": valid[picked], "ci": goal_interval("ndcg@10", alt, other, ranks, {}, None, seed)}


def time_verbalizer_vs_generate(rec: Any, ds: Any, n_users: int, seed: int) -> dict[str, Any]:
    """Seconds per user of the verbalizer and of `generate` on the *same* `n_users` seeded test users (the same
    retrieved candidates), each timed after an untimed warm-up call of its own mode on one validation user, the
    verbalizer with an empty prompt cache (no score computed earlier, e.g. by the fusion-weight runs, is reused).
    speedup = generate s/user / verbalizer s/user. `rec.llm_cache` is left as it was."""
    from llmrec.ranking.evaluate import eval_rank

    saved = rec.llm_cache
    try:
        for mode in ("verbalizer", "generate"):  # warm-up: a mode's first call pays one-off costs
            rec.llm_cache = {}
            eval_rank(rec, ds, 1, seed, mode=mode, split="valid")
        rec.llm_cache = {}
        v = eval_rank(rec, ds, n_users, seed, mode="verbalizer")
        rec.generate_totals.clear()
        g = eval_rank(rec, ds, n_users, seed, mode="generate")
    finally:
        rec.llm_cache = saved
    return {
        "users": int(g.get("n_users", n_users)),
        "verbalizer_s_per_user": v["seconds_per_user"],
        "generate_s_per_user": g["seconds_per_user"],
        "speedup": g["seconds_per_user"] / max(1e-9, v["seconds_per_user"]),
        "verbalizer_ndcg@10": v["ndcg@10"],
        "generate_ndcg@10": g["ndcg@10"],
        "generate_mapping": dict(rec.generate_totals),
        "timing": "the same users for both modes, each after an untimed warm-up call of its own",
    }


def run_llm(ds: Any, cfg: BenchConfig, ex: Any, methods: dict, curves: dict, report: dict,
            fitted: dict | None = None, ex_valid: Any = None, ranks: dict | None = None) -> None:
    from llmrec.llm import load_backend
    from llmrec.metrics import random_order_metrics
    from llmrec.ranking import RankingConfig, Recommender
    from llmrec.ranking.evaluate import eval_rank, explanation_metrics, select_retrieval_weight
    from llmrec.ranking.factory import build_retriever, with_adapter_templates

    # `hybrid:sasrec`, `ensemble` etc.: the collaborative side is the baseline(s) fitted above (same split, same seed)
    retriever = build_retriever(ds, cfg.retriever, fitted=fitted)
    rcfg = RankingConfig(n_candidates=cfg.n_candidates)
    max_users = cfg.rank_users or None
    ranks = {} if ranks is None else ranks
    t0 = time.perf_counter()
    m = eval_rank(Recommender(ds, None, retriever, rcfg), ds, max_users, cfg.seed, retrieval_only=True,
                  return_ranks=True)
    ranks[f"retrieval ({cfg.retriever})"] = m.pop("ranks")
    methods[f"retrieval ({cfg.retriever})"] = {
        **{k: m[k] for k in RANK_KEYS},
        "rank_s_per_user": m["seconds_per_user"],
        "train_s": time.perf_counter() - t0,
    }
    n = cfg.n_candidates
    if f"hr@{n}" in m:  # chance level of a reranker: the retrieved candidates in a uniformly random order
        chance = random_order_metrics(n)
        methods[f"retrieval ({cfg.retriever}), candidates in random order (expected)"] = {
            **{k: m[f"hr@{n}"] * chance[k.replace("recall", "hr")] for k in RANK_KEYS},
            "rank_s_per_user": m["seconds_per_user"], "expected": True}  # the retrieval's time: a shuffle is free
    unknown = set(cfg.rank_modes) - {"verbalizer", "likelihood"}
    if unknown:
        raise ValueError(f"BenchConfig.rank_modes: unknown mode(s) {sorted(unknown)}; use verbalizer, likelihood")
    variants = [("llm zero-shot", None, None, None)]
    ay = cfg.adapter_yesno or _finetune_default("yesno", ds.name)
    ar = cfg.adapter_rank or _finetune_default("rank", ds.name)
    at = (cfg.adapter_title or _finetune_default("next_title", ds.name)) if "likelihood" in cfg.rank_modes else None
    if ay or ar or at:
        variants.append(("llm tuned", ay, ar, at))
    else:
        report["notes"].append("no tuned adapter found: run `llmrec bench --train` (= `make bench`: trains the "
                               "shipped recipes first) or pass adapter_yesno/adapter_rank/adapter_title")

    def rank_rows(rec: Any, label: str, adapter: str | None, mode: str) -> dict[str, Any]:
        """The `label` row (fusion weight chosen on valid, test users) and its `, LLM order only` row."""
        rec.llm_cache = {}  # every prompt scored once across the fusion weights
        if cfg.fusion_grid:
            sel = select_retrieval_weight(rec, ds, cfg.fusion_grid, max_users, cfg.seed, mode=mode)
            report.setdefault("fusion", {})[label] = sel
        r = eval_rank(rec, ds, max_users, cfg.seed, mode=mode, return_ranks=True)  # scores every test prompt
        ranks[label] = r.pop("ranks")
        row = {**{k: r[k] for k in RANK_KEYS}, "rank_s_per_user": r["seconds_per_user"], "rank_adapter": adapter,
               "rank_mode": mode}
        if rec.cfg.retrieval_weight != 0.0:  # the LLM's own order, for reference (prompts already scored)
            w = rec.cfg.retrieval_weight
            rec.cfg.retrieval_weight = 0.0
            r0 = eval_rank(rec, ds, max_users, cfg.seed, mode=mode, return_ranks=True)
            ranks[f"{label}, LLM order only"] = r0.pop("ranks")
            # same prompts, same LLM cost: only the final ordering differs
            methods[f"{label}, LLM order only"] = {**{k: r0[k] for k in RANK_KEYS},
                                                  "rank_s_per_user": r["seconds_per_user"],
                                                  "retrieval_weight": 0.0, "rank_adapter": adapter, "rank_mode": mode}
            rec.cfg.retrieval_weight = w
        row["retrieval_weight"] = rec.cfg.retrieval_weight
        return row

    for label, a_yes, a_rank, a_title in variants:
        row: dict[str, Any] = {}
        jobs = [("rank", a_rank)] if "verbalizer" in cfg.rank_modes else []
        jobs += [("likelihood", a_title)] if "likelihood" in cfg.rank_modes else []
        for task, adapter in (*jobs, ("yesno", a_yes)):
            if label == "llm tuned" and adapter is None:
                continue
            backend = load_backend(cfg.backend, model=cfg.model, adapter=adapter, dtype=cfg.dtype)
            name = Path(adapter).parent.name if adapter else None
            rec = Recommender(ds, backend, retriever, with_adapter_templates(replace(rcfg), adapter, model=cfg.model),
                              adapter=name)
            if task == "likelihood":
                methods[f"{label}, title likelihood"] = rank_rows(rec, f"{label}, title likelihood", adapter,
                                                                  "likelihood")
            elif task == "rank":
                row.update(rank_rows(rec, label, adapter, "verbalizer"))
                if label == "llm zero-shot" and cfg.generate_users > 0:  # 0: no timing (eval_rank's 0 = all users)
                    n_gen = min(cfg.generate_users, max_users or cfg.generate_users)
                    report["verbalizer_vs_generate"] = {
                        **time_verbalizer_vs_generate(rec, ds, n_gen, cfg.seed),
                        "verbalizer_s_per_user_rank_users": row["rank_s_per_user"],  # its row's, `rank_users` users
                    }
                if cfg.explanations and (label == "llm tuned" or not a_rank):
                    users = explanation_users(ds, cfg.explanations, cfg.seed)
                    hs = [rec.dataset_history(u, "test") for u in users]
                    recs = rec.recommend_batch(users, hs, k=5, explain=True)
                    report["explanations"] = {
                        "metrics": explanation_metrics(recs),
                        "adapter": adapter,
                        "examples": [
                            {
                                "user_id": x.user_id,
                                "items": [i.title for i in x.items],
                                "explanation": x.explanation,
                                "fallback": x.explanation_fallback,
                                "evidence": x.evidence,
                            }
                            for x in recs[: cfg.explanations]
                        ],
                    }
            else:
                t1 = time.perf_counter()
                probs = rec.yesno_examples_probs(ex)
                row["yesno_s_per_example"] = (time.perf_counter() - t1) / max(1, len(ex))
                vp = rec.yesno_examples_probs(ex_valid) if ex_valid is not None and len(ex_valid) else None
                row.update(yesno_row(probs, ex, vp, ex_valid))
                row["yesno_adapter"] = adapter
                row["yesno_template"] = rec.templates["yesno"].name  # the adapter's own (llmrec_prompt.json)
                curves[label] = probs.tolist()
            backend.close()
        methods[label] = row


def plots(name: str, out_dir: Path, methods: dict, curves: dict, labels: list[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(methods)
    for ax, key in zip(axes, ["ndcg@10", "auc"]):
        vals = [(n, methods[n][key]) for n in names if isinstance(methods[n].get(key), float)]
        ax.barh([v[0] for v in vals], [v[1] for v in vals], color="tab:blue")
        ax.set_title(key + (" (full ranking)" if key.startswith("ndcg") else " (Yes/No)"))
        ax.invert_yaxis()
    fig.tight_layout()
    files.append(f"{name}_metrics.png")
    fig.savefig(out_dir / files[-1], dpi=110)
    plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(5, 5))
        for n, p in curves.items():
            fpr, tpr, _ = roc_curve(labels, p)
            ax.plot(fpr, tpr, label=f"{n} (AUC {methods[n].get('auc', float('nan')):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7)
        ax.set_title("Yes/No ROC")
        fig.tight_layout()
        files.append(f"{name}_roc.png")
        fig.savefig(out_dir / files[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [(n, 1000 * methods[n]["rank_s_per_user"]) for n in names if methods[n].get("rank_s_per_user")]
    ax.barh([v[0] for v in vals], [v[1] for v in vals], color="tab:orange")
    ax.set_xscale("log")
    ax.set_xlabel("ms per user (next-item ranking, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    files.append(f"{name}_latency.png")
    fig.savefig(out_dir / files[-1], dpi=110)
    plt.close(fig)
    return files


def protocol(ds: Any, cfg: BenchConfig, ex: Any, ex_valid: Any, rank_user_ids: list[str]) -> dict[str, str]:
    """The report's protocol lines, with the numbers of users and rows actually scored (`rank_users` larger than
    the users with a test target scores them all, and is said so)."""
    n_all = len(ds.targets("test"))
    subset = f"(seed {cfg.seed})" if len(rank_user_ids) < n_all else "(all of them)"
    return {
        "next_item": f"leave-one-out test, full ranking over {ds.n_items} items minus the user's history; "
        f"{len(rank_user_ids)} users {subset} for every method; baselines also on all {n_all} users (all_users_*)",
        "yesno": f"time-split test examples, fixed subset of {len(ex)} (seed {cfg.seed}), positive rate "
        f"{ex['label'].mean():.3f}; accuracy/f1 at 0.5"
        + (f", accuracy@t_valid/f1@t_valid at each method's threshold t_valid of best accuracy on a fixed subset "
           f"of {len(ex_valid)} validation examples (seed {cfg.seed})" if ex_valid is not None else ""),
    }


def run_bench(cfg: BenchConfig, command: str | None = None) -> Path:
    from llmrec.data import load_prepared
    from llmrec.ranking.explain import evidence_note

    ds = load_prepared(cfg.dataset, prepare_if_missing=True)
    ex = yesno_subset(ds, "test", cfg.yesno_examples or None, cfg.seed)
    ex_valid = yesno_subset(ds, "valid", cfg.yesno_valid_examples, cfg.seed) if cfg.yesno_valid_examples else None
    methods: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    ranks: dict[str, list[int]] = {}  # per-user target ranks, the same users in the same order for every method
    report: dict[str, Any] = {"notes": []}
    t0 = time.perf_counter()
    fitted: dict[str, Any] = {}
    if cfg.baselines:
        fitted = run_baselines(ds, cfg, ex, methods, curves, ex_valid, ranks)
    if cfg.llm:
        run_llm(ds, cfg, ex, methods, curves, report, fitted, ex_valid, ranks)
    name = f"bench_{ds.name}"
    out_dir = Path(cfg.results_dir) if cfg.results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(name, out_dir, methods, curves, ex["label"].tolist())
    best = {}
    for key in ("ndcg@10", "auc"):
        scored = {n: r[key] for n, r in methods.items() if isinstance(r.get(key), float) and not r.get("expected")}
        if scored:
            best[key] = max(scored, key=scored.get)
    goals = {}
    for key, margin in (("ndcg@10", 1.15), ("auc", 1.05)):
        tuned_name = best_tuned_rank(methods, report.get("fusion", {})) if key == "ndcg@10" else "llm tuned"
        tuned = methods.get(tuned_name, {})
        others = {n: r[key] for n, r in methods.items()
                  if not n.startswith("llm") and not r.get("expected") and isinstance(r.get(key), float)}
        if others and isinstance(tuned.get(key), float):
            other = max(others, key=others.get)
            goals[key] = {
                "tuned_llm": tuned[key],
                "tuned_name": tuned_name,
                "best_other": others[other],
                "best_other_name": other,
                "ratio": tuned[key] / others[other] if others[other] > 0 else float("inf"),
                "goal_ratio": margin,
                "met": tuned[key] >= margin * others[other],
                "rows": "users" if key == "ndcg@10" else "Yes/No test rows",
                "ci": goal_interval(key, tuned_name, other, ranks, curves, ex["label"].to_numpy(), cfg.seed),
            }
            if key == "ndcg@10":
                goals[key]["runner_up"] = runner_up(tuned_name, other, methods, report.get("fusion", {}), ranks,
                                                    cfg.seed)
    if report.get("verbalizer_vs_generate"):
        sp = report["verbalizer_vs_generate"]["speedup"]
        goals["verbalizer_speedup"] = {
            "tuned_llm": sp,
            "best_other": 1.0,
            "ratio": sp,
            "goal_ratio": 20.0,
            "met": sp >= 20.0,
        }
    rank_user_ids = ranking_targets(ds, "test", cfg.rank_users or None, cfg.seed)["user_id"].tolist()
    zs = RESULTS_DIR / "zeroshot.json"
    zs_data = json.loads(zs.read_text()) if zs.is_file() else {}
    payload = {
        "dataset": ds.name,
        "protocol": protocol(ds, cfg, ex, ex_valid, rank_user_ids),
        "config": {k: v for k, v in vars(cfg).items()},
        "methods": methods,
        "best": best,
        "goals": goals,
        "seconds": time.perf_counter() - t0,
        "plots": pngs,
        **report,
        # the table's figures; its per-row P(Yes) lists stay in zeroshot.json
        "zeroshot": [{k: v for k, v in r.items() if not isinstance(v, list)} for r in zs_data["table"]]
        if zs_data.get("table") else None,
        "zeroshot_created": zs_data.get("created"),
        # per-row results behind the table, for intervals or tests of one's own: each method's target rank per user
        # (the users in `rank_user_ids`' order) and P(Yes) per Yes/No test row (`yesno_rows`' order)
        "rank_user_ids": rank_user_ids,
        "ranks": ranks,
        "yesno_rows": ex[["user_id", "item_id", "label"]].to_dict("records"),
        "yesno_probs": {n: [round(float(p), 6) for p in v] for n, v in curves.items()},
    }
    cols = ["method", *RANK_KEYS, *YESNO_KEYS, *(THRESHOLD_KEYS if ex_valid is not None else []), "train_s",
            "rank_s_per_user"]
    rows = [{"method": n, **{k: v for k, v in r.items()}} for n, r in methods.items()]
    md = md_table(rows, cols)
    md += "\n" + "\n".join(f"![{p}]({p})" for p in pngs) + "\n"
    if goals:
        md += "\n## Goals\n" + "\n".join(goal_line(k, g) for k, g in goals.items()) + "\n"
    if report.get("verbalizer_vs_generate"):
        v = report["verbalizer_vs_generate"]
        md += (
            f"\n## verbalizer vs generate\n{v['verbalizer_s_per_user']:.2f} s/user vs {v['generate_s_per_user']:.2f}"
            f" s/user ({v['speedup']:.1f}x; the same {v['users']} test users, each mode warmed up first)\n"
        )
    if report.get("explanations"):
        md += "\n## Explanations\n" + json.dumps(report["explanations"]["metrics"]) + "\n\n"
        for e in report["explanations"]["examples"]:
            md += (
                f"- user {e['user_id']}: {', '.join(e['items'][:3])} — {e['explanation']}"
                + (" *(template fallback)*" if e["fallback"] else "")
                + evidence_note(e.get("evidence"))
                + "\n"
            )
    if payload["zeroshot"]:
        zcols = list(dict.fromkeys(k for r in payload["zeroshot"] for k in r))
        md += (f"\n## Zero-shot (a copy of eval/results/zeroshot.json as created {payload['zeroshot_created']}; "
               "`python eval/zeroshot.py` may have re-measured it since: zeroshot.md is current)\n"
               + md_table(payload["zeroshot"], zcols))
    for n in report["notes"]:
        md += f"\n> note: {n}\n"
    path = write_result(name, payload, md, command=command, results_dir=out_dir)
    if cfg.llm:
        write_ranking(ds.name, payload, command, out_dir)
    return path


def write_ranking(dataset: str, bench: dict, command: str | None, out_dir: Path) -> Path:
    """The recommender-pipeline view of a bench run: `ranking_<dataset>.{json,md}`.

    Retrieval alone, LLM rerank zero-shot and tuned, the best baseline of the same run (same users, full ranking),
    verbalizer vs generate time per user, explanation metrics and examples.
    """
    from llmrec.ranking.explain import evidence_note

    methods = bench["methods"]
    baselines = {n: r for n, r in methods.items() if not n.startswith(("llm", "retrieval")) and "ndcg@10" in r}
    rows = {n: r for n, r in methods.items() if n.startswith(("llm", "retrieval"))}
    if baselines:
        best = max(baselines, key=lambda n: baselines[n]["ndcg@10"])
        rows[f"best baseline: {best}"] = baselines[best]
    keep = ["ndcg@10", "recall@10", "hr@10", "mrr@10", "rank_s_per_user", "rank_mode", "retrieval_weight",
            "rank_adapter"]
    table = {n: {k: r[k] for k in keep if k in r} for n, r in rows.items()}
    goals = {k: v for k, v in bench.get("goals", {}).items() if k in ("ndcg@10", "verbalizer_speedup")}
    payload = {
        "dataset": dataset,
        "protocol": bench["protocol"]["next_item"],
        "methods": table,
        "verbalizer_vs_generate": bench.get("verbalizer_vs_generate"),
        "explanations": bench.get("explanations"),
        "fusion": bench.get("fusion"),
        "goals": goals,
        "source": f"bench_{dataset}.json",
    }
    md = f"Protocol: {payload['protocol']}.\n\n"
    md += md_table([{"method": n, **r} for n, r in table.items()], ["method", *keep])
    if payload["fusion"]:
        md += ("\nLLM rows rank their candidates by LLM score + retrieval_weight x log(1 / retrieval rank), the score "
               "being the candidate letter's log-prob (verbalizer) or the title's mean log-prob per token after the "
               "history (title likelihood); the weight is chosen on the **validation** split (same number of users), "
               "NDCG@10 there:\n\n")
        frows = [{"variant": lab, **{f"w={w}": m["ndcg@10"] for w, m in f["valid"].items()}, "selected": f["selected"]}
                 for lab, f in payload["fusion"].items()]
        md += md_table(frows, list(dict.fromkeys(k for r in frows for k in r)))
    v = payload["verbalizer_vs_generate"]
    if v:
        md += (
            f"\n## verbalizer vs generate (the same {v['users']} users, "
            f"{(bench.get('config') or {}).get('n_candidates', '?')} candidates)\n"
            f"verbalizer {v['verbalizer_s_per_user']:.3f} s/user, generate {v['generate_s_per_user']:.3f} s/user: "
            f"{v['speedup']:.1f}x; generate ndcg@10 {v['generate_ndcg@10']:.4f}; mapping {v.get('generate_mapping')}\n"
        )
    for k, g in goals.items():
        md += "\n" + goal_line(k, g)
    e = payload["explanations"]
    if e:
        md += "\n\n## Explanations\n" + md_table([e["metrics"]], list(e["metrics"])) + "\n"
        for x in e["examples"]:
            md += (
                f"- user {x['user_id']} -> {', '.join(x['items'][:3])}: {x['explanation']}"
                + (" *(template fallback)*" if x["fallback"] else "")
                + evidence_note(x.get("evidence"))
                + "\n"
            )
    return write_result(f"ranking_{dataset}", payload, md, command=command, results_dir=out_dir)

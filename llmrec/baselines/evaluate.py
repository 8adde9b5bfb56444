"""Evaluate a fitted baseline through the shared path (`llmrec.evaluation`): full ranking on the leave-one-out
split, and Yes/No on the time-split examples for the models that have `predict_proba`."""

from __future__ import annotations

import time
from typing import Any

from llmrec.evaluation import evaluate_ranking, evaluate_yesno, yesno_subset

RANK_KEYS = ["hr@10", "recall@10", "ndcg@10", "ndcg@20", "mrr@10", "hr@20"]
YESNO_KEYS = ["auc", "accuracy", "f1", "precision", "recall"]


def evaluate_model(model: Any, ds: Any, split: str = "test", max_users: int | None = None,
                   yesno_examples: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Ranking metrics (+ Yes/No metrics where the model has them), training time from the fit, and scoring time
    per 1,000 users (score_items calls only)."""
    spent = [0.0]

    def score(users: list[str]) -> Any:
        t0 = time.perf_counter()
        s = model.score_items(list(users), split)
        spent[0] += time.perf_counter() - t0
        return s

    r = evaluate_ranking(ds, score, split, ks=(10, 20), max_users=max_users, seed=seed, desc=model.name)
    row: dict[str, Any] = {k: r[k] for k in RANK_KEYS}
    row["n_users"] = r["n_users"]
    row["train_s"] = model.fit_info.get("train_s")
    row["infer_s_per_1k_users"] = spent[0] / max(1, r["n_users"]) * 1000.0
    if getattr(model, "yesno", False):
        ex = yesno_subset(ds, split, yesno_examples, seed)
        t0 = time.perf_counter()
        probs = model.predict_proba(ex)
        row["yesno_infer_s_per_1k_examples"] = (time.perf_counter() - t0) / max(1, len(ex)) * 1000.0
        y = evaluate_yesno(probs, ex)
        row.update({k: y[k] for k in YESNO_KEYS})
        row["yesno_n"] = y["n"]
        if hasattr(model, "cold_share"):
            row["yesno_cold_user_share"] = model.cold_share(ex)
    return row

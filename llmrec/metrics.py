"""Evaluation metrics: pure functions on numpy arrays, each with its formula.

Conventions
- Ranking metrics take `ranks`: the 1-based rank of each user's held-out item among the ranked items (history
  excluded). With one held-out item per user (leave-one-out), HR@K = Recall@K.
- Ties are broken *pessimistically*: rank = 1 + #{items scored higher} + #{other items scored equal}. A constant
  scorer therefore gets the worst rank, never the best.
- Averages are over users (every user with a target counts, including misses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


def _binary_labels(labels: Sequence[int], n: int, where: str, of: str = "scores") -> np.ndarray:
    """`labels` as a bool array, refusing another length than `n` (the scores / predictions) and any value other
    than 0 / 1 (cast to bool, a 2, a -1 or a 0.5 would all have counted as a positive)."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{where}: {y.size} labels for {n} {of}")
    if y.dtype == bool:
        return y
    try:
        f = y.astype(np.float64)
    except (TypeError, ValueError):
        f = np.full(len(y), np.nan)
    bad = np.flatnonzero((f != 0) & (f != 1))
    if bad.size:
        raise ValueError(f"{where}: labels must be 0 or 1; row {int(bad[0])} is {y[bad[0]]!r} ({bad.size} of "
                         f"{len(y)} rows)")
    return f == 1


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve.

    AUC = P(s+ > s-) + 0.5 P(s+ = s-) = (sum of positive ranks - n+(n+ + 1)/2) / (n+ n-), with average ranks for ties
    (Mann-Whitney U). NaN when only one class is present; a NaN score is an error (it would rank above every real one),
    and so are labels other than 0 / 1 and another number of labels than scores.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary_labels(labels, len(s), "auc")
    if np.isnan(s).any():
        raise ValueError(f"auc: {int(np.isnan(s).sum())} of {len(s)} scores are NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_auc(labels: Sequence[int], scores: Sequence[float], strata: Sequence) -> float:
    """AUC within strata, averaged with weights n+_s n-_s (the pairs each stratum compares).

    AUC_strat = sum_s n+_s n-_s AUC_s / sum_s n+_s n-_s: the share of (positive, negative) pairs *from the same
    stratum* that `scores` order correctly (ties count 0.5). With strata = bins of a reference score it asks what a
    score tells apart among rows the reference rates alike. Strata holding one class compare no pair and drop out;
    NaN when none holds both.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary_labels(labels, len(s), "stratified_auc")
    g = np.asarray(strata)
    if len(g) != len(s):
        raise ValueError(f"stratified_auc: {len(g)} strata for {len(s)} scores")
    num = den = 0.0
    for key in np.unique(g):
        m = g == key
        n_pos, n_neg = int(y[m].sum()), int((~y[m]).sum())
        if n_pos and n_neg:
            num += n_pos * n_neg * auc(y[m], s[m])
            den += n_pos * n_neg
    return num / den if den else float("nan")


def logit(p: Sequence[float], eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps], so a probability of exactly 0 or 1 stays finite: the scale
    on which P(Yes) scores are fused with other scores or blended."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(q / (1 - q))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties share their mean rank),
    rho = cov(rank a, rank b) / (sd(rank a) sd(rank b)). NaN when either side is constant."""
    ra, rb = (_average_ranks(np.asarray(x, dtype=np.float64)) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of `s`, tie groups given their mean rank."""
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def confusion(labels: Sequence[int], preds: Sequence[int]) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) of binary predictions (labels other than 0 / 1, or another number of them than of
    predictions, are an error)."""
    p = np.asarray(preds).astype(bool).reshape(-1)
    y = _binary_labels(labels, len(p), "confusion", "predictions")
    return int((y & p).sum()), int((~y & p).sum()), int((~y & ~p).sum()), int((y & ~p).sum())


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Accuracy = (TP + TN) / N."""
    tp, fp, tn, fn = confusion(labels, preds)
    n = tp + fp + tn + fn
    return (tp + tn) / n if n else float("nan")


def precision(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Precision = TP / (TP + FP); 0 when nothing is predicted positive."""
    tp, fp, _, _ = confusion(labels, preds)
    return tp / (tp + fp) if tp + fp else 0.0


def recall(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Recall = TP / (TP + FN); 0 when there are no positives."""
    tp, _, _, fn = confusion(labels, preds)
    return tp / (tp + fn) if tp + fn else 0.0


def f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """F1 = 2 P R / (P + R) = 2 TP / (2 TP + FP + FN); 0 when TP = 0."""
    tp, fp, _, fn = confusion(labels, preds)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def classification_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """AUC on the scores, and accuracy / precision / recall / F1 of `probs >= threshold`."""
    preds = (np.asarray(probs, dtype=np.float64) >= threshold).astype(int)
    return {
        "n": int(len(labels)),
        "auc": auc(labels, probs),
        "accuracy": accuracy(labels, preds),
        "precision": precision(labels, preds),
        "recall": recall(labels, preds),
        "f1": f1(labels, preds),
    }


def best_threshold(labels: Sequence[int], probs: Sequence[float]) -> float:
    """The decision threshold that maximises accuracy on (labels, probs), to be chosen on a validation split and
    applied to the test split.

    Candidates are 0.5 and the midpoints between consecutive distinct scores (plus one below the lowest and one above
    the highest); t* = argmax_t mean(1[p_i >= t] == y_i); ties go to the candidate closest to 0.5, then the lower one.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.size == 0:
        return 0.5
    u = np.unique(p)
    cands = np.unique(np.concatenate([[0.5, u[0] - 1e-9, u[-1] + 1e-9], (u[:-1] + u[1:]) / 2]))
    acc = np.array([np.mean((p >= t).astype(np.int64) == y) for t in cands])
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


def metrics_at_valid_threshold(valid_labels: Sequence[int], valid_probs: Sequence[float], test_labels: Sequence[int],
                               test_probs: Sequence[float]) -> dict[str, float]:
    """Accuracy / precision / recall / F1 on the test scores at t* = best_threshold(valid): the fixed 0.5 assumes a
    calibrated P(Yes), which a briefly tuned LLM (or any scorer trained on another label balance) is not. Returns
    `threshold` = t* with the four test metrics at it."""
    t = best_threshold(valid_labels, valid_probs)
    m = classification_metrics(test_labels, test_probs, threshold=t)
    return {"threshold": t, **{k: float(m[k]) for k in ("accuracy", "precision", "recall", "f1")}}


# --------------------------------------------------------------------------------------------------- ranking
def ranks_from_scores(
    scores: np.ndarray, targets: np.ndarray, exclude: Iterable[Sequence[int]] | None = None
) -> np.ndarray:
    """1-based pessimistic rank of `targets[u]` in row `scores[u]`, ignoring the item indices in `exclude[u]`.

    rank_u = 1 + |{j not excluded, j != t_u : s_uj >= s_ut}|. NaN scores count as -inf. A target that is itself
    excluded is a caller bug and raises, and so is an `exclude` with another number of rows than `scores` (rows
    left without their exclusions would rank history items), and an item index outside 0..n_items-1 (numpy would
    wrap a negative one around to another item).
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    s[np.isnan(s)] = -np.inf
    t = np.asarray(targets, dtype=np.int64)
    if s.ndim != 2 or len(t) != s.shape[0]:
        raise ValueError(f"ranks_from_scores: {len(t)} targets for scores of shape {s.shape}")
    n_items = s.shape[1]
    rows = np.arange(len(t))
    # a negative index would wrap around to another item (numpy), silently ranking or excluding the wrong one
    out = np.flatnonzero((t < 0) | (t >= n_items))
    if out.size:
        raise ValueError(f"row {int(out[0])}: target item index {int(t[out[0]])} is outside 0..{n_items - 1}")
    if exclude is not None:
        exclude = list(exclude)
        if len(exclude) != len(t):
            raise ValueError(f"ranks_from_scores: {len(exclude)} exclude lists for {len(t)} rows")
        for u, ex in enumerate(exclude):
            ex = np.asarray(ex, dtype=np.int64)
            if ex.size:
                if ex.min() < 0 or ex.max() >= n_items:
                    bad = int(ex[(ex < 0) | (ex >= n_items)][0])
                    raise ValueError(f"row {u}: excluded item index {bad} is outside 0..{n_items - 1}")
                if np.any(ex == t[u]):
                    raise ValueError(f"row {u}: the target item {t[u]} is in the excluded (history) items")
                s[u, ex] = np.nan
    ts = s[rows, t][:, None]
    with np.errstate(invalid="ignore"):
        ge = (s >= ts) & ~np.isnan(s)
    return ge.sum(axis=1).astype(np.int64)  # the target itself is counted once: that is the "1 +"


def _ranks(ranks: np.ndarray) -> np.ndarray:
    """`ranks` as floats, checked: 1-based (a rank of 0 would divide NDCG by log2(1) = 0), finite, one per user. No
    users give NaN for every metric below (a mean over nothing), without numpy's RuntimeWarning."""
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(r) | (r < 1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"ranks must be finite and >= 1 (1 = first); user {j} of {r.size} has {r[j]:g}")
    return r


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """HR@K = (1/|U|) sum_u 1[rank_u <= K]."""
    return _mean(_ranks(ranks) <= k)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Recall@K = (1/|U|) sum_u |relevant_u in top K| / |relevant_u|. One target per user (leave-one-out): equals
    HR@K."""
    return _mean(_ranks(ranks) <= k)


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@K with one relevant item: (1/|U|) sum_u 1[rank_u <= K] / log2(rank_u + 1) (IDCG = 1)."""
    r = _ranks(ranks)
    return _mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0))


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    """MRR@K = (1/|U|) sum_u 1[rank_u <= K] / rank_u."""
    r = _ranks(ranks)
    return _mean(np.where(r <= k, 1.0 / r, 0.0))


def random_order_metrics(n: int, k: int = 10) -> dict[str, float]:
    """Expected HR@K / NDCG@K / MRR@K of a uniformly random order of `n` candidates holding the one target (the
    chance level of a reranker): rank r has probability 1/n, so HR@K = min(n, K) / n,
    NDCG@K = (1/n) sum_{r<=min(n,K)} 1 / log2(r + 1), MRR@K = (1/n) sum_{r<=min(n,K)} 1 / r."""
    if n < 1 or k < 1:
        raise ValueError(f"random_order_metrics: n (candidates) and k must be >= 1, got n={n}, k={k}")
    r = np.arange(1, min(n, k) + 1, dtype=np.float64)
    return {f"hr@{k}": float(len(r) / n), f"ndcg@{k}": float(np.sum(1.0 / np.log2(r + 1.0)) / n),
            f"mrr@{k}": float(np.sum(1.0 / r) / n)}


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """hr@K, recall@K, ndcg@K, mrr@K for each K, plus the number of users."""
    out: dict[str, float] = {"n_users": int(len(ranks))}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
        out[f"mrr@{k}"] = mrr_at_k(ranks, k)
    return out


# --------------------------------------------------------------------------------------------------- uncertainty
def paired_bootstrap_ratio(
    metric: Callable[[np.ndarray], float],
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Paired percentile bootstrap of metric(a) / metric(b), for two methods scored on the same rows (users or
    examples): row i of `a` and row i of `b` belong to the same user / example.

    Each of `n_boot` replicates draws n row indices with replacement (seeded), the same indices for both methods,
    and computes r* = metric(a[idx]) / metric(b[idx]); the interval is the ((1 - level) / 2, (1 + level) / 2)
    quantiles of r* (non-finite replicates are dropped: NaN, e.g. a one-class AUC resample or 0/0, and inf, where
    metric(b[idx]) = 0 < metric(a[idx]), which makes the interval and `p_ge_1` conservative for method a). Also
    returned: the point ratio, `p_ge_1` = the share of the kept replicates with r* >= 1 (how often method a comes out
    at least as good: a tie counts), `p_gt_1` = the share with r* > 1 (how often method a comes out *ahead*; two
    methods with the same per-row results get p_ge_1 = 1 but p_gt_1 = 0), `n` and `n_boot` = the replicates kept.
    For a per-user ranking metric pass the ranks (metric = lambda r: ndcg_at_k(r, 10)); for AUC pass
    np.column_stack([labels, scores]) (metric = lambda m: auc(m[:, 0], m[:, 1])).
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs the same rows for both methods: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("paired bootstrap of zero rows")
    rng = np.random.default_rng(seed)
    n = len(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.float64(metric(a)) / np.float64(metric(b))
        reps = np.array([np.float64(metric(a[idx])) / np.float64(metric(b[idx]))
                         for idx in rng.integers(0, n, size=(n_boot, n))])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if reps.size else (np.nan, np.nan)
    return {"ratio": float(point), "lo": float(lo), "hi": float(hi), "level": level,
            "p_ge_1": float(np.mean(reps >= 1.0)) if reps.size else float("nan"),
            "p_gt_1": float(np.mean(reps > 1.0)) if reps.size else float("nan"), "n": n, "n_boot": int(reps.size)}


def paired_auc_ratio(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float],
                     **kw: Any) -> dict[str, float]:
    """`paired_bootstrap_ratio` of AUC(scores_a) / AUC(scores_b) over the same labelled rows (row i of each is the
    same example); `kw` passes n_boot, seed and level through."""
    y = np.asarray(labels, dtype=np.float64)
    return paired_bootstrap_ratio(lambda m: auc(m[:, 0], m[:, 1]), np.column_stack([y, np.asarray(scores_a)]),
                                  np.column_stack([y, np.asarray(scores_b)]), **kw)

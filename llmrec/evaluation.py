"""The one evaluation path every model goes through: full ranking over all items minus the user's history
(the headline), or the *sampled* protocol with the fixed negatives saved with the split (labelled as such)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llmrec.data.prepare import PreparedDataset
from llmrec.metrics import classification_metrics, ranking_metrics, ranks_from_scores

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[str]], np.ndarray]  # user ids -> [n_users, n_items] scores in dataset item order


HISTORY_SPLITS = {"valid": ("train",), "test": ("train", "valid"), "all": ("train", "valid", "test")}


def history_indices(ds: PreparedDataset, user_ids: Sequence[str],
                    split: Literal["valid", "test", "all"]) -> list[np.ndarray]:
    """Item indices each user has seen before the target of `split` (test: train+valid; valid: train; all: every
    event, as when serving). Any other `split` is an error, not a silent fallback to one of these rules."""
    if split not in HISTORY_SPLITS:
        raise ValueError(f"history_indices: split must be one of {sorted(HISTORY_SPLITS)}, got {split!r}")
    keep = HISTORY_SPLITS[split]
    df = ds.interactions[ds.interactions["split"].isin(keep)]
    by_user = df.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
    return [np.array([ds.item_index[i] for i in by_user.get(u, [])], dtype=np.int64) for u in user_ids]


def ranking_targets(ds: PreparedDataset, split: str = "test", max_users: int | None = None,
                    seed: int = 0) -> pd.DataFrame:
    """The leave-one-out targets `evaluate_ranking` scores: all of `split`'s, or a fixed seeded subset of `max_users`
    users (in the targets' order, the same for every method)."""
    targets = ds.targets(split)
    if max_users is not None and max_users < len(targets):
        targets = targets.sample(n=max_users, random_state=seed).sort_index()
    return targets


def sampled_label(n_negatives: Sequence[int]) -> str:
    """The protocol label of a sampled evaluation from each scored user's number of fixed negatives: "sampled (99
    fixed negatives)", or their range when users have different numbers (a user who has met nearly the whole
    catalogue gets fewer; one with none ranks the target first by construction), so that the label never states
    the first user's count for all."""
    if not len(n_negatives):
        return "sampled (0 fixed negatives)"
    lo, hi = int(min(n_negatives)), int(max(n_negatives))
    if lo == hi:
        return f"sampled ({lo} fixed negatives)"
    return f"sampled ({lo}-{hi} fixed negatives per user)"


def evaluate_ranking(
    ds: PreparedDataset,
    score_fn: ScoreFn,
    split: Literal["valid", "test"] = "test",
    ks: Sequence[int] = (10, 20),
    mode: Literal["full", "sampled"] = "full",
    batch_users: int = 256,
    max_users: int | None = None,
    seed: int = 0,
    desc: str = "rank",
    return_ranks: bool = False,
) -> dict:
    """Leave-one-out ranking metrics for `score_fn`.

    full: every catalogue item is ranked, the user's earlier items are excluded. sampled: the target is ranked
    against the fixed negatives saved with the split (test only); the result carries `"protocol": "sampled"`.
    `max_users` evaluates a fixed, seeded subset of users (recorded in the result). `return_ranks`: the target's rank
    per user is left in the result too (`ranks`, in `ranking_targets`' user order, the same for every method at the
    same seed, so two methods' ranks pair up for a paired bootstrap, llmrec.metrics.paired_bootstrap_ratio).
    """
    if mode not in ("full", "sampled"):
        raise ValueError(f"evaluate_ranking: mode must be 'full' or 'sampled', got {mode!r}")
    if split not in ("valid", "test"):
        raise ValueError(f"evaluate_ranking: split must be 'valid' or 'test', got {split!r}")
    targets = ranking_targets(ds, split, max_users, seed)
    users = targets["user_id"].tolist()
    t_idx = np.array([ds.item_index[i] for i in targets["item_id"]], dtype=np.int64)
    hist = history_indices(ds, users, split)
    ranks = np.zeros(len(users), dtype=np.int64)
    if mode == "sampled":
        if split != "test":
            raise ValueError("sampled negatives are saved for the test split only")
        negs = ds.negatives.set_index("user_id")["negatives"].to_dict()
    for b in tqdm(range(0, len(users), batch_users), desc=desc, leave=False, disable=len(users) <= batch_users):
        ub = users[b : b + batch_users]
        scores = np.asarray(score_fn(ub), dtype=np.float64)
        if scores.shape != (len(ub), ds.n_items):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected {(len(ub), ds.n_items)}")
        if mode == "full":
            ranks[b : b + len(ub)] = ranks_from_scores(scores, t_idx[b : b + len(ub)], hist[b : b + len(ub)])
        else:
            for j, u in enumerate(ub):
                cand = np.array([t_idx[b + j]] + [ds.item_index[i] for i in negs[u]], dtype=np.int64)
                ranks[b + j] = ranks_from_scores(scores[j : j + 1, cand], np.array([0]))[0]
    out = ranking_metrics(ranks, ks)
    out["protocol"] = "full" if mode == "full" else sampled_label([len(negs[u]) for u in users])
    out["split"] = split
    if max_users is not None:
        out["user_subset"] = {"n": len(users), "seed": seed}
    if return_ranks:
        out["ranks"] = ranks.tolist()
    return out


def yesno_subset(
    ds: PreparedDataset, split: str = "test", max_examples: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The Yes/No examples of `split`, or a fixed seeded subset of them (the same rows for every method)."""
    df = ds.yesno[ds.yesno["split"] == split]
    if max_examples is not None and max_examples < len(df):
        df = df.sample(n=max_examples, random_state=seed).sort_index()
    return df


def evaluate_yesno(probs: Sequence[float], examples: pd.DataFrame, threshold: float = 0.5) -> dict:
    """AUC / accuracy / precision / recall / F1 of P(Yes) against the examples' labels. With labels of one class
    (a small subset) the AUC is NaN: that is logged as a warning rather than left to surface as a NaN in a table."""
    labels = examples["label"].to_numpy()
    out = classification_metrics(labels, np.asarray(probs), threshold)
    if len(labels) and len(np.unique(labels)) < 2:
        log.warning("evaluate_yesno: the %d examples all have label %s; AUC is undefined (NaN)", len(labels),
                    labels[0])
    return out

"""How other users reacted to an item *before* a point in time: the leak-free item feature that the `yesno_stats`
prompt shows next to the target ("61% of 148 earlier ratings were likes").

Which time a row may see (`feature_time`): a training row sees everything strictly before its own timestamp; a
validation or test row sees only what was known at its split's cut-off (`manifest["yesno_cutoffs"]`: `t_valid`,
`t_test`), the moment a model would be frozen. So no valid/test interaction ever reaches a training prompt, and no
other user's test-period interaction reaches a test prompt's feature.

The user's own side is the row's history (`hist_*`: the <= 10 events before the row, TALLRec's protocol) and the
prompt's like count (`{user_stats}`) summarises the same events: for a valid/test row those are mostly events of its
own split period (96% of the history events of ML-100K's test rows are at or after `t_test`), each earlier in the
user's sequence (time, then file order) than the row, never the row itself. They are the user's feedback before the
question, as a frozen model would read it from the event store; the history lines list the same likes one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ItemFeedback:
    """`n` earlier interactions with an item, `liked` of them positive (label 1)."""

    n: int
    liked: int

    @property
    def rate(self) -> float | None:
        return self.liked / self.n if self.n else None


class ItemFeedbackStats:
    """Per-item time-sorted labels with cumulative counts: `at(item, before)` is two binary searches."""

    def __init__(self, interactions: pd.DataFrame):
        missing = {"item_id", "timestamp", "label"} - set(interactions.columns)
        if missing:
            raise ValueError(f"ItemFeedbackStats: interactions lack column(s) {sorted(missing)}")
        df = interactions[["item_id", "timestamp", "label"]].sort_values(["item_id", "timestamp"], kind="stable")
        self._ts: dict[str, np.ndarray] = {}
        self._cum: dict[str, np.ndarray] = {}
        for item, g in df.groupby("item_id", sort=False):
            self._ts[str(item)] = g["timestamp"].to_numpy(np.int64)
            self._cum[str(item)] = np.concatenate([[0], np.cumsum(g["label"].to_numpy(np.int64))])

    def at(self, item_id: str, before: int | None = None) -> ItemFeedback:
        """Interactions with `item_id` strictly before `before` (all of them when None)."""
        ts = self._ts.get(str(item_id))
        if ts is None:
            return ItemFeedback(0, 0)
        k = len(ts) if before is None else int(np.searchsorted(ts, int(before), side="left"))
        return ItemFeedback(k, int(self._cum[str(item_id)][k]))

    @classmethod
    def from_dataset(cls, ds: Any) -> ItemFeedbackStats:
        got = getattr(ds, "_item_feedback_stats", None)
        if got is None:
            got = cls(ds.interactions)
            try:
                ds._item_feedback_stats = got
            except AttributeError:  # a read-only stand-in: no cache
                pass
        return got


def feature_time(timestamp: int, split: str, cutoffs: dict[str, int] | None) -> int:
    """The time a Yes/No row's features may see up to (exclusive); see the module docstring."""
    if split == "train" or not cutoffs:
        return int(timestamp)
    key = {"valid": "t_valid", "test": "t_test"}.get(split)
    if key is None:
        raise ValueError(f"feature_time: unknown split {split!r} (train/valid/test)")
    return min(int(timestamp), int(cutoffs[key]))


def yesno_row_feedback(ds: Any, rows: pd.DataFrame) -> list[ItemFeedback]:
    """`ItemFeedback` of each Yes/No row's target, as of the row's `feature_time`. `rows` must say each row's
    `split` (rows of `ds.yesno` do): without it a valid/test row would be counted as a train row, up to its own
    time, i.e. with the events of the valid/test period."""
    if "split" not in rows.columns:
        raise ValueError("yesno_row_feedback: rows without a 'split' column (train/valid/test); pass rows of ds.yesno")
    stats = ItemFeedbackStats.from_dataset(ds)
    cut = ds.manifest.get("yesno_cutoffs") if hasattr(ds, "manifest") else None
    split = rows["split"]
    return [
        stats.at(str(i), feature_time(int(t), str(s), cut))
        for i, t, s in zip(rows["item_id"], rows["timestamp"], split)
    ]


def counts_estimate(item_n: int, item_liked: int, user_known: int, user_liked: int) -> float:
    """The no-fitting estimate of P(Yes) from the two counts (see `counts_only_p_yes`): sigmoid of the summed logits
    of the Laplace-smoothed rates (liked_i + 1) / (n_i + 2) and (likes_u + 1) / (k_u + 2)."""
    r_i = (item_liked + 1.0) / (item_n + 2.0)
    r_u = (user_liked + 1.0) / (user_known + 2.0)
    z = float(np.log(r_i / (1 - r_i)) + np.log(r_u / (1 - r_u)))
    return 1.0 / (1.0 + float(np.exp(-z)))


def counts_only_p_yes(ds: Any, rows: pd.DataFrame) -> np.ndarray:
    """A no-model reference for Yes/No rows: the two counts the `yesno_stats` prompt shows, combined with no fitting.
    p = sigmoid(logit((liked_i + 1) / (n_i + 2)) + logit((likes_u + 1) / (k_u + 2))), where liked_i / n_i are other
    users' likes / ratings of the target as of `feature_time` and likes_u / k_u the user's likes / reactions in the
    row's history (Laplace-smoothed rates; their logits add as in naive Bayes). Tells how much of an LLM's AUC the two
    numbers alone already give; the `yesno_estimate` prompt shows this figure (`{estimate}`)."""
    fb = yesno_row_feedback(ds, rows)
    return np.array([counts_estimate(f.n, f.liked, len(h), int(np.sum(h))) for f, h in zip(fb, rows["hist_labels"])])

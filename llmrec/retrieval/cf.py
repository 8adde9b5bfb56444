"""A small item-item collaborative retriever (cosine co-occurrence over training sequences), used by the hybrid
retriever when no baseline model is given. Fitted on the `train` split only, so neither valid nor test targets
are ever seen; a user's score is the recency-weighted sum of the similarity rows of their history items, which
works for any history (including one from an event store), not only for known users."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmrec.retrieval.text import HistoryLike, as_events, split_history

log = logging.getLogger(__name__)


class ItemCF:
    name = "itemcf"

    def __init__(self, recency_half_life: float = 10.0, disliked_weight: float = 0.5, shrink: float = 10.0,
                 window: int | None = None):
        self.half_life = recency_half_life
        self.disliked_weight = disliked_weight
        self.shrink = shrink  # cosine shrinkage: sim = co / (sqrt(n_i n_j) + shrink)
        self.window = window  # co-occurrence only within this many positions (None: whole sequence)
        self.ds: Any = None
        self.sim: Any = None

    def fit(self, ds: Any, **_: Any) -> ItemCF:
        from scipy import sparse

        tr = ds.interactions[ds.interactions["split"] == "train"]
        rows = tr["user_id"].astype("category").cat.codes.to_numpy()
        cols = np.array([ds.item_index[i] for i in tr["item_id"]], dtype=np.int64)
        n_users = int(rows.max()) + 1 if len(rows) else 0
        x = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, ds.n_items))
        x.data[:] = 1.0
        co = (x.T @ x).tocsr().astype(np.float32)
        co.setdiag(0)
        co.eliminate_zeros()
        cnt = np.asarray(x.sum(0)).ravel().astype(np.float32)
        co = co.tocoo()
        vals = co.data / (np.sqrt(cnt[co.row] * cnt[co.col]) + self.shrink)
        self.sim = sparse.csr_matrix((vals.astype(np.float32), (co.row, co.col)), shape=co.shape)
        pop = cnt.astype(np.float64)
        self._pop = pop / (pop.max() or 1.0)
        self.ds = ds
        log.info("ItemCF: %d items, %d similarity entries", ds.n_items, self.sim.nnz)
        return self

    def score_history(self, history: HistoryLike) -> np.ndarray:
        """[n_items] scores for any history; a tiny popularity term breaks ties and covers cold start."""
        if self.sim is None:
            raise RuntimeError("ItemCF: call fit(ds) first")
        ev = [(self.ds.item_index[i], liked) for i, liked in as_events(history) if i in self.ds.item_index]
        s = 1e-6 * self._pop
        if not ev:
            return s
        n = len(ev)
        age = np.arange(n - 1, -1, -1, dtype=np.float64)
        w = 0.5 ** (age / self.half_life) if self.half_life else np.ones(n)
        w = w * np.array([self.disliked_weight if liked is False else 1.0 for _, liked in ev])
        wv = np.zeros(self.ds.n_items, dtype=np.float32)
        np.add.at(wv, [j for j, _ in ev], w.astype(np.float32))
        return s + np.asarray(self.sim.T @ wv).ravel()

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        return np.stack([self.score_history(split_history(self.ds, u, split)) for u in user_ids])

    def query(self, history: HistoryLike, k: int = 20, exclude: set[str] | None = None) -> list[tuple[str, float]]:
        events = as_events(history)
        exclude = set(exclude) if exclude is not None else {i for i, _ in events}
        s = self.score_history(events)
        ids = self.ds.item_ids
        out = []
        for j in np.argsort(-s, kind="stable"):
            if str(ids[j]) not in exclude:
                out.append((str(ids[j]), float(s[j])))
                if len(out) >= k:
                    break
        return out

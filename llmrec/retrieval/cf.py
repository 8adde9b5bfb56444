"""A small item-item collaborative retriever (cosine co-occurrence over training sequences), used by the hybrid
retriever when no baseline model is given. Fitted on the `train` split only, so neither valid nor test targets
are ever seen; a user's score is the recency-weighted sum of the similarity rows of their history items, which
works for any history (including one from an event store), not only for known users."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmrec.retrieval.text import HistoryLike, as_events, split_history, top_unseen

log = logging.getLogger(__name__)


class ItemCF:
    name = "itemcf"

    def __init__(self, recency_half_life: float = 3.0, disliked_weight: float = 0.5, shrink: float = 10.0,
                 dense_max_items: int = 6000):
        self.half_life = recency_half_life
        self.disliked_weight = disliked_weight
        self.shrink = shrink  # cosine shrinkage: sim = co / (sqrt(n_i n_j) + shrink)
        self.dense_max_items = dense_max_items
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
        # a dense copy for catalogues up to `dense_max_items` (ML-1M: 3.7k items = 55 MB): BLAS batch scoring
        self._dense = self.sim.toarray() if ds.n_items <= self.dense_max_items else None
        pop = cnt.astype(np.float64)
        self._pop = pop / (pop.max() or 1.0)
        self.ds = ds
        log.info("ItemCF: %d items, %d similarity entries", ds.n_items, self.sim.nnz)
        return self

    def score_history(self, history: HistoryLike) -> np.ndarray:
        """[n_items] scores for any history; a tiny popularity term breaks ties and covers cold start."""
        if self.sim is None:
            raise RuntimeError("ItemCF: call fit(ds) first")
        w = self._weights(history)
        s = w @ self._dense if self._dense is not None else self.sim.T @ w  # sim is symmetric
        return 1e-6 * self._pop + np.asarray(s, dtype=np.float64).ravel()

    def _weights(self, history: HistoryLike) -> np.ndarray:
        ev = [(self.ds.item_index[i], liked) for i, liked in as_events(history) if i in self.ds.item_index]
        wv = np.zeros(self.ds.n_items, dtype=np.float32)
        if ev:
            n = len(ev)
            age = np.arange(n - 1, -1, -1, dtype=np.float64)
            w = 0.5 ** (age / self.half_life) if self.half_life else np.ones(n)
            w = w * np.array([self.disliked_weight if liked is False else 1.0 for _, liked in ev])
            np.add.at(wv, [j for j, _ in ev], w.astype(np.float32))
        return wv

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        """[n_users, n_items] scores from each user's history allowed for `split` (one matrix product)."""
        if self.sim is None:
            raise RuntimeError("ItemCF: call fit(ds) first")
        w = np.stack([self._weights(split_history(self.ds, u, split)) for u in user_ids])
        s = w @ self._dense if self._dense is not None else np.asarray(self.sim.T.dot(w.T).T)  # sim is symmetric
        return np.asarray(s, dtype=np.float64) + 1e-6 * self._pop

    def query(self, history: HistoryLike, k: int = 20, exclude: set[str] | None = None) -> list[tuple[str, float]]:
        events = as_events(history)
        exclude = set(exclude) if exclude is not None else {i for i, _ in events}
        s = self.score_history(events)
        return top_unseen(s, self.ds.item_ids, exclude, k)

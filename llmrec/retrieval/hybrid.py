"""Hybrid retrieval: the text retriever's ranking fused with a collaborative model's ranking by reciprocal rank
fusion, score(i) = sum_m w_m / (rrf_k + rank_m(i)) with rank 1 = best among the user's unseen items."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmrec.retrieval.text import HistoryLike, TextRetriever, as_events, check_k, top_unseen

log = logging.getLogger(__name__)


def row_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each column within its row of `scores` by descending score; ties keep column order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :].repeat(len(scores), 0), axis=1)
    return ranks


def tied_row_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each column within its row by descending score, tied columns sharing their mean rank (NaN
    ranks last, as -inf: the metrics read it so). Unlike `row_ranks` no column order decides between equal scores."""
    from scipy.stats import rankdata

    s = np.array(scores, dtype=np.float64, copy=True)
    s[np.isnan(s)] = -np.inf
    return rankdata(-s, method="average", axis=1) if s.size else np.zeros(s.shape)


def check_rrf(weights: Sequence[float], n_inputs: int, rrf_k: float, depth: int | None = None,
              who: str = "rrf_fuse") -> None:
    """Refuse fusion settings that would silently drop an input (a weight count other than the inputs': `zip`
    stopped at the shorter) or break the formula (rrf_k < 0, a non-finite or negative weight, depth < 1)."""
    if len(weights) != n_inputs:
        raise ValueError(f"{who}: {len(weights)} weights for {n_inputs} rankings (weights={tuple(weights)}); give one "
                         "weight per ranking")
    bad = [w for w in weights if not (np.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"{who}: weights must be finite and >= 0, got {tuple(weights)}")
    if not (np.isfinite(rrf_k) and rrf_k >= 0):
        raise ValueError(f"{who}: rrf_k must be finite and >= 0, got {rrf_k}")
    if depth is not None and (isinstance(depth, bool) or int(depth) != depth or depth < 1):
        raise ValueError(f"{who}: depth must be None (every item) or an integer >= 1, got {depth!r}")


def check_same_catalogue(models: Sequence[Any], who: str) -> None:
    """Every model that tells its dataset (`.ds`) must rank the same catalogue, in the same item order: fused scores
    and list positions are read by item index, so another catalogue would pair scores with the wrong items."""
    known = [(m, m.ds) for m in models if getattr(m, "ds", None) is not None]
    for m, ds in known[1:]:
        ref_m, ref = known[0]
        if ds is not ref and not np.array_equal(np.asarray(ds.item_ids), np.asarray(ref.item_ids)):
            raise ValueError(f"{who}: {type(m).__name__} was built on {getattr(ds, 'name', '?')} ({ds.n_items} items) "
                             f"but {type(ref_m).__name__} on {getattr(ref, 'name', '?')} ({ref.n_items} items): "
                             "their catalogues differ")


def rrf_fuse(score_mats: list[np.ndarray], weights: Sequence[float] | None = None, rrf_k: float = 60.0,
             exclude: list[np.ndarray] | None = None, depth: int | None = None) -> np.ndarray:
    """Fuse [n_users, n_items] score matrices by reciprocal rank fusion. Items in `exclude[u]` (indices) are
    ranked last in every input (so ranks count unseen items only) and get a fused score of -inf. With `depth`,
    only each input's top-`depth` items count (as in `HybridRetriever.query`); the deeper ranks only break ties
    (weight 1e-6), so the full ranking stays defined. Items an input scores alike share their mean rank there
    (`tied_row_ranks`): a model that cannot tell them apart gives them equal votes, and a model that scores every
    item alike leaves the fused scores tied (which the metrics count against the target), where ranks in catalogue
    order would have ranked the first items of the catalogue top."""
    if not len(score_mats):
        raise ValueError("rrf_fuse: no score matrices to fuse")
    weights = list(weights) if weights is not None else [1.0] * len(score_mats)
    check_rrf(weights, len(score_mats), rrf_k, depth)
    shape = np.shape(score_mats[0])
    for m, s in enumerate(score_mats):
        if len(np.shape(s)) != 2 or np.shape(s) != shape:
            raise ValueError(f"rrf_fuse: score matrix {m} has shape {np.shape(s)}, matrix 0 {shape}: every input must "
                             "be [n_users, n_items] for the same users and items")
    if exclude is not None and len(exclude) != shape[0]:
        raise ValueError(f"rrf_fuse: exclude lists {len(exclude)} users, the score matrices {shape[0]}")
    out = np.zeros(shape, dtype=np.float64)
    for w, s in zip(weights, score_mats):
        s = np.array(s, dtype=np.float64, copy=True)
        if exclude is not None:
            for u, ex in enumerate(exclude):
                s[u, ex] = -np.inf
        ranks = tied_row_ranks(s)
        contrib = w / (rrf_k + ranks)
        out += contrib if depth is None else np.where(ranks <= depth, contrib, 1e-6 * contrib)
    if exclude is not None:
        for u, ex in enumerate(exclude):
            out[u, ex] = -np.inf
    return out


class HybridRetriever:
    """`TextRetriever` + any collaborative model with `score_items(user_ids, split)` (a baseline), fused by RRF.

    For `query(history, ...)` on an arbitrary history the collaborative side needs `score_history(history)` (as
    `ItemCF` has) or `query(history, k, exclude)`; a model with only `score_items` is used when `user_id` is passed,
    otherwise the query falls back to the text ranking (logged once).

    `weights` = (text, collaborative); the default (0.5, 1.0) is what the validation splits of ML-100K / ML-1M
    preferred (eval/retrieval.py): the text ranking is much weaker than the collaborative one on MovieLens, and
    equal weights lose Recall@20 there."""

    name = "hybrid"

    def __init__(self, text: TextRetriever, cf_model: Any, rrf_k: float = 60.0, weights: Sequence[float] = (0.5, 1.0),
                 depth: int | None = 200):
        check_rrf(tuple(weights), 2, rrf_k, depth, who="HybridRetriever (weights = (text, collaborative))")
        check_same_catalogue([text, cf_model], "HybridRetriever")
        self.text = text
        self.cf = cf_model
        self.rrf_k = rrf_k
        self.weights = tuple(weights)
        self.depth = depth  # list length fused per side in query()
        self._warned = False

    @classmethod
    def default(cls, ds: Any, text: TextRetriever | None = None, **kw: Any) -> HybridRetriever:
        """Text retriever (built if not given) + `ItemCF` fitted on the training split."""
        from llmrec.retrieval.cf import ItemCF

        text = text if text is not None else TextRetriever().build(ds)
        if text.ds is None:
            text.build(ds)
        return cls(text, ItemCF().fit(ds), **kw)

    @property
    def ds(self) -> Any:
        return self.text.ds

    def _cf_list(self, events: list, depth: int, exclude: set[str], user_id: str | None,
                 split: str) -> list[tuple[str, float]] | None:
        ids = self.ds.item_ids
        if hasattr(self.cf, "score_history"):
            s = np.asarray(self.cf.score_history(events))
        elif user_id is not None:
            s = np.asarray(self.cf.score_items([user_id], split))[0]
        elif hasattr(self.cf, "query"):
            return list(self.cf.query(events, k=depth, exclude=exclude))
        else:
            if not self._warned:
                log.warning("HybridRetriever: %s scores known users only; history queries use the text ranking",
                            type(self.cf).__name__)
                self._warned = True
            return None
        return top_unseen(s, ids, exclude, depth)

    def query(self, history: HistoryLike, k: int = 20, exclude: set[str] | None = None, *,
              user_id: str | None = None, split: str = "test") -> list[tuple[str, float]]:
        """Top-k unseen items: RRF of the top-`depth` text and collaborative lists."""
        k = check_k(k, "HybridRetriever.query")
        events = as_events(history)
        exclude = set(exclude) if exclude is not None else {i for i, _ in events}
        depth = max(self.depth or self.ds.n_items, k)
        lists = [self.text.query(events, depth, exclude)]
        cf = self._cf_list(events, depth, exclude, user_id, split)
        if cf is not None:
            lists.append(cf)
        fused: dict[str, float] = {}
        for w, lst in zip(self.weights, lists):
            for r, (i, _) in enumerate(lst, 1):
                fused[i] = fused.get(i, 0.0) + w / (self.rrf_k + r)
        return sorted(fused.items(), key=lambda x: -x[1])[:k]

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        """[n_users, n_items] fused RRF scores over the full catalogue (seen items: -inf)."""
        from llmrec.evaluation import history_indices

        hist = history_indices(self.ds, list(user_ids), split)  # type: ignore[arg-type]
        mats = [self.text.score_items(user_ids, split), np.asarray(self.cf.score_items(list(user_ids), split))]
        out = rrf_fuse(mats, self.weights, self.rrf_k, hist, depth=self.depth)
        out[np.isneginf(out)] = -1.0  # finite for callers; still below every unseen item (scores are > 0)
        return out

    def similar_texts(self, text: str, texts: list[str]) -> np.ndarray:
        return self.text.similar_texts(text, texts)


def check_scores_histories(model: Any) -> None:
    """A retriever built on `model` alone must rank any history (event-store users too): `score_history` is needed."""
    if not hasattr(model, "score_history"):
        raise ValueError(f"{type(model).__name__} cannot rank an arbitrary history (no score_history): use it "
                         "through hybrid:<name> or choose sasrec, bert_lstm or itemcf")


class ModelRetriever:
    """A collaborative model alone as the retriever (`--retriever sasrec`, `bert_lstm`): its own ranking, e.g. the
    best baseline's top candidates for the LLM to rerank. `query(history, ...)` needs the model's
    `score_history(history)` (SASRec, BERT+LSTM, ItemCF have it), so users outside the training data (the event
    store) are served too. `text` (optional) only maps generated titles back to the catalogue (`similar_texts`)."""

    name = "model"

    def __init__(self, model: Any, text: TextRetriever | None = None):
        check_scores_histories(model)
        self.cf = model
        self.text = text

    @property
    def ds(self) -> Any:
        return self.cf.ds

    def query(self, history: HistoryLike, k: int = 20, exclude: set[str] | None = None, *,
              user_id: str | None = None, split: str = "test") -> list[tuple[str, float]]:
        """Top-k unseen items by the model's scores for `history` (oldest first). `user_id` / `split` are accepted
        as `candidates_for` passes them to a hybrid, and unused: the history given is the one scored."""
        events = as_events(history)
        exclude = set(exclude) if exclude is not None else {i for i, _ in events}
        return top_unseen(np.asarray(self.cf.score_history(events), dtype=np.float64), self.ds.item_ids, exclude, k)

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        """[n_users, n_items] model scores (seen items below every unseen one, finite)."""
        out = np.asarray(self.cf.score_items(list(user_ids), split), dtype=np.float64)
        seen = np.isneginf(out)
        if seen.any():
            out[seen] = np.nanmin(out[~seen]) - 1.0 if (~seen).any() else 0.0
        return out

    def similar_texts(self, text: str, texts: list[str]) -> np.ndarray:
        if self.text is None:
            raise ValueError("this retriever has no text encoder: mapping generated titles needs one "
                             "(build it with a TextRetriever, or use the verbalizer mode)")
        return self.text.similar_texts(text, texts)


class EnsembleRetriever(ModelRetriever):
    """Several collaborative models' full rankings fused by weighted RRF (`rrf_fuse`, no depth cut): score(i) =
    sum_m w_m / (rrf_k + rank_m(i)) over the user's unseen items (`--retriever ensemble`: BERT+LSTM and SASRec).
    Every model needs `score_history(history)`, so users outside the training data (the event store) are served
    too; `text` (optional) maps generated titles back to the catalogue, as `ModelRetriever`'s."""

    name = "ensemble"

    def __init__(self, models: Sequence[Any], weights: Sequence[float] | None = None, rrf_k: float = 60.0,
                 text: TextRetriever | None = None):
        if not models:
            raise ValueError("EnsembleRetriever needs at least one model")
        for m in models:
            check_scores_histories(m)
        super().__init__(models[0], text)
        self.models = list(models)
        self.weights = tuple(weights) if weights is not None else (1.0,) * len(self.models)
        if len(self.weights) != len(self.models):
            raise ValueError(f"EnsembleRetriever: {len(self.models)} models but {len(self.weights)} weights")
        check_rrf(self.weights, len(self.models), rrf_k, who="EnsembleRetriever")
        check_same_catalogue(self.models, "EnsembleRetriever")
        self.rrf_k = rrf_k

    def query(self, history: HistoryLike, k: int = 20, exclude: set[str] | None = None, *,
              user_id: str | None = None, split: str = "test") -> list[tuple[str, float]]:
        """Top-k unseen items by the fused score of `history` (oldest first); `user_id` / `split` unused, as in
        `ModelRetriever.query`."""
        events = as_events(history)
        exclude = set(exclude) if exclude is not None else {i for i, _ in events}
        ex = np.array([self.ds.item_index[i] for i in exclude if i in self.ds.item_index], dtype=np.int64)
        mats = [np.asarray(m.score_history(events), dtype=np.float64)[None, :] for m in self.models]
        return top_unseen(rrf_fuse(mats, self.weights, self.rrf_k, [ex])[0], self.ds.item_ids, exclude, k)

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        """[n_users, n_items] fused scores over the full catalogue (seen items below every unseen one, finite)."""
        from llmrec.evaluation import history_indices

        hist = history_indices(self.ds, list(user_ids), split)  # type: ignore[arg-type]
        mats = [np.asarray(m.score_items(list(user_ids), split), dtype=np.float64) for m in self.models]
        out = rrf_fuse(mats, self.weights, self.rrf_k, hist)
        out[np.isneginf(out)] = -1.0
        return out

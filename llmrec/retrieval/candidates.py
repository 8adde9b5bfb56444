"""Candidate lists for training and evaluation, built only from the data before the target.

- `candidates_for(ds, user, split, k)`: evaluation candidates for a leave-one-out target of `split` (valid: the
  train events; test: train + valid events), or for an arbitrary training position with `pos=` (the user's
  events before that position). The true item is never added: if retrieval misses it, the LLM cannot rank it,
  and the evaluation counts that as a miss.
- `training_candidates(..., insert_target=True, seed=...)`: the same list, but when the true item was not
  retrieved it replaces the last candidate at a random position (seeded), so every training example has an
  answer. Configure with `insert_target=False` to train on retrieved lists only (examples without the target are
  then dropped by returning `inserted=False` with the target absent) and with `shuffle=True` to also shuffle the
  retrieved order (so the target's position does not reveal its retrieval rank).

Note on the collaborative side of a hybrid retriever: `ItemCF` is fitted on the train split only, so valid/test
candidates never see their targets; for training positions inside the train split it has seen the user's later
training events (as any model trained on that split has).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_RETRIEVERS: dict[tuple[str, str], Any] = {}


def _same_data(a: Any, b: Any) -> bool:
    """Whether two dataset objects hold the same catalogue and interactions (identity first: the usual case)."""
    if a is b:
        return True
    try:
        return bool(a.items.equals(b.items) and a.interactions.equals(b.interactions))
    except AttributeError:
        return False


def default_retriever(ds: Any, kind: str = "text") -> Any:
    """One shared retriever per (dataset folder, kind) in this process: `text` or `hybrid` (text + ItemCF). It is
    rebuilt when the dataset given no longer holds the catalogue and interactions it was built on (a dataset
    re-prepared in the same folder: same item count, other titles)."""
    if kind not in ("text", "hybrid"):
        raise ValueError(f"unknown retriever kind {kind!r}: use 'text' or 'hybrid'")
    root = str(Path(ds.root).resolve())
    for k in [k for k in _RETRIEVERS if k[0] == root]:
        if not _same_data(_RETRIEVERS[k].ds, ds):
            del _RETRIEVERS[k]
    key = (root, kind)
    if key not in _RETRIEVERS:
        from llmrec.retrieval.hybrid import HybridRetriever
        from llmrec.retrieval.text import TextRetriever

        text = _RETRIEVERS.get((root, "text")) or TextRetriever().build(ds, progress=False)
        _RETRIEVERS[(root, "text")] = text
        if kind == "hybrid":
            _RETRIEVERS[key] = HybridRetriever.default(ds, text)
    return _RETRIEVERS[key]


def history_before(ds: Any, user_id: str, split: str = "test", pos: int | None = None) -> list[tuple[str, bool, int]]:
    """(item_id, liked, timestamp) of the user's events allowed before the target: `pos` given -> events with a
    smaller position; else the leave-one-out rule of `split` (test: train+valid, valid: train)."""
    if pos is not None:
        g = ds.history(str(user_id), before="all")
        g = g[g["pos"] < pos]
    else:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test' (or pass pos= for a training target), got {split!r}")
        g = ds.history(str(user_id), before=split)
    return [(str(i), bool(lab), int(t)) for i, lab, t in zip(g["item_id"], g["label"], g["timestamp"])]


def candidates_for(ds: Any, user_id: str, split: str = "test", k: int = 20, retriever: Any = None,
                   pos: int | None = None) -> list[tuple[str, float]]:
    """Top-k unseen (item_id, score) for the user's target of `split` (or at position `pos`), best first."""
    from llmrec.retrieval.text import check_k

    k = check_k(k, "candidates_for")
    ret = retriever if retriever is not None else default_retriever(ds)
    hist = history_before(ds, user_id, split, pos)
    seen = {i for i, _, _ in hist}
    if pos is None and hasattr(ret, "cf"):  # hybrid: a user-id scorer may use exactly the split's history
        return list(ret.query(hist, k=k, exclude=seen, user_id=str(user_id), split=split))[:k]
    return list(ret.query(hist, k=k, exclude=seen))[:k]


def training_candidates(ds: Any, user_id: str, target: str, k: int = 20, retriever: Any = None, split: str = "test",
                        pos: int | None = None, insert_target: bool = True, shuffle: bool = False, seed: int = 0,
                        rng: np.random.Generator | None = None) -> tuple[list[str], bool]:
    """(candidate ids, inserted): retrieved candidates for a training example; see the module docstring."""
    if k < 1:
        raise ValueError(f"k: a training example needs at least one candidate (the target), got k={k}")
    rng = rng if rng is not None else np.random.default_rng(seed)
    ids = [i for i, _ in candidates_for(ds, user_id, split, k, retriever, pos)]
    inserted = False
    if str(target) not in ids and insert_target:
        ids = ids[: k - 1]
        ids.insert(int(rng.integers(0, len(ids) + 1)), str(target))
        inserted = True
    if shuffle:
        rng.shuffle(ids)
    return ids, inserted

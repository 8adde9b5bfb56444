"""What every baseline shares: the interface, leakage-safe histories, history masking, seeds, early stopping and
checkpoints.

Interface (every model): `fit(ds, checkpoint_dir=None)`, `score_items(user_ids, split="test") -> [n_users, n_items]`
(dataset item order; the user's own history gets `-inf`), `predict_proba(examples) -> P(Yes)` for the Yes/No models
(others raise `NotImplementedError`), `save(path)` / `load(path)`.

Leakage rules: next-item models train on the leave-one-out `train` split and early-stop on `valid`; at scoring time
`split="valid"` reads the train events and `split="test"` the train+valid events, never the target itself.
Yes/No models train on `ds.yesno[split == "train"]` (global time cut-off) and early-stop on the `valid` rows.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from llmrec.config import ConfigError, llmrec_home, to_dict

log = logging.getLogger(__name__)

SPLIT_HISTORY = {"valid": ("train",), "test": ("train", "valid"), "all": ("train", "valid", "test")}


def check_values(cfg: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 fraction: Sequence[str] = ()) -> None:
    """A baseline config's numbers that cannot mean anything raise `ConfigError` naming the key: `positive` keys must
    be > 0, `non_negative` ones >= 0 (None passes: no cap / no budget), `fraction` ones in [0, 1). Without this an
    epochs=0 failed in `load_state_dict(None)`, a batch_size=0 in `range()`, a dim=-1 in torch."""
    for keys, ok, want in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for k in keys:
            v = getattr(cfg, k)
            if v is not None and not ok(v):
                raise ConfigError(f"{k}: must be {want}, got {v!r}")


def checkpoint_dir(dataset: str, model: str, home: Path | None = None) -> Path:
    """`$LLMREC_HOME/models/baselines/<dataset>/<model>/`."""
    return (home or llmrec_home()) / "models" / "baselines" / dataset / model


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is part of the install
        pass


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None/0: unchanged), and restore the previous count after it: a
    baseline fitted in the same process as the LLM (`llmrec bench`, a service fitting its SASRec retriever) must not
    leave it on one thread (the bench's LLM timings were 1.5x slow that way)."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TimeBudget:
    """A training-time budget that is kept rather than overshot: call `epoch_done()` after each epoch; it returns True
    when another epoch, estimated as the slowest one so far (validation included), would end past the budget. The
    first epoch always runs. `seconds` None or 0: no budget."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = self.last = time.perf_counter()
        self.slowest = 0.0

    def epoch_done(self) -> bool:
        now = time.perf_counter()
        self.slowest = max(self.slowest, now - self.last)
        self.last = now
        return bool(self.seconds) and (now - self.t0) + self.slowest > self.seconds


class EarlyStopper:
    """Keeps the best validation score and a copy of the best state; `step(score, state)` returns True to stop."""

    def __init__(self, patience: int, higher_is_better: bool = True):
        self.patience = patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.best: float | None = None
        self.best_state: Any = None
        self.best_epoch = -1
        self.bad = 0

    def step(self, score: float, state: Any, epoch: int) -> bool:
        if self.best is None or self.sign * score > self.sign * self.best:
            self.best, self.best_state, self.best_epoch, self.bad = score, copy.deepcopy(state), epoch, 0
            return False
        self.bad += 1
        return self.bad >= self.patience


class Baseline:
    """Base class: subclasses set `name`, `config_cls`, implement `_fit`, `_score` and `_state`/`_set_state`."""

    name: ClassVar[str] = "base"
    config_cls: ClassVar[type] = object
    yesno: ClassVar[bool] = False  # has predict_proba

    def __init__(self, **cfg: Any):
        from llmrec.config import from_dict

        self.cfg = from_dict(self.config_cls, cfg, where=f"baselines.{self.name}")
        self.ds: Any = None
        self.fit_info: dict[str, Any] = {}
        self._hist_cache: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    # ------------------------------------------------------------------ histories
    def histories(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """user -> (item indices, like labels) in time order, from the events allowed before a `split` target."""
        if split not in SPLIT_HISTORY:
            raise ValueError(f"split must be one of {sorted(SPLIT_HISTORY)}, got {split!r}")
        if split not in self._hist_cache:
            df = self.ds.interactions
            df = df[df["split"].isin(SPLIT_HISTORY[split])]
            idx = df["item_id"].map(self.ds.item_index).to_numpy(np.int64)
            lab = df["label"].to_numpy(np.int64)
            users = df["user_id"].to_numpy()
            out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            if len(users):
                cut = np.flatnonzero(users[1:] != users[:-1]) + 1
                starts = np.concatenate([[0], cut])
                ends = np.concatenate([cut, [len(users)]])
                for s, e in zip(starts, ends):
                    out[str(users[s])] = (idx[s:e], lab[s:e])
            self._hist_cache[split] = out
        return self._hist_cache[split]

    def history_of(self, user: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        h = self.histories(split).get(str(user))
        if h is None:
            if not self.ds.has_user(user):
                raise KeyError(f"unknown user {user!r} in dataset {self.ds.name}")
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return h

    def mask_history(self, scores: np.ndarray, user_ids: Sequence[str], split: str) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        for r, u in enumerate(user_ids):
            items, _ = self.history_of(u, split)
            if items.size:
                scores[r, items] = -np.inf
        return scores

    # ------------------------------------------------------------------ interface
    def fit(self, ds: Any, checkpoint_dir: str | Path | None = None, progress: bool = True) -> Baseline:
        self.ds = ds
        self._hist_cache = {}
        seed = getattr(self.cfg, "seed", 0)
        set_seed(seed)
        t0 = time.perf_counter()
        with torch_threads(getattr(self.cfg, "threads", None)):
            self._fit(ds, progress=progress)
        self.fit_info["train_s"] = time.perf_counter() - t0
        log.info("%s fitted on %s in %.1f s: %s", self.name, ds.name, self.fit_info["train_s"], self.fit_info)
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        return self

    def score_items(self, user_ids: Sequence[str], split: str = "test") -> np.ndarray:
        """[n_users, n_items] scores (dataset item order); each user's history for `split` is `-inf`."""
        if self.ds is None:
            raise RuntimeError(f"{self.name}: call fit(ds) or load(path) first")
        if split not in SPLIT_HISTORY:
            raise ValueError(f"{self.name}: split must be one of {sorted(SPLIT_HISTORY)}, got {split!r}")
        user_ids = [str(u) for u in user_ids]
        unknown = [u for u in user_ids if not self.ds.has_user(u)]
        if unknown:  # before `_score`: a model's own user lookup failed with a bare KeyError('<user>')
            raise KeyError(f"{self.name}: {len(unknown)} unknown user(s) in dataset {self.ds.name}, e.g. "
                           f"{unknown[0]!r}")
        if not user_ids:
            return np.zeros((0, self.ds.n_items))
        return self.mask_history(self._score(user_ids, split), user_ids, split)

    def predict_proba(self, examples: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError(f"{self.name} is a next-item model: it has no Yes/No prediction")

    def save(self, path: str | Path) -> Path:
        import torch

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.name,
            "config": to_dict(self.cfg),
            "dataset": self.ds.name,
            "dataset_root": str(Path(self.ds.root).resolve()),
            "dataset_hash": self.ds.manifest.get("content_hash"),
            "fit_info": self.fit_info,
        }
        torch.save(self._state(), path / "state.pt")
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        log.info("saved %s to %s", self.name, path)
        return path

    def load(self, path: str | Path, ds: Any = None) -> Baseline:
        """Restore a checkpoint written by `save`; the dataset is reopened from the recorded folder unless given."""
        import torch

        from llmrec.data import load_prepared

        path = Path(path)
        mp = path / "meta.json"
        if not mp.is_file() or not (path / "state.pt").is_file():
            raise FileNotFoundError(f"{path}: no baseline checkpoint (meta.json + state.pt); train it first")
        meta = json.loads(mp.read_text())
        if meta.get("model") != self.name:
            raise ValueError(f"{path}: checkpoint is for model {meta.get('model')!r}, not {self.name!r}")
        from llmrec.config import from_dict

        self.cfg = from_dict(self.config_cls, meta["config"], where=f"{mp}: config")
        self.ds = ds if ds is not None else load_prepared(meta["dataset_root"])
        if meta.get("dataset_hash") and self.ds.manifest.get("content_hash") != meta["dataset_hash"]:
            raise ValueError(f"{path}: checkpoint was trained on a different version of dataset {self.ds.name}")
        self._hist_cache = {}
        self.fit_info = meta.get("fit_info", {})
        self._set_state(torch.load(path / "state.pt", weights_only=False))
        return self

    # ------------------------------------------------------------------ to implement
    def _fit(self, ds: Any, progress: bool = True) -> None:
        raise NotImplementedError

    def _score(self, user_ids: list[str], split: str) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def valid_ranking(self, max_users: int | None = 1000, seed: int = 0) -> dict:
        """Full-ranking metrics on the `valid` split (train history only), for early stopping."""
        from llmrec.evaluation import evaluate_ranking

        return evaluate_ranking(
            self.ds, lambda u: self.score_items(list(u), "valid"), "valid", ks=(10,), max_users=max_users, seed=seed
        )


def yesno_train_valid(
    ds: Any, max_train: int | None, max_valid: int | None, seed: int, valid_seed: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Yes/No `train` and `valid` rows a baseline fits on, each capped to a seeded sample
    (`llmrec.evaluation.yesno_subset`; the valid rows with `valid_seed`, default `seed`). Fine-tuning draws its
    `data.n_train` rows the same way with `data.seed` and its `data.n_valid` rows with `data.eval_seed`, so with the
    recipe's sizes and seeds a baseline fits on exactly the LLM's few-shot rows."""
    from llmrec.evaluation import yesno_subset

    vs = seed if valid_seed is None else valid_seed
    return yesno_subset(ds, "train", max_train or None, seed), yesno_subset(ds, "valid", max_valid or None, vs)


def yesno_stopping_rule(va: pd.DataFrame, model: str) -> str | None:
    """What a Yes/No fit early-stops on: None = the valid rows' AUC; else why it falls back to the training loss (no
    valid rows, or valid rows of one class: their AUC is NaN, which never beats the first epoch's NaN, so the first
    epoch was kept whatever the later ones learned). The fallback is logged and goes into `fit_info`."""
    if not len(va):
        return "no valid Yes/No rows"
    classes = sorted(int(v) for v in va["label"].unique())
    if len(classes) > 1:
        return None
    why = f"the {len(va)} valid Yes/No rows all have label {classes[0]} (AUC undefined)"
    log.warning("%s: %s; early stopping on the training loss instead", model, why)
    return why


def yesno_arrays(ds: Any, examples: pd.DataFrame, hist_len: int = 10) -> dict[str, np.ndarray]:
    """Index arrays of Yes/No examples: user ids, target item index, padded history items (index+1, 0 = pad,
    left-padded so the most recent event is last) and history likes (1 like, 2 dislike, 0 pad)."""
    n = len(examples)
    items = np.array([ds.item_index[i] for i in examples["item_id"]], dtype=np.int64)
    hi = np.zeros((n, hist_len), dtype=np.int64)
    hl = np.zeros((n, hist_len), dtype=np.int64)
    for r, (its, labs) in enumerate(zip(examples["hist_items"], examples["hist_labels"])):
        its, labs = list(its)[-hist_len:], list(labs)[-hist_len:]
        k = len(its)
        if k:
            hi[r, hist_len - k :] = [ds.item_index[i] + 1 for i in its]
            hl[r, hist_len - k :] = [1 if int(v) else 2 for v in labs]
    labels = examples["label"].to_numpy(np.float32) if "label" in examples else np.zeros(n, np.float32)
    return {"users": examples["user_id"].astype(str).to_numpy(), "items": items, "hist_items": hi,
            "hist_likes": hl, "labels": labels}

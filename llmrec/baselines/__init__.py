"""Classic baselines behind one interface (see `llmrec.baselines.base`): popularity, MF (BCE click model), BPR-MF,
BERT + LSTM + fully connected, SASRec. `get_model(name, **cfg)` builds one; unknown config keys raise."""

from __future__ import annotations

import importlib
from typing import Any

from llmrec.baselines.base import Baseline, checkpoint_dir

MODELS: dict[str, str] = {
    "pop": "llmrec.baselines.classic:Popularity",
    "mf": "llmrec.baselines.classic:MatrixFactorization",
    "bpr": "llmrec.baselines.classic:BPRMF",
    "bert_lstm": "llmrec.baselines.bert_lstm:BertLSTM",
    "sasrec": "llmrec.baselines.sasrec:SASRec",
}


def model_class(name: str) -> type[Baseline]:
    if name not in MODELS:
        raise KeyError(f"unknown baseline {name!r}; choose one of {sorted(MODELS)}")
    mod, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def get_model(name: str, **cfg: Any) -> Baseline:
    """A fresh, unfitted baseline `name` with config overrides `cfg` (checked against its config dataclass)."""
    return model_class(name)(**cfg)


def load_model(name: str, dataset: str, path: str | None = None, ds: Any = None) -> Baseline:
    """Load the checkpoint of `name` for `dataset` (default: `$LLMREC_HOME/models/baselines/<dataset>/<name>/`)."""
    return model_class(name)().load(path or checkpoint_dir(dataset, name), ds=ds)


__all__ = ["MODELS", "Baseline", "checkpoint_dir", "get_model", "load_model", "model_class"]

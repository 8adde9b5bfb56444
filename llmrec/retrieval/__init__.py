"""Candidate retrieval: sentence-transformer item embeddings + faiss, an item-item CF, RRF hybrid, and candidate
lists for training/evaluation built only from data before the target."""

from llmrec.retrieval.candidates import candidates_for, default_retriever, history_before, training_candidates
from llmrec.retrieval.cf import ItemCF
from llmrec.retrieval.encoder import EmbeddingCache, TextEncoder, default_encoder_path
from llmrec.retrieval.hybrid import EnsembleRetriever, HybridRetriever, ModelRetriever, rrf_fuse
from llmrec.retrieval.text import TextRetriever, as_events

__all__ = [
    "EmbeddingCache",
    "EnsembleRetriever",
    "HybridRetriever",
    "ItemCF",
    "ModelRetriever",
    "TextEncoder",
    "TextRetriever",
    "as_events",
    "candidates_for",
    "default_encoder_path",
    "default_retriever",
    "history_before",
    "rrf_fuse",
    "training_candidates",
]

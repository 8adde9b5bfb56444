"""Ranking: the `Recommender` (history -> candidates -> prompt -> LLM scores -> top-K -> explanation)."""

from llmrec.ranking.recommender import HistEvent, RankingConfig, RecItem, Recommendation, Recommender, to_hist_events

__all__ = ["HistEvent", "RankingConfig", "RecItem", "Recommendation", "Recommender", "to_hist_events"]

"""Recommendation service: protocol (request/response models), serving (logic), app (routes), launch (startup),
config (typed ServiceConfig), client (HTTP client used by `llmrec recommend`)."""

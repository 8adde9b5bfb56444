"""Prometheus metrics of the service (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmrec_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("llmrec_request_latency_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.backend_latency = Histogram("llmrec_backend_latency_seconds", "LLM backend call latency", ["op"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("llmrec_batch_size", "prompts per backend call (service micro-batching)",
                                    ["op"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.cache_hits = Counter("llmrec_cache_hits", "recommendations answered from the cache", registry=r)
        self.cache_misses = Counter("llmrec_cache_misses", "recommendations computed", registry=r)
        self.fallbacks = Counter("llmrec_fallbacks", "LLM failures answered by fallback or 503", ["reason"],
                                 registry=r)
        self.events = Counter("llmrec_events", "events posted", ["created"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

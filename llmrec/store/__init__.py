"""Event store: durable user histories (SQLite by default, any SQL URL) with per-user history versions."""

from llmrec.store.events import EVENT_TYPES, Event, EventType, derive_liked
from llmrec.store.sql import EventStore, IdempotencyConflict, StoreError, default_url

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventStore",
    "EventType",
    "IdempotencyConflict",
    "StoreError",
    "default_url",
    "derive_liked",
]

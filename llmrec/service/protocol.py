"""Request and response models of the recommendation API, and its one error shape."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ID_PATTERN = r"^[A-Za-z0-9_.:@\-]+$"
ADAPTER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
# an event timestamp may be at most this far ahead of the server's clock (client clock skew); later ones are refused:
# histories are ordered by timestamp, so a future-dated event would stay the user's "latest" event for ever
MAX_FUTURE_SKEW_S = 300
# a history page cursor: `<timestamp>:<id>` of an event (the store orders histories by timestamp, then insertion id)
CURSOR_PATTERN = r"^[0-9]{1,18}:[0-9]{1,18}$"


class ErrorDetail(BaseModel):
    code: int = Field(description="HTTP status")
    type: str = Field(description="machine-readable kind: validation_error, not_found, backend_unavailable, ...")
    message: str
    field: str | None = Field(None, description="the offending field (e.g. body.item_id, query.k) when there is one")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RecItemOut(BaseModel):
    item_id: str
    title: str
    score: float
    rank: int


class EvidenceOut(BaseModel):
    item_id: str = Field(description="a history item the explanation cites")
    title: str
    shared: list[str] = Field(default_factory=list, description="attribute values (genre, tag, ...) it shares with "
                              "the recommended items the explanation names")


class RecommendationResponse(BaseModel):
    user_id: str
    items: list[RecItemOut]
    explanation: str | None = None
    explanation_fallback: bool = False
    explanation_fallback_reasons: list[str] = Field(
        default_factory=list, description="with a template fallback: why the generated explanation failed the "
        "post-check (an invented title, a disliked item said to be liked, ...)")
    explanation_evidence: list[EvidenceOut] = Field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    backend: str
    degraded: bool = Field(False, description="true when the LLM failed and a collaborative fallback answered")
    cached: bool = False
    history_version: int
    latency_ms: float


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    item_id: str = Field(min_length=1, max_length=256)
    type: Literal["view", "click", "purchase", "rating"]
    # strict: JSON numbers only (a string "4" or `true` is refused, not coerced)
    value: float | None = Field(None, ge=-1e9, le=1e9, allow_inf_nan=False, strict=True)
    timestamp: int | None = Field(
        None, ge=0, strict=True,
        description=f"epoch seconds (an integer, at most {MAX_FUTURE_SKEW_S} s ahead of the server clock); "
        "default now",
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=128, pattern=ID_PATTERN,
        description="or the Idempotency-Key header; a retry with the same key returns the stored event (200)",
    )

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, v: int | None) -> int | None:
        now = int(time.time())
        if v is not None and v > now + MAX_FUTURE_SKEW_S:
            raise ValueError(f"{v} is in the future (server time {now}; at most {MAX_FUTURE_SKEW_S} s ahead allowed)")
        return v


class EventOut(BaseModel):
    id: int
    user_id: str
    item_id: str
    type: str
    value: float | None
    timestamp: int
    liked: bool | None
    idempotency_key: str | None = None


class EventAck(BaseModel):
    event: EventOut
    created: bool = Field(description="false when an idempotency key replayed a stored event")
    history_version: int = Field(description="the user's history version this event produced (each new event its "
                                 "own): a history of this version or later includes the event; a replayed event "
                                 "(created: false) gives the current version")


class HistoryResponse(BaseModel):
    user_id: str
    history_version: int
    events: list[EventOut] = Field(description="oldest first")
    next_before: str | None = Field(
        None, description="when older events exist: the cursor (`<timestamp>:<id>` of the oldest event of this page) "
        "to pass as `before` for the page before this one; null on the oldest page")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)
    # each id bounded as EventIn.item_id is (an unknown id is echoed in the 422's message)
    item_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1)
    adapter: str | None = Field(None, pattern=ADAPTER_PATTERN)


class ItemScore(BaseModel):
    item_id: str
    p_yes: float = Field(description="P(Yes) / (P(Yes) + P(No)) for 'will the user like this item?'")


class ScoreResponse(BaseModel):
    user_id: str
    scores: list[ItemScore]
    model: str | None = None
    adapter: str | None = None
    backend: str
    latency_ms: float


class HealthResponse(BaseModel):
    status: Literal["ok"]
    backend: str
    backend_note: str
    degraded: bool = Field(description="true when no LLM backend is configured: every answer is the collaborative "
                           "fallback (degraded: true)")
    model: str | None
    adapters: list[str]
    dataset: str
    store: str
    batching: str
    fallback: str


class ReadyResponse(BaseModel):
    ready: bool
    checks: dict[str, str]

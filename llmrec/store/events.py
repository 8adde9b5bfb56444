"""The event record shared by the store, the service and the `Recommender` (its `history` argument)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

EventType = Literal["view", "click", "purchase", "rating"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "purchase", "rating")


@dataclass(frozen=True)
class Event:
    """One user-item event.

    `liked` is the like/dislike signal the prompts show: for events loaded from a prepared dataset it is that dataset's
    `label`; for new events it is derived by `derive_liked` (rating > threshold; click/purchase:
    liked; view: unknown).
    `value` is the rating for `type == "rating"` (else an optional weight, e.g. a play count)."""

    user_id: str
    item_id: str
    type: str
    timestamp: int
    value: float | None = None
    liked: bool | None = None
    id: int | None = None
    idempotency_key: str | None = None

    @property
    def rating(self) -> float | None:
        return self.value if self.type == "rating" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_liked(type_: str, value: float | None, like_threshold: float = 3.0) -> bool | None:
    """Like signal of a new event: ratings above `like_threshold` (the TALLRec rule used by `prepare`), clicks and
    purchases count as likes, a bare view says nothing."""
    if type_ == "rating":
        return None if value is None else bool(value > like_threshold)
    if type_ in ("click", "purchase"):
        return True
    return None

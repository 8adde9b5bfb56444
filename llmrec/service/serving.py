"""Service logic behind the routes: history from the store -> Recommender (with timeout, cache, fallback) -> response.

No ranking logic lives here: the `Recommender` ranks; this module only reads the history, keys the cache by the
user's history version, bounds the call in time, and answers with a labelled collaborative fallback
(`degraded: true`) or a 503 when the LLM backend fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from llmrec.data import title_twins, with_title_twins
from llmrec.service.config import ServiceConfig
from llmrec.service.metrics import ServiceMetrics
from llmrec.service.protocol import CURSOR_PATTERN
from llmrec.store import Event, EventStore, IdempotencyConflict, StoreError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status, rendered in the API's one error shape."""

    def __init__(self, code: int, type_: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.type, self.message, self.field = code, type_, message, field


class NonFiniteScores(ValueError):
    """The LLM backend answered NaN / infinite scores (e.g. a half-precision overflow): no ranking can be read from
    them, so the answer is treated as a backend failure (fallback or 503), never sent (as `null`) nor cached."""


def _check_finite(scores: list[float], what: str) -> None:
    bad = sum(not math.isfinite(x) for x in scores)
    if bad:
        raise NonFiniteScores(f"{bad} of {len(scores)} {what} are not finite numbers")


class UserHasher:
    """Keyed hash (HMAC-SHA256, 12 hex chars) so logs can correlate a user's requests without naming the user."""

    def __init__(self, key: str | None):
        self._key = (key or os.urandom(32).hex()).encode()

    def __call__(self, user_id: str) -> str:
        return "u:" + hmac.new(self._key, str(user_id).encode(), hashlib.sha256).hexdigest()[:12]


class LRUCache:
    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class CollaborativeFallback:
    """Item-kNN on the dataset's user-item matrix: score(j) = sum over the user's recent liked (else all) items i of
    cosine(i, j); seen items (and their title twins) excluded; popularity breaks ties. Used when the LLM backend is
    down or slow."""

    def __init__(self, ds: Any, exclude_seen_titles: bool = True):
        from scipy import sparse

        self.item_ids = np.asarray(ds.item_ids)
        # seen items' title twins are excluded too (as RankingConfig.exclude_seen_titles)
        self.twins = title_twins(list(ds.item_ids), list(ds.titles)) if exclude_seen_titles else {}
        self.index = ds.item_index
        self.titles = np.asarray(ds.titles)
        inter = ds.interactions
        users, uidx = np.unique(inter["user_id"].to_numpy(), return_inverse=True)
        cols = np.array([self.index[i] for i in inter["item_id"].to_numpy()])
        x = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (uidx, cols)), shape=(len(users), len(self.item_ids))
        )
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0))).ravel()
        norms[norms == 0] = 1.0
        self.xt = (x @ sparse.diags(1.0 / norms)).T.tocsr()  # items x users, columns normalised
        pop = np.asarray(x.sum(axis=0)).ravel()
        self.pop = pop / max(pop.max(), 1.0)

    def recommend(self, history: list[Event], k: int) -> list[dict[str, Any]]:
        known = [e for e in history if e.item_id in self.index]
        liked = [e for e in known if e.liked] or known
        seeds = [self.index[e.item_id] for e in liked[-20:]]
        scores = 1e-3 * self.pop.astype(np.float64)
        if seeds:
            sim = (self.xt[seeds] @ self.xt.T).toarray().sum(axis=0)
            scores = scores + sim
        for i in with_title_twins((e.item_id for e in known), self.twins):
            scores[self.index[i]] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.array([], dtype=int)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            {"item_id": str(self.item_ids[j]), "title": str(self.titles[j]), "score": float(scores[j]), "rank": r + 1}
            for r, j in enumerate(top)
        ]


def rating_range_of(ds: Any, configured: list[float] | None = None) -> tuple[float, float] | None:
    """The values a rating event may have: `configured`, else the scale of a dataset whose labels come from its
    ratings (manifest label_rule `rating_threshold`: its lowest and highest rating), else None (any finite value;
    e.g. a play count, whose top has no bound)."""
    if configured is not None:
        return float(configured[0]), float(configured[1])
    manifest = getattr(ds, "manifest", None) or {}
    inter = getattr(ds, "interactions", None)
    if manifest.get("label_rule") != "rating_threshold" or inter is None or "rating" not in inter:
        return None
    ratings = inter["rating"].dropna()
    if ratings.empty:
        return None
    lo, hi = float(ratings.min()), float(ratings.max())
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class RecommendationService:
    def __init__(
        self,
        cfg: ServiceConfig,
        store: EventStore,
        catalogue: Any,
        recommender: Any | None = None,
        metrics: ServiceMetrics | None = None,
        backend_name: str = "none",
        backend_note: str = "",
        model_name: str | None = None,
    ):
        self.cfg = cfg
        self.store = store
        self.catalogue = catalogue
        # one Recommender, or {adapter name (None = default): Recommender} when each adapter has its own backend view
        self.recommenders: dict[str | None, Any] = (
            dict(recommender) if isinstance(recommender, dict) else {None: recommender}
        ) if recommender is not None else {}
        self.recommender = self.recommenders.get(None) or next(iter(self.recommenders.values()), None)
        self.metrics = metrics or ServiceMetrics()
        self.backend_name = backend_name if recommender is not None else "collaborative"
        self.backend_note = backend_note
        self.model_name = model_name
        self.hash_user = UserHasher(cfg.user_hash_key)
        self.cache = LRUCache(cfg.cache_size)
        self.fallback = (CollaborativeFallback(catalogue, cfg.exclude_seen_titles) if cfg.fallback == "collaborative"
                         else None)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="llmrec-llm")
        self.adapters = sorted(cfg.llm.adapters)
        self.rating_range = rating_range_of(catalogue, cfg.rating_range)

    # ------------------------------------------------------------------------------------------------ helpers
    def check_adapter(self, adapter: str | None, field: str) -> str | None:
        if adapter is None:
            return self.cfg.llm.default_adapter
        if adapter not in self.cfg.llm.adapters:
            raise ServiceError(
                422, "validation_error", f"{field}: unknown adapter {adapter!r}; configured: {self.adapters}", field
            )
        return adapter

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.cfg.max_k:
            raise ServiceError(422, "validation_error", f"query.k: must be within 1..{self.cfg.max_k}", "query.k")

    def _pick(self, adapter: str | None, method: str, field: str) -> tuple[Any, dict[str, Any]]:
        """The recommender for `adapter` and the extra kwargs its `method` needs. An adapter of the registry that the
        backend did not load is the server's fault, not the request's: 503 naming the adapter (and `field`)."""
        if adapter in self.recommenders:
            return self.recommenders[adapter], {}
        rec = self.recommender
        if adapter is not None and not _accepts(getattr(rec, method), "adapter"):
            log.error("adapter %r is in llm.adapters but the LLM backend has not loaded it", adapter)
            raise ServiceError(
                503, "adapter_unavailable",
                f"{field}: adapter {adapter!r} is configured (llm.adapters) but not loaded by the LLM backend; "
                f"a server fault, not a bad request", field,
            )
        return rec, ({"adapter": adapter} if _accepts(getattr(rec, method), "adapter") else {})

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, lambda: fn(*args, **kw))
        return await asyncio.wait_for(fut, timeout=self.cfg.llm.timeout_s)

    # ------------------------------------------------------------------------------------------------ routes
    async def recommend(self, user_id: str, k: int, explain: bool, adapter: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.check_k(k)
        adapter = self.check_adapter(adapter, "query.adapter")
        history, version = await asyncio.to_thread(self.store.history_with_version, user_id, self.cfg.max_history)
        if version is None:
            raise ServiceError(404, "not_found", "unknown user: no events stored for this user_id", "path.user_id")
        key = (user_id, version, k, explain, adapter)
        hit = self.cache.get(key)
        if hit is not None:
            self.metrics.cache_hits.inc()
            return {**hit, "cached": True, "latency_ms": (time.perf_counter() - t0) * 1000}
        self.metrics.cache_misses.inc()
        uh = self.hash_user(user_id)
        out: dict[str, Any] | None = None
        if self.recommender is not None:
            recommender, extra = self._pick(adapter, "recommend", "query.adapter")
            kw: dict[str, Any] = {"k": k, "explain": explain, "history": history, **extra}
            tb = time.perf_counter()
            try:
                rec = await self._call(recommender.recommend, user_id, **kw)
                self.metrics.backend_latency.labels(op="recommend").observe(time.perf_counter() - tb)
                out = {
                    "items": [
                        {"item_id": str(it.item_id), "title": str(it.title), "score": float(it.score),
                         "rank": int(it.rank)}
                        for it in rec.items
                    ],
                    "explanation": rec.explanation,
                    "explanation_fallback": bool(getattr(rec, "explanation_fallback", False)),
                    "explanation_fallback_reasons": list(getattr(rec, "explanation_fallback_reasons", None) or []),
                    "explanation_evidence": list(getattr(rec, "evidence", None) or []),
                    "model": self.model_name or getattr(rec, "model", None),  # the launcher knows of merging
                    "adapter": getattr(rec, "adapter", None) or adapter,
                    "backend": getattr(rec, "backend", None) or self.backend_name,
                    "degraded": False,
                }
                _check_finite([it["score"] for it in out["items"]], "item scores")
            except Exception as e:  # noqa: BLE001 - any backend failure degrades the same way
                out = None
                reason = "timeout" if isinstance(e, asyncio.TimeoutError | TimeoutError) else type(e).__name__
                self.metrics.fallbacks.labels(reason=reason).inc()
                log.warning("recommend %s: LLM backend failed (%s: %s)", uh, reason, str(e)[:200])
                if self.fallback is None:
                    raise ServiceError(
                        503, "backend_unavailable",
                        f"the LLM backend failed ({reason}); no fallback is configured, retry later",
                    ) from None
        if out is None:
            if self.fallback is None:
                raise ServiceError(503, "backend_unavailable", "no LLM backend and no fallback configured")
            out = {
                "items": self.fallback.recommend(history, k), "explanation": None, "explanation_fallback": False,
                "explanation_evidence": [],
                "model": None, "adapter": None, "backend": "collaborative", "degraded": True,
            }
        resp = {"user_id": user_id, **out, "cached": False, "history_version": version}
        if not out["degraded"]:
            self.cache.put(key, resp)
        log.info("recommend %s k=%d explain=%s backend=%s degraded=%s", uh, k, explain, out["backend"],
                 out["degraded"])
        return {**resp, "latency_ms": (time.perf_counter() - t0) * 1000}

    def add_event(self, ev: Any, header_key: str | None) -> tuple[dict[str, Any], bool]:
        if ev.item_id not in self.catalogue.item_index:
            raise ServiceError(422, "validation_error", f"body.item_id: unknown item {ev.item_id!r}", "body.item_id")
        if ev.type == "rating" and ev.value is None:
            raise ServiceError(422, "validation_error", "body.value: a rating event needs a value", "body.value")
        if ev.type == "rating" and self.rating_range is not None:
            lo, hi = self.rating_range
            if not (math.isfinite(ev.value) and lo <= ev.value <= hi):
                raise ServiceError(422, "validation_error", f"body.value: rating {ev.value!r} is outside the rating "
                                   f"scale {lo:g}..{hi:g} (rating_range)", "body.value")
        key = ev.idempotency_key or header_key
        if ev.idempotency_key and header_key and ev.idempotency_key != header_key:
            raise ServiceError(422, "validation_error",
                               "body.idempotency_key: differs from the Idempotency-Key header", "body.idempotency_key")
        try:
            stored, created, version = self.store.add_event_versioned(
                ev.user_id, ev.item_id, ev.type, value=ev.value, timestamp=ev.timestamp, idempotency_key=key
            )
        except IdempotencyConflict as e:
            raise ServiceError(409, "idempotency_conflict", str(e), "body.idempotency_key") from None
        except StoreError as e:
            field = str(e).split(":", 1)[0]
            raise ServiceError(422, "validation_error", f"body.{e}", f"body.{field}") from None
        self.metrics.events.labels(created=str(created).lower()).inc()
        log.info("event %s type=%s created=%s", self.hash_user(ev.user_id), ev.type, created)
        return {"event": stored.to_dict(), "created": created, "history_version": version}, created

    def history(self, user_id: str, limit: int, before: str | None = None) -> dict[str, Any]:
        """The `limit` most recent events (oldest first), or those before the cursor `before` (`<timestamp>:<id>`,
        the previous page's `next_before`), and `next_before` when older events remain."""
        if not 1 <= limit <= self.cfg.max_history_page:
            raise ServiceError(
                422, "validation_error", f"query.limit: must be within 1..{self.cfg.max_history_page}", "query.limit"
            )
        cursor = None
        if before is not None:
            if not re.fullmatch(CURSOR_PATTERN, before):
                raise ServiceError(422, "validation_error", f"query.before: {before[:40]!r} is not a cursor "
                                   "'<timestamp>:<id>' (a history page's next_before)", "query.before")
            ts, eid = before.split(":")
            cursor = (int(ts), int(eid))
        # one more than the page: tells whether older events remain (no empty last page)
        events, version = self.store.history_with_version(user_id, limit + 1, before=cursor)
        if version is None:
            raise ServiceError(404, "not_found", "unknown user: no events stored for this user_id", "path.user_id")
        more = len(events) > limit
        events = events[len(events) - limit:] if more else events  # oldest first: the extra one is the first
        next_before = f"{events[0].timestamp}:{events[0].id}" if more else None
        return {"user_id": user_id, "history_version": version, "events": [e.to_dict() for e in events],
                "next_before": next_before}

    async def score(self, user_id: str, item_ids: list[str], adapter: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if len(item_ids) > self.cfg.max_score_items:
            raise ServiceError(
                422, "validation_error", f"body.item_ids: at most {self.cfg.max_score_items} items", "body.item_ids"
            )
        for i, it in enumerate(item_ids):
            if it not in self.catalogue.item_index:
                raise ServiceError(422, "validation_error", f"body.item_ids[{i}]: unknown item {it!r}",
                                   f"body.item_ids[{i}]")
        adapter = self.check_adapter(adapter, "body.adapter")
        history, version = await asyncio.to_thread(self.store.history_with_version, user_id, self.cfg.max_history)
        if version is None:
            raise ServiceError(404, "not_found", "unknown user: no events stored for this user_id", "body.user_id")
        if self.recommender is None:
            raise ServiceError(503, "backend_unavailable", "no LLM backend is configured (llm.backend: none)")
        recommender, extra = self._pick(adapter, "score_yesno", "body.adapter")
        kw: dict[str, Any] = {"history": history, **extra}
        tb = time.perf_counter()
        try:
            probs = [float(p) for p in await self._call(recommender.score_yesno, user_id, list(item_ids), **kw)]
            if len(probs) != len(item_ids):
                raise ValueError(f"{len(probs)} scores for {len(item_ids)} items")
            _check_finite(probs, "P(Yes) values")
        except Exception as e:  # noqa: BLE001
            reason = "timeout" if isinstance(e, asyncio.TimeoutError | TimeoutError) else type(e).__name__
            self.metrics.fallbacks.labels(reason=reason).inc()
            log.warning("score %s: LLM backend failed (%s: %s)", self.hash_user(user_id), reason, str(e)[:200])
            raise ServiceError(503, "backend_unavailable", f"the LLM backend failed ({reason}); retry later") from None
        self.metrics.backend_latency.labels(op="score").observe(time.perf_counter() - tb)
        return {
            "user_id": user_id,
            "scores": [{"item_id": i, "p_yes": p} for i, p in zip(item_ids, probs)],
            "model": self.model_name, "adapter": adapter, "backend": self.backend_name,
            "latency_ms": (time.perf_counter() - t0) * 1000,
        }

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

"""FastAPI routes and middleware. `create_app(config, recommender=..., store=..., catalogue=...)` wires the pieces the
launcher (`llmrec.service.launch`) built; tests pass their own. OpenAPI docs at /docs."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import traceback
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from llmrec.service.config import ServiceConfig
from llmrec.service.metrics import ServiceMetrics
from llmrec.service.protocol import (
    ADAPTER_PATTERN,
    CURSOR_PATTERN,
    ID_PATTERN,
    ErrorResponse,
    EventAck,
    EventIn,
    HealthResponse,
    HistoryResponse,
    ReadyResponse,
    RecommendationResponse,
    ScoreRequest,
    ScoreResponse,
)
from llmrec.service.serving import RecommendationService, ServiceError

log = logging.getLogger("llmrec.service")

ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (401, 404, 409, 413, 422, 503)
}


def error_json(code: int, type_: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=code, content={"error": {"code": code, "type": type_, "message": message, "field": field}}
    )


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class BodyLimit:
    """Pure ASGI middleware: reject bodies over `max_bytes` with 413 (by Content-Length, or while reading)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_json(413, "payload_too_large", f"request body over {self.max_bytes} bytes", "body")
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return await too_big(scope, receive, send)
                except ValueError:
                    return await error_json(400, "bad_request", "invalid Content-Length", "header.content-length")(
                        scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class CatchAll:
    """Pure ASGI middleware, the outermost of the app's own: an exception that escapes everything inside (the
    `_observe` middleware itself) is logged without its message and answered 500 here. Past this point Starlette's
    ServerErrorMiddleware answers it too, but then re-raises it to the server, whose "Exception in ASGI application"
    log prints the message, which may hold a user id."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001
            _log_unexpected("unhandled error", e)
            if not started:  # else the client sees the connection end mid-answer, as it would anyway
                await error_json(500, "internal_error", "internal error (logged)")(scope, receive, send)


def create_app(
    config: ServiceConfig,
    recommender: Any | None = None,
    store: Any | None = None,
    catalogue: Any | None = None,
    backend_name: str = "none",
    backend_note: str = "",
    model_name: str | None = None,
    ready_check: Callable[[], dict[str, str]] | None = None,
    on_shutdown: list[Callable[[], None]] | None = None,
) -> FastAPI:
    cfg = config
    if catalogue is None:
        from llmrec.data import load_prepared

        catalogue = load_prepared(cfg.dataset)
    if store is None:
        from llmrec.ranking.recommender import like_threshold_of
        from llmrec.store import EventStore

        store = EventStore.from_dataset(catalogue, url=cfg.store_url,
                                        like_threshold=like_threshold_of(catalogue, cfg.like_threshold))
    metrics = ServiceMetrics()
    svc = RecommendationService(cfg, store, catalogue, recommender, metrics, backend_name, backend_note, model_name)
    if recommender is None and not backend_note:
        svc.backend_note = "no LLM backend: answers come from the collaborative fallback (degraded: true)"

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        log.info("service up: dataset=%s backend=%s (%s) store=%s", catalogue.name, svc.backend_name,
                 svc.backend_note, _redact(store.url))
        yield
        svc.close()
        for fn in [*(on_shutdown or []), store.close]:  # the store last: its pooled connections (SQLite files)
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                log.warning("shutdown hook failed: %s", e)

    app = FastAPI(
        title="llmrec recommendation service",
        version="0.1.0",
        description="Recommendations ranked by a LoRA-tuned LLM (vLLM or transformers backend), with an event store.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.metrics = metrics

    # ------------------------------------------------------------------------------------------------ errors
    @app.exception_handler(ServiceError)
    async def _service_error(_r: Request, e: ServiceError) -> JSONResponse:
        return error_json(e.code, e.type, e.message, e.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        field = _loc(tuple(first.get("loc", ())))
        msg = "; ".join(f"{_loc(tuple(x.get('loc', ())))}: {x.get('msg')}" for x in errs[:5])
        return error_json(422, "validation_error", msg, field or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(e.status_code, "http_error")
        resp = error_json(e.status_code, kind, str(e.detail))
        resp.headers.update(e.headers or {})  # e.g. a 405's Allow (RFC 9110: a 405 must list the allowed methods)
        if e.status_code == 405:  # all the methods of the path (it may have one route per method: GET and HEAD)
            allowed = {m for r in app.router.routes if r.matches(_r.scope)[0] != Match.NONE
                       for m in getattr(r, "methods", None) or ()}
            if allowed:
                resp.headers["Allow"] = ", ".join(sorted(allowed))
        return resp

    @app.exception_handler(OperationalError)
    async def _store_unavailable(_r: Request, e: OperationalError) -> JSONResponse:
        # the database is locked past its busy timeout, full, or unreachable: nothing was committed, a retry may work
        # (503, not a 500 that reads as a bug); logged without the statement and its parameters (user ids)
        orig = getattr(e, "orig", None) or e
        log.warning("event store unavailable: %s: %s", type(orig).__name__, str(orig).splitlines()[0][:200])
        resp = error_json(503, "store_unavailable", "the event store is unavailable; nothing was changed, retry later")
        resp.headers["Retry-After"] = "1"
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, e: Exception) -> JSONResponse:
        _log_unexpected("unexpected error", e)
        return error_json(500, "internal_error", "internal error (logged)")

    # ------------------------------------------------------------------------------------------------ middleware
    # added before `_observe`, so it runs inside it: a 413 is counted in llmrec_requests_total like any answer
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable) -> Response:
        t0 = time.perf_counter()
        # the path the routes match (without a root_path: the app mounted under a prefix, or behind uvicorn
        # --root-path, has scope["path"] = prefix + route path, which must not skip the key check)
        path, root = request.scope["path"], request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
        if cfg.api_key and path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                resp: Response = error_json(
                    401, "unauthorized", "missing or wrong bearer API key", "header.authorization"
                )
                resp.headers["WWW-Authenticate"] = "Bearer"
                _record(request, resp.status_code, t0)
                return resp
        try:
            resp = await call_next(request)
        except Exception as e:  # noqa: BLE001
            _log_unexpected("unhandled error", e)
            resp = error_json(500, "internal_error", "internal error (logged)")
        _record(request, resp.status_code, t0)
        return resp

    app.add_middleware(CatchAll)  # added last: the outermost of the app's middleware, around `_observe`

    def _template(scope: dict) -> str:
        """The route template of a request, never the raw path (it holds user ids); also for answers given before
        routing (401 from the API key check, 413 from the body limit)."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in app.router.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    def _record(request: Request, status: int, t0: float) -> None:
        tmpl = _template(request.scope)
        dt = time.perf_counter() - t0
        metrics.requests.labels(route=tmpl, method=request.method, status=str(status)).inc()
        metrics.latency.labels(route=tmpl).observe(dt)
        log.debug("%s %s %d %.1fms", request.method, tmpl, status, dt * 1000)

    # ------------------------------------------------------------------------------------------------ routes
    user_path = Path(min_length=1, max_length=128, pattern=ID_PATTERN, description="user id")

    @app.get("/v1/users/{user_id}/recommendations", response_model=RecommendationResponse, responses=ERRORS,
             tags=["recommendations"])
    async def recommendations(
        user_id: str = user_path,
        k: int = Query(cfg.default_k, ge=1, le=cfg.max_k),
        explain: bool = Query(False),
        adapter: str | None = Query(None, pattern=ADAPTER_PATTERN, description="a name from the adapter registry"),
    ) -> dict[str, Any]:
        return await svc.recommend(user_id, k, explain, adapter)

    @app.post("/v1/events", response_model=EventAck, status_code=201, responses={200: {"model": EventAck}, **ERRORS},
              tags=["events"])
    async def post_event(
        ev: EventIn,
        idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=128, pattern=ID_PATTERN),
    ) -> Response:
        body, created = await asyncio.to_thread(svc.add_event, ev, idempotency_key)
        return JSONResponse(status_code=201 if created else 200, content=body)

    @app.get("/v1/users/{user_id}/history", response_model=HistoryResponse, responses=ERRORS, tags=["events"])
    async def history(
        user_id: str = user_path,
        # the default within the bound: a max_history_page under 50 must not refuse requests that name no limit
        limit: int = Query(min(50, cfg.max_history_page), ge=1, le=cfg.max_history_page),
        before: str | None = Query(
            None, pattern=CURSOR_PATTERN, description="page to older events: the `next_before` of the previous page "
            "(`<timestamp>:<id>` of an event); the events before it in the store's order (timestamp, then id)"),
    ) -> dict:
        return await asyncio.to_thread(svc.history, user_id, limit, before)

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["recommendations"])
    async def score(req: ScoreRequest) -> dict[str, Any]:
        return await svc.score(req.user_id, req.item_ids, req.adapter)

    def _health() -> dict[str, Any]:
        return {
            "status": "ok", "backend": svc.backend_name, "backend_note": svc.backend_note,
            "degraded": svc.recommender is None, "model": svc.model_name,
            "adapters": svc.adapters, "dataset": catalogue.name, "store": _redact(store.url),
            "batching": cfg.batching, "fallback": cfg.fallback,
        }

    async def _ready() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await asyncio.to_thread(store.version, "__ready_probe__")
            checks["store"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["store"] = f"error: {type(e).__name__}"
        if ready_check is not None:
            try:
                checks.update(await asyncio.to_thread(ready_check))
            except Exception as e:  # noqa: BLE001
                checks["backend"] = f"error: {type(e).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content={"ready": ok, "checks": checks})

    def _head(resp: Response) -> Response:
        """The answer to a HEAD: the GET's status and headers (its Content-Length included), no body."""
        return Response(status_code=resp.status_code, headers=dict(resp.headers))

    @app.get("/health", response_model=HealthResponse, tags=["ops"])
    async def health() -> dict[str, Any]:
        return _health()

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["ops"])
    async def ready() -> Response:
        return await _ready()

    # probes (load balancers, uptime checks) that send HEAD; separate routes, out of the OpenAPI schema (one route
    # for GET and HEAD would give both operations the same operationId)
    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return _head(JSONResponse(_health()))

    @app.head("/ready", include_in_schema=False)
    async def ready_head() -> Response:
        return _head(await _ready())

    @app.get("/metrics", tags=["ops"])
    async def prom() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _scrubbed_traceback(e: BaseException) -> tuple[str, str]:
    """`e`'s type and where it was raised (`file:line in function`), and its traceback frames and those of its causes,
    without any exception's message: messages may hold user ids (a KeyError of the id, a driver error quoting a
    query's parameters), which never appear in logs."""
    chain: list[tuple[BaseException, str]] = []  # newest first, each with how the exception after it relates to it
    seen: set[int] = set()
    cur: BaseException | None = e
    link = ""
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append((cur, link))
        if cur.__cause__ is not None:
            cur, link = cur.__cause__, "\nThe above exception was the direct cause of the following exception:\n\n"
        elif cur.__context__ is not None and not cur.__suppress_context__:
            cur, link = cur.__context__, "\nDuring handling of the above exception, another exception occurred:\n\n"
        else:
            cur = None
    parts: list[str] = []
    for exc, link in reversed(chain):  # oldest first, as Python prints a chain
        frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
        parts.append(f"Traceback (most recent call last):\n{frames}{_qualname(exc)} (message withheld)\n{link}")
    last = traceback.extract_tb(e.__traceback__)
    where = f"{last[-1].filename}:{last[-1].lineno} in {last[-1].name}" if last else "unknown location"
    return where, "".join(parts)


def _qualname(e: BaseException) -> str:
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _log_unexpected(what: str, e: BaseException) -> None:
    where, tb = _scrubbed_traceback(e)
    log.error("%s: %s at %s (message withheld: it may hold user ids)\n%s", what, _qualname(e), where, tb.rstrip())


def _redact(url: str) -> str:
    """Hide a password in a SQL URL."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]


__all__ = ["create_app", "error_json"]

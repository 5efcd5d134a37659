"""The orchestrator's ASGI application: API routes, auth, and the fleet loops in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from redis.exceptions import RedisError

from flowmesh import __version__
from flowmesh.keys import Keys
from flowmesh.redis_conn import check_server, connect
from flowmesh.spec import TaskSpec
from flowmesh.store import IdempotencyConflict
from orchestrator.api import router
from orchestrator.auth import AccessLog, BodyLimit, TokenAuth
from orchestrator.fleet import Fleet
from orchestrator.metrics import router as metrics_router
from orchestrator.pipelines.routes import router as pipelines_router
from orchestrator.pipelines.runner import PipelineRunner
from orchestrator.results import ResultsDir, retention_loop
from orchestrator.results import router as results_router
from orchestrator.scaling import ElasticScaler
from orchestrator.settings import OrchestratorSettings

log = logging.getLogger(__name__)

# Swagger UI's and ReDoc's JS/CSS, served from here (the fastapi-offline package ships them)
# rather than from a CDN, so /docs and /redoc work offline and on air-gapped clusters. Under
# /docs, so TokenAuth guards them like the pages themselves.
DOCS_ASSETS = "/docs/static"


def _with_task_spec_schema(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI document plus the TaskSpec schema (and the models it uses), which
    the submit route's body refers to: that route reads the raw body itself (JSON or
    YAML), so FastAPI never sees the model and would leave the reference dangling."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()  # FastAPI caches it in app.openapi_schema
            spec = TaskSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in {**spec.pop("$defs", {}), "TaskSpec": spec}.items():
                schemas.setdefault(name, schema)
        return app.openapi_schema or {}

    return openapi


def create_app(settings: OrchestratorSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = await connect(settings.redis)
        await check_server(conn)
        fleet = Fleet(
            conn,
            Keys(settings.key_prefix),
            refresh_sec=settings.refresh_sec,
            lease_intervals=settings.lease_intervals,
            idempotency_ttl=settings.idempotency_ttl,
        )
        fleet.scheduler.warm_routing = settings.warm_routing
        if settings.scaling.enabled:
            fleet.scaler = ElasticScaler(settings.scaling)
        pipelines = PipelineRunner(
            fleet, scan_sec=settings.pipeline_scan_sec, idempotency_ttl=settings.idempotency_ttl
        )
        await fleet.start()
        await pipelines.start()
        app.state.fleet = fleet
        app.state.pipelines = pipelines
        retention = asyncio.create_task(
            retention_loop(
                conn,
                fleet.keys,
                settings.results_dir,
                settings.results_retention_sec,
                settings.results_retention_interval_sec,
            ),
            name="results-retention",
        )
        log.info(
            "orchestrator ready on http://%s:%d (Redis %s, auth %s, uploads %s to %s)",
            settings.host,
            settings.port,
            settings.redis,
            "on" if settings.api_token else "off, loopback only",
            "on" if settings.worker_token else "off (no FLOWMESH_WORKER_TOKEN)",
            settings.results_dir,
        )
        try:
            yield
        finally:
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
            await pipelines.stop()
            await fleet.stop()
            await conn.aclose()

    app = FastAPIOffline(
        title="FlowMesh orchestrator",
        version=__version__,
        description="Submit AI tasks and watch them run on a fleet of workers.",
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        # No "valid" badge fetched from validator.swagger.io (which would also tell it the
        # spec's URL): nothing on the page leaves the orchestrator.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.results = ResultsDir(settings.results_dir)
    app.include_router(router)
    app.include_router(results_router)
    app.include_router(pipelines_router)
    app.include_router(metrics_router)
    app.openapi = _with_task_spec_schema(app)  # type: ignore[method-assign]

    @app.get("/healthz", summary="Liveness and Redis reachability (no auth)")
    async def healthz(request: Request) -> Any:
        try:
            await request.app.state.fleet.conn.ping()
        except (RedisError, OSError) as exc:
            return JSONResponse(status_code=503, content={"status": "error", "redis": str(exc)})
        return {"status": "ok", "redis": "ok", "version": __version__}

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("%s %s failed: Redis error: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=503, content={"detail": f"Redis unavailable: {exc}"})

    @app.exception_handler(IdempotencyConflict)
    async def idempotency_conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        # 422, as the IETF Idempotency-Key draft says for a key reused with another payload.
        log.info("Idempotency-Key %r reused for a different request: refused", exc.key)
        return JSONResponse(
            status_code=422,
            content={
                "detail": f"Idempotency-Key {exc.key!r} was already used for a different "
                f"request (within FLOWMESH_IDEMPOTENCY_TTL_SEC={settings.idempotency_ttl} s); "
                "use a new key"
            },
        )

    # The last added runs first: the access log sees every reply, auth's and size's too.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(TokenAuth, token=settings.api_token, worker_token=settings.worker_token)
    app.add_middleware(AccessLog)
    return app

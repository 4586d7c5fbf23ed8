"""The gateway's FastAPI app factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from broker.arena import ArenaStore
from broker.connection import connect, redact, resolve_redis_url
from broker.jobs import open_store
from broker.keys import Keys
from broker.queue import RequestQueue
from broker.registry import WorkerRegistry
from broker.settings import Settings
from gateway.arena import router as arena_router
from gateway.auth import Limits, check_exposure, load_api_keys
from gateway.edge import BodyGuard
from gateway.errors import install_error_handlers
from gateway.files import router as files_router
from gateway.hub import EventHub
from gateway.jobs import router as jobs_router
from gateway.judge import router as judge_router
from gateway.metrics import Metrics
from gateway.routes import router
from gateway.state import Gateway, GatewayDep, LiveModels

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    api_keys = load_api_keys(settings)
    check_exposure(settings, api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = await asyncio.to_thread(resolve_redis_url, settings)
        redis = connect(url)
        jobs = open_store(settings, url)
        keys = Keys(settings.key_prefix)
        queue = RequestQueue(redis, keys)
        hub = EventHub(redis, keys, on_orphan=queue.cancel)
        await hub.start()
        app.state.limits = limits = Limits(
            redis,
            keys,
            api_keys,
            settings.rate_limit_requests_per_min,
            settings.rate_limit_tokens_per_min,
            keyless_role="user" if settings.insecure else "admin",
            window_s=settings.rate_limit_window_s,
        )
        app.state.gateway = Gateway(
            settings=settings,
            redis=redis,
            queue=queue,
            hub=hub,
            metrics=Metrics(),
            models=LiveModels(WorkerRegistry(redis, keys)),
            limits=limits,
            jobs=jobs,
            arena=ArenaStore(redis, keys, settings.arena_battle_ttl_s),
        )
        log.info("gateway %s ready on redis %s", hub.gateway_id, redact(url))
        try:
            yield
        finally:
            await hub.stop()
            await redis.aclose()
            await jobs.aclose()

    app = FastAPI(title="Corral", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    app.include_router(router)
    app.include_router(jobs_router)
    app.include_router(files_router)
    app.include_router(arena_router)
    app.include_router(judge_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(gateway: GatewayDep) -> JSONResponse:
        try:
            await gateway.redis.ping()
            redis_ok = True
        except Exception:  # any failure to reach Redis means not ready
            redis_ok = False
        ready = redis_ok and gateway.hub.connected
        body = {
            "status": "ready" if ready else "not ready",
            "redis": redis_ok,
            "pubsub": gateway.hub.connected,
            "gateway": gateway.hub.gateway_id,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(gateway: GatewayDep) -> Response:
        served = await gateway.models.get(refresh=True)
        for model, workers in served.items():
            gateway.metrics.live_workers.labels(model).set(len(workers))
            gateway.metrics.queue_depth.labels(model).set(await gateway.queue.depth(model))
            gateway.metrics.worker_cancelled.labels(model).set(sum(w.cancelled for w in workers))
            gateway.metrics.worker_tokens_wasted.labels(model).set(sum(w.tokens_wasted for w in workers))
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def main(settings: Settings | None = None) -> None:
    import uvicorn

    settings = settings or Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")

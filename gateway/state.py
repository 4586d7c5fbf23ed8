"""What the gateway's routes share: built once in the app's lifespan, reached via a dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, cast

import redis.asyncio as aioredis
from fastapi import Depends, Request

from broker.arena import ArenaStore
from broker.connection import UNAVAILABLE
from broker.jobs import JobStore
from broker.keys import Keys
from broker.queue import RequestQueue
from broker.registry import WorkerRegistry
from broker.schemas import WorkerInfo
from broker.settings import Settings
from gateway.auth import Limits
from gateway.hub import EventHub
from gateway.metrics import Metrics

# How long the list of live models may be reused before asking Redis again.
_MODELS_FRESH_S = 1.0


@dataclass
class LiveModels:
    """The served models, cached briefly so a request costs no read of the registry; while the
    registry's Redis (or shard) is unreachable, the last answer stands if there is one."""

    registry: WorkerRegistry
    _served: dict[str, list[WorkerInfo]] = field(default_factory=dict)
    _fetched_at: float = float("-inf")

    async def get(self, refresh: bool = False) -> dict[str, list[WorkerInfo]]:
        if refresh or time.monotonic() - self._fetched_at > _MODELS_FRESH_S:
            try:
                self._served = await self.registry.models()
            except UNAVAILABLE:
                if not self._served:
                    raise
                return self._served
            self._fetched_at = time.monotonic()
        return self._served

    async def find(self, model: str) -> list[WorkerInfo] | None:
        served = await self.get()
        if model not in served:  # maybe a worker just came up
            served = await self.get(refresh=True)
        return served.get(model)


@dataclass
class Gateway:
    settings: Settings
    redis: aioredis.Redis
    queue: RequestQueue
    hub: EventHub
    metrics: Metrics
    models: LiveModels
    limits: Limits
    jobs: JobStore
    arena: ArenaStore

    @property
    def keys(self) -> Keys:
        return self.jobs.keys


async def get_gateway(request: Request) -> Gateway:
    return cast(Gateway, request.app.state.gateway)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]

"""The worker registry: one heartbeat hash per live worker, expiring on its own when it dies."""

from __future__ import annotations

import redis.asyncio as aioredis
from pydantic import ValidationError

from broker.keys import Keys
from broker.schemas import WorkerInfo


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def beat(self, info: WorkerInfo, ttl_s: float) -> None:
        key = self.keys.worker(info.worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=info.to_hash())
            pipe.pexpire(key, int(ttl_s * 1000))
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        await self.redis.delete(self.keys.worker(worker_id))

    async def live(self) -> list[WorkerInfo]:
        keys = [k async for k in self.redis.scan_iter(match=self.keys.worker_pattern, count=500)]
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        workers = []
        for fields in hashes:
            if not fields:  # expired between SCAN and HGETALL
                continue
            try:
                workers.append(WorkerInfo.from_hash(fields))
            except (ValidationError, ValueError):
                continue  # a half-written hash; the next beat completes it
        return workers

    async def models(self) -> dict[str, list[WorkerInfo]]:
        """Served model name → its live workers."""
        served: dict[str, list[WorkerInfo]] = {}
        for worker in await self.live():
            if not worker.engine_alive:
                continue
            for model in worker.models:
                served.setdefault(model, []).append(worker)
        return served

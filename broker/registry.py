"""The worker registry: one heartbeat hash per live worker, expiring on its own when it dies,
and an index of them (a sorted set scored by expiry), so listing never scans the keyspace."""

from __future__ import annotations

import redis.asyncio as aioredis
from pydantic import ValidationError

from broker.connection import atomically
from broker.keys import Keys
from broker.schemas import WorkerInfo, now_ms


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def beat(self, info: WorkerInfo, ttl_s: float) -> None:
        key, ttl_ms = self.keys.worker(info.worker_id), int(ttl_s * 1000)
        fields = [part for item in info.to_hash().items() for part in item]
        now = now_ms()
        await atomically(
            self.redis,
            ("HSET", key, *fields),
            ("PEXPIRE", key, ttl_ms),
            ("ZADD", self.keys.workers, now + ttl_ms, info.worker_id),
            ("ZREMRANGEBYSCORE", self.keys.workers, "-inf", now),
        )

    async def remove(self, worker_id: str) -> None:
        await atomically(
            self.redis, ("DEL", self.keys.worker(worker_id)), ("ZREM", self.keys.workers, worker_id)
        )

    async def live(self) -> list[WorkerInfo]:
        ids = await self.redis.zrangebyscore(self.keys.workers, now_ms(), "+inf")
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self.keys.worker(worker_id))
            hashes = await pipe.execute()
        workers = []
        for fields in hashes:
            if not fields:  # expired between the index's read and HGETALL
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

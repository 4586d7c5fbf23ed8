"""The request queue: one Redis stream per model, consumed by the `workers` group.

enqueue (gateway) → claim (worker, only as many as it has free slots) → ack (worker, when the
request has finished and its last event is published). Acked entries are deleted so that the
stream holds only waiting and in-flight work."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from broker.keys import WORKER_GROUP, Keys
from broker.schemas import Event, GenerationRequest

log = logging.getLogger(__name__)

# Field of a stream entry that holds the request's JSON.
_FIELD = "r"


@dataclass(frozen=True)
class Claimed:
    entry_id: str
    request: GenerationRequest


class RequestQueue:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def enqueue(self, request: GenerationRequest) -> str:
        return await self.redis.xadd(self.keys.requests(request.model), {_FIELD: request.model_dump_json()})

    async def ensure_group(self, model: str) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests(model), WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def claim(self, model: str, consumer: str, count: int, block_ms: int | None) -> list[Claimed]:
        """Up to `count` new requests; waits up to `block_ms` for the first when none is waiting
        (None: return at once)."""
        if count <= 0:
            return []
        stream = self.keys.requests(model)
        reply = await self.redis.xreadgroup(
            WORKER_GROUP, consumer, {stream: ">"}, count=count, block=block_ms
        )
        claimed: list[Claimed] = []
        rejected: list[str] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    claimed.append(Claimed(entry_id, GenerationRequest.model_validate_json(fields[_FIELD])))
                except (KeyError, ValidationError) as e:
                    log.error("rejected malformed stream entry %s on %s: %s", entry_id, stream, e)
                    rejected.append(entry_id)
        if rejected:
            await self.ack(model, rejected)
        return claimed

    async def ack(self, model: str, entry_ids: list[str]) -> None:
        if not entry_ids:
            return
        stream = self.keys.requests(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, WORKER_GROUP, *entry_ids)
            pipe.xdel(stream, *entry_ids)
            await pipe.execute()

    async def known(self, model: str) -> bool:
        """Whether this model has ever had a worker (its stream and group exist)."""
        return bool(await self.redis.exists(self.keys.requests(model)))

    async def depth(self, model: str) -> int:
        """Requests waiting for a worker (delivered-but-unacked ones are not counted)."""
        try:
            groups = await self.redis.xinfo_groups(self.keys.requests(model))
        except ResponseError:  # no such stream yet
            return 0
        for group in groups:
            if group["name"] == WORKER_GROUP:
                lag = group.get("lag")
                return int(lag) if lag is not None else await self.redis.xlen(self.keys.requests(model))
        return await self.redis.xlen(self.keys.requests(model))

    async def publish(self, events: list[tuple[str, Event]]) -> None:
        """Publish many requests' events in one round trip (one pipeline per engine step)."""
        if not events:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id, event in events:
                pipe.publish(self.keys.output(request_id), event.model_dump_json(exclude_defaults=True))
            await pipe.execute()

    async def cancel(self, request_id: str) -> None:
        """Tell every worker to drop this request at its next step."""
        await self.redis.publish(self.keys.cancel, request_id)

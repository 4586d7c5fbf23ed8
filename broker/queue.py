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
    # Taken over from a dead worker: its progress says where to continue.
    reclaimed: bool = False


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
        entries = [entry for _stream, stream_entries in reply or [] for entry in stream_entries]
        claimed = self._parse(stream, entries)
        taken = {c.entry_id for c in claimed}
        rejected = [entry_id for entry_id, _ in entries if entry_id not in taken]
        if rejected:
            await self.ack(model, rejected)
        return claimed

    def _parse(self, stream: str, entries: list) -> list[Claimed]:
        """Requests from stream entries; malformed ones (and ones deleted while pending) are
        left out, logged, for the caller to ack."""
        claimed: list[Claimed] = []
        for entry_id, fields in entries:
            if not fields:
                continue
            try:
                claimed.append(Claimed(entry_id, GenerationRequest.model_validate_json(fields[_FIELD])))
            except (KeyError, ValidationError) as e:
                log.error("rejected malformed stream entry %s on %s: %s", entry_id, stream, e)
        return claimed

    async def ack(self, model: str, entry_ids: list[str], request_ids: list[str] | None = None) -> None:
        if not entry_ids:
            return
        stream = self.keys.requests(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, WORKER_GROUP, *entry_ids)
            pipe.xdel(stream, *entry_ids)
            if request_ids:
                pipe.delete(*[self.keys.progress(r) for r in request_ids])
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

    async def publish(
        self,
        events: list[tuple[str, Event]],
        progress: dict[str, dict[str, str]] | None = None,
        ttl_s: int = 3600,
    ) -> set[str]:
        """Publish many requests' events, and record their progress, in one round trip (one
        pipeline per engine step). Returns the requests nobody received events for: their
        gateway is gone."""
        if not events and not progress:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id, event in events:
                pipe.publish(self.keys.output(request_id), event.model_dump_json(exclude_defaults=True))
            for request_id, fields in (progress or {}).items():
                pipe.hset(self.keys.progress(request_id), mapping=fields)
                pipe.expire(self.keys.progress(request_id), ttl_s)
            replies = await pipe.execute()
        heard: dict[str, bool] = {}
        for (request_id, _), receivers in zip(events, replies, strict=False):
            heard[request_id] = heard.get(request_id, False) or receivers > 0
        return {request_id for request_id, any_heard in heard.items() if not any_heard}

    async def progress(self, request_id: str) -> dict[str, str]:
        return await self.redis.hgetall(self.keys.progress(request_id))

    async def count_attempt(self, request_id: str) -> int:
        return await self.redis.hincrby(self.keys.progress(request_id), "attempts", 1)

    async def reclaim(
        self, model: str, consumer: str, dead: set[str], count: int, min_idle_ms: int
    ) -> list[Claimed]:
        """Take over up to `count` requests pending on consumers in `dead` (workers whose
        heartbeat expired). XCLAIM's min-idle check makes sure two live workers never both
        take the same request."""
        if count <= 0 or not dead:
            return []
        stream = self.keys.requests(model)
        pending = await self.redis.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=1000)
        orphans = [p["message_id"] for p in pending if p["consumer"] in dead][:count]
        if not orphans:
            return []
        entries = await self.redis.xclaim(stream, WORKER_GROUP, consumer, min_idle_ms, orphans)
        return [Claimed(c.entry_id, c.request, reclaimed=True) for c in self._parse(stream, entries)]

    async def consumers(self, model: str) -> dict[str, int]:
        """Consumer name → requests pending on it."""
        try:
            found = await self.redis.xinfo_consumers(self.keys.requests(model), WORKER_GROUP)
        except ResponseError:
            return {}
        return {c["name"]: int(c["pending"]) for c in found}

    async def forget_consumer(self, model: str, consumer: str) -> None:
        await self.redis.xgroup_delconsumer(self.keys.requests(model), WORKER_GROUP, consumer)

    async def cancel(self, request_id: str) -> None:
        """Tell every worker to drop this request at its next step."""
        await self.redis.publish(self.keys.cancel, request_id)

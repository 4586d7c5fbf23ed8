"""The request queue: one Redis stream per model, consumed by the `workers` group.

enqueue (gateway) → claim (worker, only as many as it has free slots) → ack (worker, when the
request has finished and its last event is published). Acked entries are deleted so that the
stream holds only waiting and in-flight work."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis import exceptions as redis_exceptions
from redis.crc import key_slot
from redis.exceptions import ResponseError

from broker.connection import UNAVAILABLE
from broker.keys import LANES, WORKER_GROUP, Keys
from broker.progress import ChoiceProgress, ProgressUpdate
from broker.progress import parse as parse_progress
from broker.schemas import Event, GenerationRequest, now_ms

log = logging.getLogger(__name__)

# Field of a stream entry that holds the request's JSON.
_FIELD = "r"
# Pending entries one reclaim pass looks at per stream (the rest wait for the next pass).
_RECLAIM_SCAN = 1000
# On a cluster, a node that could not be reached is not tried again for this long: what lives
# there waits (kept to send again), while the other nodes are served at full speed.
_NODE_DOWN_S = 0.5
# ... and for this long after, its pipelines are sent alone (see _per_node).
_NODE_DOUBTED_S = 30.0
_UNKNOWN_NODE = "?"
# On a cluster, the streams of a worker's names can lie in several slots, and one XREADGROUP
# reads one slot: an idle worker then blocks on each slot's streams in turn for at most this
# long, so a request waits no longer than this per other slot.
_SLOTS_BLOCK_MS = 100

# Waiting requests = entries − entries pending on a worker (acked entries are deleted, so the
# stream holds nothing else). Counting and adding in one script makes the backlog limit exact
# however many gateways race for the last place.
_ENQUEUE_BOUNDED = """
local pending = 0
local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
if ok then pending = summary[1] end
local waiting = redis.call('XLEN', KEYS[1]) - pending
local limit = tonumber(ARGV[2])
if limit > 0 and waiting >= limit then
    return {0, tostring(waiting)}
end
return {1, redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[4])}
"""


class QueueFull(Exception):
    """The model's lane already has `waiting` requests waiting: the backlog limit."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests waiting")
        self.waiting = waiting


@dataclass(frozen=True)
class Claimed:
    entry_id: str
    request: GenerationRequest
    # Taken over from a dead worker: its progress says where to continue.
    reclaimed: bool = False

    @property
    def lane(self) -> str:
        return self.request.lane


@dataclass
class Published:
    """What one publish did. `heard[i]`: whether event i reached its gateway, or None when it
    was not sent (its shard unreachable); `unrecorded`: requests whose progress was not written.
    Both are for sending again."""

    heard: list[bool | None] = field(default_factory=list)
    unrecorded: set[str] = field(default_factory=set)


# One publish's commands for one channel's events or one request's progress: (key, what it is
# for: the events' indices or the request id, commands).
_Op = tuple[str, tuple[int, ...] | str, list[tuple[Any, ...]]]


class RequestQueue:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._enqueue_bounded = redis.register_script(_ENQUEUE_BOUNDED)
        # Cluster node name → until when it is taken for down (see _NODE_DOWN_S).
        self._down_until: dict[str, float] = {}
        self._doubted_until: dict[str, float] = {}

    async def enqueue(self, request: GenerationRequest, max_waiting: int = 0) -> str:
        """Add a request to its model's lane; with `max_waiting`, raise QueueFull instead when
        that many requests already wait there."""
        stream = self.keys.requests(request.model, request.lane)
        if not max_waiting:
            return cast(str, await self.redis.xadd(stream, {_FIELD: request.model_dump_json()}))
        added, value = await self._enqueue_bounded(
            keys=[stream], args=[WORKER_GROUP, max_waiting, _FIELD, request.model_dump_json()]
        )
        if not added:
            raise QueueFull(int(value))
        return str(value)

    async def ensure_group(self, model: str) -> None:
        for lane in LANES:
            try:
                await self.redis.xgroup_create(
                    self.keys.requests(model, lane), WORKER_GROUP, id="0", mkstream=True
                )
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def claim(
        self,
        model: str | tuple[str, ...],
        consumer: str,
        count: int,
        block_ms: int | None,
        lanes: tuple[str, ...] = ("interactive",),
    ) -> list[Claimed]:
        """Up to `count` new requests from these lanes of this model (or these models, for a
        worker that serves several names); waits up to `block_ms` for the first when none is
        waiting (None: return at once)."""
        if count <= 0:
            return []
        models = (model,) if isinstance(model, str) else model
        by_slot: dict[int, dict[Any, Any]] = {}
        for name in models:
            for lane in lanes:
                stream = self.keys.requests(name, lane)
                by_slot.setdefault(self._slot(stream), {})[stream] = ">"
        if len(by_slot) > 1 and block_ms is not None:
            block_ms = min(block_ms, _SLOTS_BLOCK_MS)
        replies = [  # one slot after another (see _per_node)
            await self._read_group(consumer, streams, count, block_ms) for streams in by_slot.values()
        ]
        claimed: list[Claimed] = []
        for stream, entries in [item for reply in replies for item in reply or []]:
            parsed = self._parse(stream, entries)
            claimed += parsed
            taken = {c.entry_id for c in parsed}
            rejected = [entry_id for entry_id, _ in entries if entry_id not in taken]
            if rejected:
                await self.redis.xack(stream, WORKER_GROUP, *rejected)
                await self.redis.xdel(stream, *rejected)
        # Reading several lanes (or slots) can return `count` from each: every entry read is now
        # pending here, so all are returned (the engine queues what exceeds its batch).
        return claimed

    async def _read_group(
        self, consumer: str, streams: dict[Any, Any], count: int, block_ms: int | None
    ) -> Any:
        """XREADGROUP on streams of one slot. On a cluster it is sent straight to the slot's
        node: left to itself, redis-py asks the server for the keys of every XREADGROUP first
        (COMMAND GETKEYS, a round trip), its keys being movable."""
        if not isinstance(self.redis, aioredis.RedisCluster):
            return await self.redis.xreadgroup(WORKER_GROUP, consumer, streams, count=count, block=block_ms)
        args: list[Any] = ["GROUP", WORKER_GROUP, consumer, "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *streams, *streams.values()]
        await self.redis.initialize()  # the map, relearnt if a failure dropped it
        node = self.redis.get_node_from_key(next(iter(streams)))
        return await self.redis.execute_command("XREADGROUP", *args, target_nodes=node)

    def _slot(self, key: str) -> int:
        """The key's cluster slot; on a single server every key is in the one same place."""
        return key_slot(key.encode()) if isinstance(self.redis, aioredis.RedisCluster) else 0

    def _parse(self, stream: str, entries: list[Any]) -> list[Claimed]:
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

    async def ack(
        self,
        model: str,
        entry_ids: list[str],
        request_ids: list[str] | None = None,
        lane: str = "interactive",
    ) -> None:
        if not entry_ids:
            return
        stream = self.keys.requests(model, lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, WORKER_GROUP, *entry_ids)
            pipe.xdel(stream, *entry_ids)
            for request_id in request_ids or []:
                pipe.delete(*self._progress_keys(request_id))  # one slot: the request's
            await pipe.execute()

    def _progress_keys(self, request_id: str) -> tuple[str, str]:
        return self.keys.progress(request_id), self.keys.attempts(request_id)

    async def known(self, model: str) -> bool:
        """Whether this model has ever had a worker (its stream and group exist)."""
        return bool(await self.redis.exists(self.keys.requests(model)))

    async def depth(self, model: str, lane: str = "interactive") -> int:
        """Requests waiting for a worker (delivered-but-unacked ones are not counted)."""
        stream = self.keys.requests(model, lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xpending(stream, WORKER_GROUP)
            length, pending = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise length
        return int(length) - (0 if isinstance(pending, Exception) else int(pending["pending"]))

    async def publish(
        self,
        events: list[tuple[str, Event]],
        progress: dict[str, ProgressUpdate] | None = None,
    ) -> Published:
        """Publish many requests' events, and record their progress, in one round trip (one
        pipeline per engine step; on a cluster, one per node, so a node that is down holds back
        only what lives on it). Raises only when nothing could be sent."""
        if not events and not progress:
            return Published()
        # One message per gateway channel, its requests' events in order: a step's SPUBLISHes,
        # messages to deliver and (on a cluster) bus messages to replicas number the gateways,
        # not the events.
        by_channel: dict[str, list[int]] = {}
        for i, (request_id, _) in enumerate(events):
            by_channel.setdefault(self.keys.output_of(request_id), []).append(i)
        ops: list[_Op] = [
            (channel, tuple(at), [("SPUBLISH", channel, frame(*(events[i] for i in at)))])
            for channel, at in by_channel.items()
        ]
        for request_id, update in (progress or {}).items():
            key = self.keys.progress(request_id)
            commands: list[tuple[Any, ...]] = [("APPEND", key, update.entries)]
            if update.expire_at_ms is not None:
                commands.append(("PEXPIREAT", key, update.expire_at_ms))
            ops.append((key, request_id, commands))
        replies = await self._per_node(ops)
        published = Published(heard=[None] * len(events))
        for (_, what, _), reply in zip(ops, replies, strict=True):
            if isinstance(reply, BaseException):
                if isinstance(what, str):
                    published.unrecorded.add(what)
            elif isinstance(what, tuple):
                for i in what:
                    published.heard[i] = int(reply) > 0
        return published

    async def _per_node(self, ops: list[_Op]) -> list[Any]:
        """Runs the ops' commands in one pipeline per node (one in all on a single server);
        returns each op's first reply, or its node's error when that node was unreachable.
        Raises when no node could be reached, or on any other error."""
        groups: dict[str, list[int]] = {}
        for i, (key, _, _) in enumerate(ops):
            groups.setdefault(self._node(key), []).append(i)
        loop = asyncio.get_running_loop()
        outcomes: dict[str, list[Any] | BaseException] = {}
        for node in groups:
            if loop.time() < self._down_until.get(node, 0.0):
                outcomes[node] = redis_exceptions.ConnectionError(f"{node} was unreachable a moment ago")

        async def send(node: str) -> list[Any] | BaseException:
            try:
                return await self._run([ops[i] for i in groups[node]], node)
            except UNAVAILABLE as e:
                return e

        # Nodes that have not failed lately get their pipelines at once. redis-py's cluster client
        # closes all its connections when one meets a dead node, so a failure beside others may
        # be another node's doing: those go again one at a time, as do nodes that failed lately
        # (then nothing else is in flight when they fail again).
        live = [node for node in groups if node not in outcomes]
        at_once = [node for node in live if loop.time() >= self._doubted_until.get(node, 0.0)]
        outcomes.update(zip(at_once, await asyncio.gather(*(send(node) for node in at_once)), strict=True))
        failed = [node for node in at_once if isinstance(outcomes[node], BaseException)]
        for node in (failed if len(at_once) > 1 else []) + [node for node in live if node not in at_once]:
            outcomes[node] = await send(node)
        replies: list[Any] = [None] * len(ops)
        for node, outcome in outcomes.items():
            if isinstance(outcome, BaseException) and node in live:  # tried, and failed
                self._down_until[node] = loop.time() + _NODE_DOWN_S
                self._doubted_until[node] = loop.time() + _NODE_DOUBTED_S
                log.warning("%s unreachable (%s); what lives there waits", node or "redis", outcome)
            for n, i in enumerate(groups[node]):
                replies[i] = outcome if isinstance(outcome, BaseException) else outcome[n]
        failures = [o for o in outcomes.values() if isinstance(o, BaseException)]
        if failures and len(failures) == len(groups):
            raise failures[0]
        return replies

    def _node(self, key: str) -> str:
        """The name of the node that serves `key` now ("" on a single server)."""
        if not isinstance(self.redis, aioredis.RedisCluster):
            return ""
        try:
            return str(self.redis.get_node_from_key(key).name)
        except Exception:  # slots not known yet, or not covered mid-failover: one group of its own
            return _UNKNOWN_NODE

    async def _run(self, ops: list[_Op], node: str) -> list[Any]:
        """One pipeline of these ops' commands, all for `node`; each op's first reply."""
        # Told its node, redis-py's cluster pipeline neither works out each command's slot nor
        # asks the server for the keys of commands it does not know (SPUBLISH).
        target: dict[str, Any] = {}
        if isinstance(self.redis, aioredis.RedisCluster) and node != _UNKNOWN_NODE:
            await self.redis.initialize()  # the map, relearnt if a failure dropped it
            found = self.redis.get_node(node_name=node)
            target = {"target_nodes": found} if found is not None else {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, _, commands in ops:
                for command in commands:
                    pipe.execute_command(*command, **target)
            replies = await pipe.execute()
        firsts, at = [], 0
        for _, _, commands in ops:
            firsts.append(replies[at])
            at += len(commands)
        return firsts

    async def progress(self, request_id: str) -> dict[int, ChoiceProgress]:
        """Each choice's recorded progress, by index (empty if none was recorded)."""
        return parse_progress(await self.redis.get(self.keys.progress(request_id)))

    async def count_attempt(self, request_id: str, expire_at_ms: int) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(self.keys.attempts(request_id))
            pipe.pexpireat(self.keys.attempts(request_id), expire_at_ms)
            attempts, _ = await pipe.execute()
        return int(attempts)

    async def reclaim(
        self, model: str, consumer: str, dead: set[str], count: int, min_idle_ms: int
    ) -> list[Claimed]:
        """Take over up to `count` requests pending on consumers in `dead` (workers whose
        heartbeat expired), interactive lane first. XCLAIM's min-idle check makes sure two live
        workers never both take the same request."""
        claimed: list[Claimed] = []
        for lane in LANES:
            if len(claimed) >= count or not dead:
                break
            stream = self.keys.requests(model, lane)
            pending = await self.redis.xpending_range(
                stream, WORKER_GROUP, min="-", max="+", count=_RECLAIM_SCAN
            )
            orphans = [p["message_id"] for p in pending if p["consumer"] in dead][: count - len(claimed)]
            if orphans:
                entries = await self.redis.xclaim(stream, WORKER_GROUP, consumer, min_idle_ms, orphans)
                claimed += [
                    Claimed(c.entry_id, c.request, reclaimed=True) for c in self._parse(stream, entries)
                ]
        return claimed

    async def consumers(self, model: str) -> dict[str, int]:
        """Consumer name → requests pending on it, over all lanes."""
        pending: dict[str, int] = {}
        for lane in LANES:
            try:
                found = await self.redis.xinfo_consumers(self.keys.requests(model, lane), WORKER_GROUP)
            except ResponseError:
                continue
            for c in found:
                pending[c["name"]] = pending.get(c["name"], 0) + int(c["pending"])
        return pending

    async def forget_consumer(self, model: str, consumer: str) -> None:
        for lane in LANES:
            await self.redis.xgroup_delconsumer(self.keys.requests(model, lane), WORKER_GROUP, consumer)

    async def cancel(self, request_id: str, model: str, expire_at_ms: int | None = None) -> None:
        """Drop this request wherever it is: workers running it drop it at their next step (the
        broadcast), and a worker that claims it later drops it at once (the marker, kept until
        `expire_at_ms`, the request's deadline plus a grace, or an hour)."""
        expire_at_ms = expire_at_ms or now_ms() + 3_600_000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancelled(request_id), "1", pxat=expire_at_ms)
            pipe.execute_command("SPUBLISH", self.keys.cancel(model), request_id)
            await pipe.execute()

    async def cancelled(self, request_ids: list[str]) -> tuple[set[str], set[str]]:
        """Which of these requests were cancelled, and which could not be checked (their node
        unreachable, on a cluster), in one round trip."""
        if not request_ids:
            return set(), set()
        ops: list[_Op] = [
            (self.keys.cancelled(r), r, [("EXISTS", self.keys.cancelled(r))]) for r in request_ids
        ]
        replies = await self._per_node(ops)
        unknown = {
            r for r, reply in zip(request_ids, replies, strict=True) if isinstance(reply, BaseException)
        }
        found = {r for r, reply in zip(request_ids, replies, strict=True) if reply is True or reply == 1}
        return found - unknown, unknown


def frame(*events: tuple[str, Event]) -> str:
    """Events as published on their gateway's channel, one line each: the request id, a space,
    the event's JSON (which escapes every newline)."""
    return "\n".join(
        f"{request_id} {event.model_dump_json(exclude_defaults=True)}" for request_id, event in events
    )


def unframe(message: str) -> list[tuple[str, str]]:
    """The request id and event JSON of each event in a published message."""
    return [
        (request_id, event) for request_id, _, event in (line.partition(" ") for line in message.split("\n"))
    ]

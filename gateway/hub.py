"""The gateway's one pub/sub subscription, demultiplexed to a queue per request.

Request ids start with this gateway's id, and workers publish every event of this gateway's
requests on its one sharded channel, framed with the request id. The gateway subscribes once,
at start: events can never arrive before the subscription, no request pays for a SUBSCRIBE of
its own, and on a cluster the channel lives on one shard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from broker.keys import Keys
from broker.pubsub import ShardedSubscription
from broker.queue import unframe
from broker.schemas import Event

log = logging.getLogger(__name__)

# Request ids whose orphaned events were reported, remembered so each is cancelled once; and
# closed requests' models, remembered so an orphan can be cancelled on its model's channel.
_ORPHANS_REMEMBERED = 4096


class EventHub:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        gateway_id: str | None = None,
        on_orphan: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self._queues: dict[str, asyncio.Queue[str]] = {}
        self._models: dict[str, str] = {}
        self._subscription = ShardedSubscription(redis, keys.output(self.gateway_id), "event channel")
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        # Called once for a request of ours that nobody here waits for any more (its client
        # left), with its model: SPUBLISH counts this gateway's subscription as a listener
        # whatever the request, so only the gateway can tell the worker that nobody hears it.
        self.on_orphan = on_orphan
        self._orphans: dict[str, None] = {}
        self._closed: dict[str, str] = {}

    @property
    def connected(self) -> bool:
        return self._subscription.connected

    def new_request_id(self) -> str:
        return f"{self.gateway_id}.{uuid.uuid4().hex[:20]}"

    async def start(self, timeout_s: float = 30) -> None:
        """Subscribes, and returns once subscribed (raises TimeoutError after `timeout_s`)."""
        self._reader = asyncio.create_task(self._read())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.connected:
            if self._reader.done() or loop.time() > deadline:
                await self.stop()
                raise TimeoutError("the gateway could not subscribe to its event channel")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._subscription.aclose()

    def open(self, request_id: str, model: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._queues[request_id] = queue
        self._models[request_id] = model
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        model = self._models.pop(request_id, None)
        if model is not None:
            self._closed[request_id] = model
            if len(self._closed) > _ORPHANS_REMEMBERED:
                del self._closed[next(iter(self._closed))]

    def _orphaned(self, request_id: str) -> None:
        model = self._closed.get(request_id)
        if self.on_orphan is None or model is None or request_id in self._orphans:
            return
        self._orphans[request_id] = None
        if len(self._orphans) > _ORPHANS_REMEMBERED:
            del self._orphans[next(iter(self._orphans))]
        self.in_background(self.on_orphan(request_id, model))

    def in_background(self, coro: Awaitable[Any]) -> None:
        """Run `coro` to its end even if the task that asked is being cancelled (client gone)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self) -> None:
        async for message in self._subscription.messages():
            for request_id, event in unframe(message):
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(event)
                else:
                    self._orphaned(request_id)


class EventsLost(Exception):
    """A gap in a choice's seq numbers stayed open: some of its events never arrived."""


async def events(
    queue: asyncio.Queue[str], deadline_s: float, choices: int = 1, gap_timeout_s: float = 15.0
) -> AsyncIterator[Event]:
    """A request's events in seq order until every choice has ended, or until the first error;
    raises TimeoutError at the deadline (a loop.time() value).

    Duplicates (a seq already passed on) are dropped. An event that arrives ahead of a missing
    one waits for it: a worker republishes what no gateway received, as while this gateway's
    subscription was down, so the gap fills. One that stays open `gap_timeout_s` raises
    EventsLost rather than hand on text with a hole in it."""
    last_seq = [0] * choices
    early: list[dict[int, Event]] = [{} for _ in range(choices)]
    gap_since: float | None = None
    ended = 0
    loop = asyncio.get_running_loop()
    while ended < choices:
        wait_until = deadline_s if gap_since is None else min(deadline_s, gap_since + gap_timeout_s)
        try:
            async with asyncio.timeout(max(wait_until - loop.time(), 0)):  # passes every cancel on
                raw = await queue.get()
        except TimeoutError:
            if gap_since is not None and loop.time() >= gap_since + gap_timeout_s:
                raise EventsLost() from None
            raise
        event = Event.model_validate_json(raw)
        if event.seq <= last_seq[event.index]:
            continue
        index = event.index
        early[index][event.seq] = event
        while (ready := early[index].pop(last_seq[index] + 1, None)) is not None:
            last_seq[index] = ready.seq
            yield ready
            if ready.type == "error":
                return
            ended += ready.type == "done"
        if not any(early):
            gap_since = None
        elif gap_since is None:
            gap_since = loop.time()

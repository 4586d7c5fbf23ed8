"""The gateway's one pub/sub connection, demultiplexed to a queue per request.

Request ids start with this gateway's id, and the gateway pattern-subscribes once, at start, to
all of their channels: events can never arrive before the subscription, and no request pays
for a SUBSCRIBE of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from broker.keys import Keys
from broker.schemas import Event

log = logging.getLogger(__name__)

_RECONNECT_MAX_S = 5.0


# Request ids whose orphaned events were reported, remembered so each is cancelled once.
_ORPHANS_REMEMBERED = 4096


class EventHub:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        gateway_id: str | None = None,
        on_orphan: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self._channel_prefix = keys.output("")
        self._queues: dict[str, asyncio.Queue[str]] = {}
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self.connected = False
        # Called once for a request of ours that nobody here waits for any more (its client
        # left): PUBLISH counts this gateway's pattern subscription as a listener whatever the
        # request, so only the gateway can tell the worker that nobody hears it.
        self.on_orphan = on_orphan
        self._orphans: dict[str, None] = {}

    def new_request_id(self) -> str:
        return f"{self.gateway_id}.{uuid.uuid4().hex[:20]}"

    async def start(self) -> None:
        await self._pubsub.psubscribe(self.keys.output_pattern(self.gateway_id))
        self.connected = True
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def open(self, request_id: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def _orphaned(self, request_id: str) -> None:
        if self.on_orphan is None or request_id in self._orphans:
            return
        self._orphans[request_id] = None
        if len(self._orphans) > _ORPHANS_REMEMBERED:
            del self._orphans[next(iter(self._orphans))]
        self.in_background(self.on_orphan(request_id))

    def in_background(self, coro: Awaitable[Any]) -> None:
        """Run `coro` to its end even if the task that asked is being cancelled (client gone)."""
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                async for message in self._pubsub.listen():
                    self.connected = True
                    backoff_s = 0.1
                    request_id = message["channel"][len(self._channel_prefix) :]
                    queue = self._queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(message["data"])
                    else:
                        self._orphaned(request_id)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as e:
                self.connected = False
                log.warning("pub/sub connection lost (%s); retrying in %.1fs", e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)


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
            raw = await asyncio.wait_for(queue.get(), max(wait_until - loop.time(), 0))
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

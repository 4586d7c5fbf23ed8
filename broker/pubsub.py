"""Sharded pub/sub subscriptions (SSUBSCRIBE), on a single server and on a cluster alike.

A sharded channel lives on the shard that owns its slot, so a subscription is a connection to
that node. redis-py 5's asyncio clients have no sharded pub/sub (its cluster client has no
pub/sub at all), so this holds the connection itself: it subscribes, reads messages, pings when
the channel is quiet, and when the node fails, the slot moves (the server then ends the
subscription with SUNSUBSCRIBE) or the link goes quiet, it asks the cluster where the slot is
now and subscribes there. Whatever was published in between is not replayed: Corral's workers
send again what SPUBLISH says nobody received."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from broker.connection import twin

log = logging.getLogger(__name__)

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 0.5
# A quiet subscription sends a PING this often; no reply within another period ends the link.
_PING_EVERY_S = 5.0
# On a cluster, a subscription checks this often that its node still owns the channel's slot.
_VERIFY_EVERY_S = 5.0


class ShardedSubscription:
    """One sharded channel, read as an async iterator of message payloads that reconnects for
    ever (until closed). `connected` says whether it is subscribed right now; `on_connect` runs
    after each (re)subscription."""

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        name: str = "pub/sub",
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        # On a cluster, a client of its own for finding the channel's node: relearning the slots
        # on the caller's client would drop the connections its other commands are using.
        self.client = twin(client) if isinstance(client, aioredis.RedisCluster) else client
        self.channel = channel
        self.name = name
        self.on_connect = on_connect
        self.connected = False
        self._connection: AbstractConnection | None = None

    def _node_connection(self) -> AbstractConnection:
        """A new connection to the node that owns the channel's slot."""
        if isinstance(self.client, aioredis.RedisCluster):
            node = self.client.get_node_from_key(self.channel)
            kind, kwargs = node.connection_class, node.connection_kwargs
        else:
            kind, kwargs = (
                self.client.connection_pool.connection_class,
                self.client.connection_pool.connection_kwargs,
            )
        # No health checks: they expect a plain PONG, and a subscribed connection answers a list.
        return kind(**{**kwargs, "health_check_interval": 0})  # type: ignore[no-any-return]

    async def _refresh(self) -> None:
        """Relearns the cluster's slots (after a failover or a slot move)."""
        if isinstance(self.client, aioredis.RedisCluster):
            try:
                await self.client.nodes_manager.initialize()
            except Exception as e:  # mid-failover any node may refuse or answer half a map
                log.debug("%s: cluster map not refreshed (%s)", self.name, e)

    async def _subscribe(self) -> AbstractConnection:
        if isinstance(self.client, aioredis.RedisCluster):
            await self.client.initialize()  # learns the slots on first use; then does nothing
        connection = self._node_connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            # A replica accepts SSUBSCRIBE and receives the channel's messages, but SPUBLISH on
            # the master does not count it: workers would take the gateway for gone. So only a
            # master will do (a stale map mid-failover can point at a replica).
            await connection.send_command("ROLE")
            try:
                role = await connection.read_response(timeout=_PING_EVERY_S)
            except aioredis.ResponseError:  # an ACL without ROLE: trust the map
                role = ["master"]
            if not (isinstance(role, list) and role and str(role[0]) == "master"):
                raise aioredis.ConnectionError(f"{connection.host}:{connection.port} is not a master")  # type: ignore[attr-defined]
            await connection.send_command("SSUBSCRIBE", self.channel)
            reply = await connection.read_response(timeout=_PING_EVERY_S)
            if reply is None:
                raise aioredis.TimeoutError("no reply to SSUBSCRIBE")
            if not (isinstance(reply, list) and str(reply[0]).lower() == "ssubscribe"):
                raise aioredis.ConnectionError(f"unexpected reply to SSUBSCRIBE: {reply!r}")
        except BaseException:
            await connection.disconnect()
            raise
        return connection

    async def messages(self) -> AsyncIterator[str]:
        backoff_s = _BACKOFF_MIN_S
        while True:
            try:
                self._connection = connection = await self._subscribe()
                self.connected = True
                backoff_s = _BACKOFF_MIN_S
                if self.on_connect is not None:
                    self.on_connect()
                async for payload in self._read(connection):
                    yield payload
            except Exception as e:  # whatever broke the link, the subscription must come back
                log.warning("%s: subscription lost (%s); again in %.1f s", self.name, e, backoff_s)
            finally:
                self.connected = False
                if self._connection is not None:
                    await self._connection.disconnect()
                    self._connection = None
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
            await self._refresh()

    async def _still_owner(self, connection: AbstractConnection) -> bool:
        """Whether the node this subscription is on still owns the channel's slot, by a fresh
        cluster map (a node that became a replica keeps its subscribers)."""
        if not isinstance(self.client, aioredis.RedisCluster):
            return True
        await self._refresh()
        try:
            owner = self.client.get_node_from_key(self.channel)
        except Exception:  # the slot not covered right now: stay until it is
            return True
        return (owner.host, owner.port) == (connection.host, connection.port)  # type: ignore[attr-defined]

    async def _read(self, connection: AbstractConnection) -> AsyncIterator[str]:
        pinged = False
        loop = asyncio.get_running_loop()
        verified_at = loop.time()
        while True:
            if loop.time() - verified_at >= _VERIFY_EVERY_S:
                if not await self._still_owner(connection):
                    raise aioredis.ConnectionError("the channel's slot is served by another node now")
                verified_at = loop.time()
            reply: Any = await connection.read_response(timeout=_PING_EVERY_S)
            if reply is None:  # quiet for a period
                if pinged:
                    raise aioredis.ConnectionError("no reply to PING") from None
                await connection.send_command("PING")
                pinged = True
                continue
            pinged = False
            if not isinstance(reply, list) or not reply:
                continue
            kind = str(reply[0]).lower()
            if kind == "smessage":
                yield str(reply[2])
            elif kind == "sunsubscribe":  # the slot moved to another node
                raise aioredis.ConnectionError("the channel's slot moved")

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.disconnect()
        if isinstance(self.client, aioredis.RedisCluster):
            await self.client.aclose()

"""Forming a Redis Cluster from fresh nodes, without redis-cli: CLUSTER MEET, ADDSLOTSRANGE
and REPLICATE from redis-py. Used by `corral cluster-create` (compose's `cluster` profile) and by
the tests' loopback cluster."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import redis

SLOTS = 16384


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The slots split evenly over `masters`, as (first, last) ranges."""
    per_master = SLOTS // masters
    return [
        (i * per_master, SLOTS - 1 if i == masters - 1 else (i + 1) * per_master - 1) for i in range(masters)
    ]


def create_cluster(
    nodes: list[tuple[str, int]], replicas: int = 1, timeout_s: float = 60, password: str | None = None
) -> None:
    """Joins fresh cluster-enabled nodes into one cluster: the first len/(1+replicas) become
    masters with the slots split evenly, each of the rest a replica of one master in turn.
    Returns once every node says the cluster is ok. A cluster already formed is left alone."""
    clients = [redis.Redis(host=h, port=p, password=password, decode_responses=True) for h, p in nodes]
    deadline = time.monotonic() + timeout_s
    for client in clients:
        _until(client.ping, deadline)
    if _state(clients[0]) == "ok":
        return
    masters = len(nodes) // (1 + replicas)
    if masters < 1 or masters * (1 + replicas) != len(nodes):
        raise ValueError(f"{len(nodes)} nodes cannot make masters with {replicas} replicas each")
    for host, port in nodes[1:]:
        _command(clients[0], "CLUSTER MEET", socket.gethostbyname(host), port)
    for client, (first, last) in zip(clients, slot_ranges(masters), strict=False):
        _command(client, "CLUSTER ADDSLOTSRANGE", first, last)
    ids = [_command(client, "CLUSTER MYID") for client in clients[:masters]]
    for i, client in enumerate(clients[masters:]):
        # A replica can follow its master once the meeting has reached it.
        _until(lambda c=client, m=ids[i % masters]: _command(c, "CLUSTER REPLICATE", m), deadline)
    for client in clients:
        _until(lambda c=client: _state(c) == "ok" or None, deadline)


def _command(client: redis.Redis, *args: object) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _state(client: redis.Redis) -> str:
    return str(_command(client, "CLUSTER INFO").get("cluster_state"))


def _until(attempt: Callable[[], object], deadline: float) -> None:
    """Calls `attempt` until it returns something other than None without a Redis error."""
    while True:
        try:
            if attempt() is not None:
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not form in time")
        time.sleep(0.05)

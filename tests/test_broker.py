"""The broker contract against a real Redis, and the embedded Valkey."""

from __future__ import annotations

import asyncio
import os
import random

import redis as redis_sync
import redis.asyncio as aioredis

from broker.connection import EmbeddedValkey, connect
from broker.keys import Keys
from broker.queue import QueueFull, RequestQueue, unframe
from broker.registry import WorkerRegistry
from broker.schemas import ChatMessage, Event, GenerationRequest, WorkerInfo, now_ms
from tests.conftest import free_port, on_single_server_and_cluster
from tests.helpers import subscribed, until

redis_url = on_single_server_and_cluster()  # each test on a single server and on a cluster


def request(i: int = 0, model: str = "m") -> GenerationRequest:
    return GenerationRequest(
        request_id=f"gw.{i}",
        model=model,
        messages=[ChatMessage(role="user", content=f"hello {i}")],
        deadline_ms=now_ms() + 60_000,
    )


async def test_claim_takes_only_as_many_requests_as_there_are_free_slots(redis_url, key_prefix) -> None:
    r = connect(redis_url)
    queue = RequestQueue(r, Keys(key_prefix))
    await queue.ensure_group("m")
    for i in range(5):
        await queue.enqueue(request(i))

    first = await queue.claim("m", "w1", count=2, block_ms=None)
    second = await queue.claim("m", "w2", count=10, block_ms=None)

    assert [c.request.request_id for c in first] == ["gw.0", "gw.1"]
    assert [c.request.request_id for c in second] == ["gw.2", "gw.3", "gw.4"]
    assert await queue.claim("m", "w1", count=0, block_ms=None) == []
    await r.aclose()


async def test_ack_removes_the_entry_and_depth_counts_only_waiting_work(redis_url, key_prefix) -> None:
    r = connect(redis_url)
    keys = Keys(key_prefix)
    queue = RequestQueue(r, keys)
    await queue.ensure_group("m")
    for i in range(3):
        await queue.enqueue(request(i))
    assert await queue.depth("m") == 3

    claimed = await queue.claim("m", "w1", count=2, block_ms=None)
    assert await queue.depth("m") == 1
    await queue.ack("m", [c.entry_id for c in claimed])

    assert await r.xlen(keys.requests("m")) == 1
    assert (await r.xpending(keys.requests("m"), "workers"))["pending"] == 0
    await r.aclose()


async def test_the_backlog_limit_admits_exactly_its_number_however_many_race(redis_url, key_prefix) -> None:
    r = connect(redis_url)
    queue = RequestQueue(r, Keys(key_prefix))
    await queue.ensure_group("m")

    results = await asyncio.gather(
        *(queue.enqueue(request(i), max_waiting=5) for i in range(20)), return_exceptions=True
    )

    assert sum(isinstance(x, str) for x in results) == 5
    refused = [x for x in results if not isinstance(x, str)]
    assert len(refused) == 15 and all(isinstance(x, QueueFull) and x.waiting == 5 for x in refused)
    # Requests a worker has taken are in flight, not waiting: they free places.
    await queue.claim("m", "w1", count=2, block_ms=None)
    assert await queue.depth("m") == 3
    await queue.enqueue(request(20), max_waiting=5)
    await queue.enqueue(request(21), max_waiting=5)
    try:
        await queue.enqueue(request(22), max_waiting=5)
        raise AssertionError("a sixth waiting request was admitted")
    except QueueFull as e:
        assert e.waiting == 5
    await r.aclose()


async def test_publish_reports_which_events_a_gateway_received(redis_url, key_prefix) -> None:
    r = connect(redis_url)
    keys = Keys(key_prefix)
    queue = RequestQueue(r, keys)
    a, b = Event(seq=1, type="delta", text="a"), Event(seq=1, type="delta", text="b")
    events = [("gwA.1", a), ("gwB.1", b)]
    async with subscribed(r, keys.output("gwA")) as received:
        assert (await queue.publish(events)).heard == [True, False]  # nobody listens for gateway B
        await until(lambda: received, "gateway A's event")
    assert [unframe(m) for m in received] == [[("gwA.1", a.model_dump_json(exclude_defaults=True))]]
    await r.aclose()


async def test_a_malformed_entry_is_rejected_and_does_not_block_the_queue(
    redis_url, key_prefix, caplog
) -> None:
    r = connect(redis_url)
    keys = Keys(key_prefix)
    queue = RequestQueue(r, keys)
    await queue.ensure_group("m")
    await r.xadd(keys.requests("m"), {"r": '{"not": "a request"}'})
    await queue.enqueue(request(1))

    claimed = await queue.claim("m", "w1", count=5, block_ms=None)

    assert [c.request.request_id for c in claimed] == ["gw.1"]
    assert "rejected malformed stream entry" in caplog.text
    assert await r.xlen(keys.requests("m")) == 1  # only the good one is left, awaiting its ack
    await r.aclose()


async def test_a_publish_sends_each_gateway_one_message_with_its_events_in_order(
    redis_url, key_prefix
) -> None:
    r = connect(redis_url)
    keys = Keys(key_prefix)
    queue = RequestQueue(r, keys)
    events = [(f"gw{i % 2}.{i % 3}", Event(seq=i, type="delta", text=f"a\nb {i}")) for i in range(1, 13)]
    async with subscribed(r, keys.output("gw0")) as zero, subscribed(r, keys.output("gw1")) as one:
        assert (await queue.publish(events)).heard == [True] * 12
        await until(lambda: zero and one, "a message on each channel")
        await asyncio.sleep(0.1)
    assert len(zero) == len(one) == 1
    for gateway, messages in (("gw0", zero), ("gw1", one)):
        received = [(request_id, Event.model_validate_json(raw)) for request_id, raw in unframe(messages[0])]
        assert received == [e for e in events if e[0].startswith(gateway + ".")]
    await r.aclose()


async def test_worker_registry_forgets_a_worker_whose_heartbeat_expired(redis_url, key_prefix) -> None:
    r = connect(redis_url)
    registry = WorkerRegistry(r, Keys(key_prefix))
    await registry.beat(WorkerInfo(worker_id="a", models=["m1"], device="cpu", max_batch=4), ttl_s=0.2)
    await registry.beat(
        WorkerInfo(worker_id="b", models=["m2"], device="cpu", max_batch=4, in_flight=3), ttl_s=30
    )

    assert sorted(await registry.models()) == ["m1", "m2"]
    assert (await registry.models())["m2"][0].in_flight == 3

    async def expired() -> bool:
        return not await r.exists(Keys(key_prefix).worker("a"))

    await until(expired, "a's heartbeat expires", 5)
    assert sorted(await registry.models()) == ["m2"]
    await registry.beat(WorkerInfo(worker_id="c", models=["m3"], device="cpu", max_batch=4), ttl_s=30)
    # The index lists the live workers (a beat drops expired entries), so nothing scans.
    assert await r.zrange(Keys(key_prefix).workers, 0, -1) == ["b", "c"]
    await registry.remove("b")
    assert [w.worker_id for w in await registry.live()] == ["c"]
    await r.aclose()


def test_embedded_valkey_keeps_data_across_a_restart_with_aof(tmp_path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    url = server.ensure()
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.xadd("corral:q:{m}", {"r": "kept"})
    # A second process on the same folder reuses the running server instead of starting one.
    assert EmbeddedValkey(tmp_path / "valkey").ensure() == url
    server.stop()
    assert EmbeddedValkey(tmp_path / "valkey").running_url() is None

    # Restarted on a port of the user's choosing (CORRAL_VALKEY_PORT), in a session of its own.
    port = free_port()
    restarted = EmbeddedValkey(tmp_path / "valkey", port, own_session=True)
    url = restarted.ensure()
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        assert redis_sync.Redis.from_url(url).connection_pool.connection_kwargs["port"] == port
        assert client.xrange("corral:q:{m}")[0][1] == {"r": "kept"}
        server_pid = client.info("server")["process_id"]
        assert os.getsid(server_pid) == server_pid != os.getsid(0)  # Ctrl-C here does not reach it
    finally:
        restarted.stop()


async def test_connect_decodes_replies_to_str(redis_url, key_prefix) -> None:
    r: aioredis.Redis = connect(redis_url)
    await r.set(f"{key_prefix}:x", "1", ex=5)
    assert await r.get(f"{key_prefix}:x") == "1"
    await r.aclose()


async def test_progress_is_appended_per_step_and_a_repeated_append_changes_nothing(
    redis_url, key_prefix
) -> None:
    from broker.progress import ProgressUpdate, entry

    r = connect(redis_url)
    keys = Keys(key_prefix)
    queue = RequestQueue(r, keys)
    first = ProgressUpdate(entry(0, 0, [10, 11], seq=1, sent=5, done=False), expire_at_ms=now_ms() + 60_000)
    first.entries += entry(1, 0, [20], seq=1, sent=3, done=False)
    second = ProgressUpdate(entry(0, 2, [12, 13], seq=2, sent=9, done=True))
    await queue.publish([], {"gw.1": first})
    await queue.publish([], {"gw.1": second})
    await queue.publish([], {"gw.1": second})  # a pipeline sent again after a dropped connection
    await queue.count_attempt("gw.1", now_ms() + 60_000)

    progress = await queue.progress("gw.1")

    assert progress[0].tokens == [10, 11, 12, 13]
    assert (progress[0].seq, progress[0].sent, progress[0].done) == (2, 9, True)
    assert progress[1].tokens == [20]
    assert (progress[1].seq, progress[1].sent, progress[1].done) == (1, 3, False)
    # Only the new tokens travel: the log grows by each step's tokens, not by all so far.
    assert len(await r.get(keys.progress("gw.1"))) == len(first.entries) + 2 * len(second.entries)
    assert 0 < await r.pttl(keys.progress("gw.1")) <= 60_000
    await queue.ack("m", ["0-1"], ["gw.1"])
    assert not await r.exists(keys.progress("gw.1"), keys.attempts("gw.1"))
    await r.aclose()


async def test_a_cancel_stops_a_task_whose_client_has_a_socket_timeout(redis_url, key_prefix) -> None:
    """redis-py 5 sends each command under `asyncio.wait_for` when the client has a socket
    timeout, and on Python 3.11 that loses a cancel landing as the send completes: a worker's
    cancelled heartbeat loop ran on and the worker never stopped (broker/connection.py)."""
    r = connect(redis_url)
    if not isinstance(r, aioredis.RedisCluster):  # connect() sets a socket timeout on clusters only
        await r.aclose()
        r = aioredis.Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    key = Keys(key_prefix).worker("w1")

    async def beat() -> None:
        while True:
            await r.set(key, "1", px=10_000)

    draw = random.Random(7)
    ran_on = 0
    for _ in range(200):
        task = asyncio.create_task(beat())
        await asyncio.sleep(draw.uniform(0, 0.002))
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            ran_on += 1
            while not task.done():  # stop it for good before the next try
                task.cancel()
                await asyncio.sleep(0.01)
    await r.aclose()
    assert ran_on == 0, f"{ran_on} of 200 cancelled tasks went on running"

"""Corral on a Redis Cluster (3 masters, 3 replicas of valkey-server, on loopback): gateways whose
event channels sit on different masters, a base model and its LoRA adapter, a worker killed
mid-answer, and masters killed while answers stream."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from broker.connection import connect
from broker.keys import Keys
from broker.pubsub import ShardedSubscription
from tests.cluster import LocalCluster, free_port_run
from tests.conftest import LORA_TOKENS, MODEL, PROMPTS, Stack, free_port
from tests.helpers import stream_text, until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """A cluster of this module's own: its tests kill nodes."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), free_port_run(6)).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_stack(
    cluster: LocalCluster, redis_url: str, model_path: str, adapters, tmp_path_factory
) -> Iterator[Stack]:
    """A gateway, a worker (SmolLM2 with two LoRA adapters) and a job runner on the cluster;
    the job queue on the single server, since arq cannot use a cluster."""
    stack = Stack(cluster.url, f"test-{uuid.uuid4().hex[:10]}", free_port(), jobs_redis_url=redis_url)
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        specs = [f"{name}={path}" for name, path in adapters.items()]
        stack.main_worker = stack.start_worker(CORRAL_LORA=json.dumps(specs))  # type: ignore[attr-defined]
        home = str(tmp_path_factory.mktemp("cluster-home"))
        runner = [sys.executable, "-m", "corral", "jobs"]
        stack.processes.append(subprocess.Popen(runner, env=stack.env(CORRAL_HOME=home)))
        yield stack
    finally:
        stack.stop()


def channel_masters(cluster: LocalCluster, prefix: str) -> dict[str, int]:
    """Gateway id → the port of the master its event channel lives on (from the live
    subscriptions each master reports)."""
    found: dict[str, int] = {}
    for port in cluster.live_ports():
        node = cluster.node(port)
        if node.info("replication")["role"] != "master":
            continue
        for channel in node.execute_command("PUBSUB SHARDCHANNELS", f"{prefix}:out:*"):
            found[channel.split("{", 1)[1].rstrip("}")] = port
    return found


def gateways_on_two_masters(stack: Stack, cluster: LocalCluster) -> list[str]:
    """URLs of two gateways whose channels sit on different masters (more are started until the
    random gateway ids land so; each has a 2-in-3 chance)."""
    urls = {stack.url: None}
    for _ in range(8):
        masters = channel_masters(cluster, stack.key_prefix)
        if len(set(masters.values())) >= 2:
            break
        urls[stack.start_gateway()] = None
    masters = channel_masters(cluster, stack.key_prefix)
    assert len(set(masters.values())) >= 2, masters
    by_url = {}
    for url in urls:
        gateway_id = httpx.get(f"{url}/readyz", timeout=5).json()["gateway"]
        by_url[url] = masters[gateway_id]
    first = next(iter(by_url))
    second = next(u for u, m in by_url.items() if m != by_url[first])
    return [first, second]


def decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


async def test_two_gateways_on_different_masters_serve_a_model_and_its_adapter_exactly(
    cluster_stack: Stack, cluster: LocalCluster, greedy, reference, tokenizer
) -> None:
    urls = gateways_on_two_masters(cluster_stack, cluster)
    prompt = PROMPTS[0]
    messages = [{"role": "user", "content": prompt}]
    expected = {
        MODEL: greedy(messages, LORA_TOKENS)[0],
        "tuned": decoded(tokenizer, reference("tuned", prompt)[0]),
    }
    assert expected[MODEL] != expected["tuned"]
    for url in urls:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for model, text in expected.items():
                body = {"model": model, "messages": messages, "max_tokens": LORA_TOKENS, "temperature": 0}
                reply = await client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["message"]["content"] == text, (url, model)
                streamed, _ = await stream_text(client, prompt, max_tokens=LORA_TOKENS, model=model)
                assert streamed == text, (url, model)


def test_arena_votes_on_the_cluster_reach_a_leaderboard_computed_by_a_job_on_its_own_redis(
    cluster_stack: Stack, redis_url: str
) -> None:
    """Battles and votes live on the cluster (one slot, `{arena}`); the ratings job is queued on
    the job queue's single server, and its runner reads the votes from the cluster and writes
    the leaderboard back there."""
    url = cluster_stack.url
    for choice in ("left", "right", "left"):
        battle = httpx.post(f"{url}/v1/arena/battles", json={}, timeout=10).json()  # anonymous
        turn = {"content": "Name a colour.", "temperature": 0, "max_tokens": 2}
        with httpx.stream(
            "POST", f"{url}/v1/arena/battles/{battle['id']}/turns", json=turn, timeout=120
        ) as r:
            assert r.status_code == 200 and any(line == "data: [DONE]" for line in r.iter_lines())
        voted = httpx.post(f"{url}/v1/arena/battles/{battle['id']}/vote", json={"vote": choice}, timeout=10)
        assert voted.status_code == 200, voted.text
    job = httpx.post(f"{url}/v1/leaderboard/refresh", timeout=10).json()
    # The job's record is on the job queue's Redis, not on the cluster.
    assert redis.Redis.from_url(redis_url).exists(Keys(cluster_stack.key_prefix).job(job["id"]))

    def finished() -> dict | None:
        state = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()
        return state if state["status"] in ("succeeded", "failed", "aborted") else None

    deadline = time.monotonic() + 180
    while (state := finished()) is None:
        assert time.monotonic() < deadline, "the ratings job did not end"
        time.sleep(0.2)
    assert state["status"] == "succeeded", state
    board = httpx.get(f"{url}/v1/leaderboard", timeout=10).json()
    assert board["battles"] == 3 and {row["model"] for row in board["data"]} <= {MODEL, "tuned", "other"}


async def test_a_worker_killed_mid_answer_on_the_cluster_loses_nothing(
    cluster_stack: Stack, cluster: LocalCluster, greedy
) -> None:
    stack = cluster_stack
    rescuer = stack.start_worker(served_name=MODEL)
    prompts = [f"Write a short poem about the number {i}." for i in range(6)]
    tokens = 40
    expected = {p: greedy([{"role": "user", "content": p}], tokens)[0] for p in prompts}
    main = stack.main_worker  # type: ignore[attr-defined]
    before = int(stack.worker_info(main.worker_id)["tokens_out"])
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        answers = [asyncio.create_task(stream_text(client, p, max_tokens=tokens)) for p in prompts]

        async def streaming() -> bool:  # the first worker holds some of them and has streamed
            info = stack.worker_info(main.worker_id)
            return int(info["in_flight"]) > 0 and int(info["tokens_out"]) > before

        await until(streaming, "the first worker streams", 120)
        main.send_signal(signal.SIGKILL)
        texts = [text for text, _ in await asyncio.gather(*answers)]
    assert texts == [expected[p] for p in prompts]
    assert int(stack.worker_info(rescuer.worker_id)["reclaimed"]) >= 1

    def progress_keys() -> list[str]:
        return [
            key
            for port in cluster.live_ports()
            for key in cluster.node(port).scan_iter(f"{stack.key_prefix}:progress:*")
        ]

    await until(lambda: not progress_keys(), "no progress key left after the acks", 10)
    stack.main_worker = rescuer  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- masters killed

# Long enough to outlast a failover (a 3 s node timeout, then an election): a worker is not
# taken for dead, and events are not given up on, while a shard is promoted.
PATIENT = {"CORRAL_WORKER_TTL_S": "15", "CORRAL_UNHEARD_GRACE_S": "60", "CORRAL_ADMISSION_RETRY_S": "60"}


@pytest.fixture(scope="module")
def failover_stack(cluster: LocalCluster, redis_url: str, model_path: str) -> Iterator[Stack]:
    """Gateways whose channels lie on at least two masters, and one worker, all patient with
    failovers."""
    stack = Stack(cluster.url, f"test-{uuid.uuid4().hex[:10]}", free_port(), jobs_redis_url=redis_url)
    try:
        stack.start("gateway", **PATIENT)
        stack.wait_for_gateway()
        stack.gateways = [stack.url]  # type: ignore[attr-defined]
        while len(set(channel_masters(cluster, stack.key_prefix).values())) < 2:
            stack.gateways.append(stack.start_gateway(**PATIENT))  # type: ignore[attr-defined]
            assert len(stack.gateways) < 12  # type: ignore[attr-defined]
        stack.main_worker = stack.start_worker(CORRAL_MAX_BATCH="12", **PATIENT)  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()


def gateway_masters(stack: Stack, cluster: LocalCluster) -> dict[str, int]:
    """Gateway URL → the port of the master its channel lives on now."""
    masters = channel_masters(cluster, stack.key_prefix)
    ids = {url: httpx.get(f"{url}/readyz", timeout=5).json()["gateway"] for url in stack.gateways}  # type: ignore[attr-defined]
    return {url: masters[gateway_id] for url, gateway_id in ids.items() if gateway_id in masters}


async def streams_through_a_kill(
    stack: Stack, cluster: LocalCluster, gateways: list[str], victim: int, greedy
) -> tuple[dict[str, list[float]], float]:
    """Four greedy streams through each gateway; `victim` (a master's port) is killed once all
    stream. Asserts every text is whole; returns each gateway's chunk arrival times and how long
    the failover took (kill → a replica serves the slots). The killed node is then started again
    (it rejoins as a replica)."""
    tokens = 60
    prompts = [f"Tell me about the planet number {i}." for i in range(4)]
    expected = {p: greedy([{"role": "user", "content": p}], tokens)[0] for p in prompts}
    arrivals: dict[str, list[float]] = {url: [] for url in gateways}
    started: set[tuple[str, str]] = set()
    loop = asyncio.get_running_loop()

    async def stream(client: httpx.AsyncClient, url: str, prompt: str) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": tokens,
            "stream": True,
        }
        text = ""
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["delta"].get("content") or ""
                    arrivals[url].append(loop.time())
                    started.add((url, prompt))
        return text

    async with httpx.AsyncClient(timeout=300) as client:
        tasks = {(url, p): asyncio.create_task(stream(client, url, p)) for url in gateways for p in prompts}
        await until(lambda: len(started) == len(tasks), "every answer streams", 120)
        cluster.kill(victim)
        killed_at = loop.time()
        # Requests sent while the shard is away are admitted once a replica takes over (the
        # gateways retry admission for as long as PATIENT says).
        short = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        meanwhile = [
            asyncio.create_task(client.post(f"{url}/v1/chat/completions", json=short))
            for url in gateways
            for _ in range(3)
        ]
        await asyncio.to_thread(cluster.wait_ok, 60)  # a replica of the victim now serves its slots
        ok_at = loop.time()
        texts = {key: await task for key, task in tasks.items()}
        answers = await asyncio.gather(*meanwhile)
        assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
        # And so are requests sent after.
        for url in gateways:
            assert (await client.post(f"{url}/v1/chat/completions", json=short)).status_code == 200
    assert texts == {(u, p): expected[p] for u, p in tasks}
    cluster.restart(victim)
    await asyncio.to_thread(cluster.wait_ok, 60)
    return arrivals, ok_at - killed_at


def longest_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


async def test_killing_the_master_of_the_models_queue_loses_no_stream(
    failover_stack: Stack, cluster: LocalCluster, greedy
) -> None:
    stack = failover_stack
    victim = cluster.master_of(Keys(stack.key_prefix).requests(MODEL))
    gateways = list(gateway_masters(stack, cluster))[:2]
    await streams_through_a_kill(stack, cluster, gateways, victim, greedy)


async def test_killing_the_master_of_one_gateways_channel_stalls_no_other_gateway(
    failover_stack: Stack, cluster: LocalCluster, greedy
) -> None:
    stack = failover_stack
    queue_master = cluster.master_of(Keys(stack.key_prefix).requests(MODEL))
    by_master: dict[int, str] = {}
    for url, master in gateway_masters(stack, cluster).items():
        by_master.setdefault(master, url)
    # The victim holds a gateway's channel but not the queue; the bystander's channel is elsewhere.
    victim = next(m for m in by_master if m != queue_master)
    bystander = next(url for m, url in by_master.items() if m != victim)
    arrivals, failover_s = await streams_through_a_kill(
        stack, cluster, [by_master[victim], bystander], victim, greedy
    )
    # The bystander's streams went on while the victim's shard was promoted: none of its gaps
    # is as long as the failover.
    assert longest_gap(arrivals[bystander]) < failover_s, (longest_gap(arrivals[bystander]), failover_s)


async def test_killing_an_unrelated_master_loses_no_stream(
    failover_stack: Stack, cluster: LocalCluster, greedy
) -> None:
    stack = failover_stack
    queue_master = cluster.master_of(Keys(stack.key_prefix).requests(MODEL))
    url, master = next(iter(gateway_masters(stack, cluster).items()))
    masters = {m for _, _, m in cluster.slot_map(cluster.live_ports()[0])}
    victim = next(m for m in sorted(masters) if m not in (queue_master, master))
    await streams_through_a_kill(stack, cluster, [url], victim, greedy)


# --------------------------------------------------------------------------- planned failover


async def test_a_subscription_follows_its_channel_to_the_new_master_after_a_planned_failover(
    cluster: LocalCluster,
) -> None:
    """CLUSTER FAILOVER (maintenance, or a managed service's patching) turns the channel's master
    into a replica without killing it. A replica still delivers the channel's messages, but
    SPUBLISH on the new master would not count a subscriber left there: workers would take the
    gateway for gone. So the subscription must move to the new master."""
    client = connect(cluster.url)
    channel = f"test-{uuid.uuid4().hex[:8]}:out:{{{uuid.uuid4().hex[:12]}}}"
    subscription = ShardedSubscription(client, channel, "test channel")
    received: list[str] = []

    async def read() -> None:
        async for message in subscription.messages():
            received.append(message)

    reader = asyncio.create_task(read())
    try:
        await until(lambda: subscription.connected, "subscribed")
        old = cluster.master_of(channel)
        assert cluster.node(old).execute_command("SPUBLISH", channel, "before") == 1
        replica = next(
            port
            for port in cluster.live_ports()
            if (info := cluster.node(port).info("replication"))["role"] == "slave"
            and int(info["master_port"]) == old
        )
        cluster.node(replica).execute_command("CLUSTER", "FAILOVER")
        await until(lambda: cluster.master_of(channel) == replica, "the replica is the master", 30)
        await until(
            lambda: cluster.node(replica).execute_command("SPUBLISH", channel, "after") == 1,
            "the new master counts the subscription",
            30,
        )
        await until(lambda: "after" in received, "a message from the new master arrives", 10)
        assert received[0] == "before"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await subscription.aclose()
        await client.aclose()
        await asyncio.to_thread(cluster.wait_ok, 60)

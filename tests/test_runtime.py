"""The worker runtime in-process, in seconds: Corral's Worker around a model-free engine
(tests/helpers.TokenTap) and a real tokenizer, against a real Redis. Claim, stream, ack, lanes,
deadlines, cancel, takeover with continuation and unheard events, with no model and no process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.connection import connect
from broker.keys import Keys
from broker.pubsub import ShardedSubscription
from broker.queue import RequestQueue, unframe
from broker.schemas import ChatMessage, Event, GenerationRequest, now_ms
from tests.conftest import on_single_server_and_cluster
from tests.helpers import TokenTap, until
from workers.runtime import Worker
from workers.sequence import TokenFrontend

MODEL = "tap"


class Harness:
    """Workers of model `tap` in this event loop, and a gateway's side: enqueue, read events."""

    def __init__(self, redis_url: str, tokenizer) -> None:
        self.redis_url = redis_url
        self.tokenizer = tokenizer
        self.keys = Keys(f"test-runtime-{uuid.uuid4().hex[:10]}")
        self.gateway = f"gw{uuid.uuid4().hex[:6]}"
        self.redis: aioredis.Redis = connect(redis_url)
        self.queue = RequestQueue(self.redis, self.keys)
        self.tasks: list[asyncio.Task] = []
        # Request ids in the order their last event arrived.
        self.ended: list[str] = []

    def worker(self, max_batch: int = 4, step_s: float = 0.01, **options) -> Worker:
        engine = TokenTap(self.tokenizer, max_batch=max_batch, step_s=step_s)
        options = {
            "heartbeat_s": 0.1,
            "worker_ttl_s": 0.5,
            "unheard_grace_s": 0.5,
            "drain_timeout_s": 0.0,
            **options,
        }
        frontend = TokenFrontend(self.tokenizer)
        worker = Worker(engine, frontend, connect(self.redis_url), self.keys, MODEL, "none", **options)
        self.tasks.append(asyncio.create_task(worker.run()))
        return worker

    def request(self, tokens: int = 8, **fields) -> GenerationRequest:
        hi = [ChatMessage(role="user", content="Hi")]
        fields = {"messages": hi, "deadline_ms": now_ms() + 60_000, **fields}
        request_id = f"{self.gateway}.{uuid.uuid4().hex[:12]}"
        return GenerationRequest(request_id=request_id, model=MODEL, max_new_tokens=tokens, **fields)

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[dict[str, list[Event]]]:
        """Events of this gateway's requests as they arrive, by request id."""
        received: dict[str, list[Event]] = {}
        subscription = ShardedSubscription(self.redis, self.keys.output(self.gateway))

        async def read() -> None:
            async for message in subscription.messages():
                for request_id, raw in unframe(message):
                    event = Event.model_validate_json(raw)
                    received.setdefault(request_id, []).append(event)
                    if event.type in ("done", "error"):
                        self.ended.append(request_id)

        reader = asyncio.create_task(read())
        await until(lambda: subscription.connected, "subscribed", 10, every_s=0.01)
        try:
            yield received
        finally:
            reader.cancel()
            await subscription.aclose()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        # Bounded: a worker whose clean-up waits on a cluster node must not hold the suite (seen
        # once in CI, not reproduced; the tests' assertions are all made before this).
        _, pending = await asyncio.wait(self.tasks, timeout=20) if self.tasks else (set(), set())
        assert not pending, f"{len(pending)} worker task(s) did not stop within 20 s of a cancel:\n{stacks()}"
        await asyncio.wait_for(self.redis.aclose(), 10)


def stacks() -> str:
    """Where every task of the loop is waiting, for a test that finds one stuck."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"{task.get_name()}:")
        awaited: Any = task.get_coro()
        while awaited is not None:  # down the chain of what each coroutine awaits
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        lines.append(f"  awaiting {task._fut_waiter!r}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def ended(events: list[Event], choices: int = 1) -> bool:
    return sum(e.type in ("done", "error") for e in events) >= choices


def text_of(events: list[Event], index: int = 0) -> str:
    return "".join(e.text for e in events if e.index == index)


redis_url = on_single_server_and_cluster()  # each test on a single server and on a cluster


@pytest.fixture
async def harness(redis_url, tokenizer) -> AsyncIterator[Harness]:
    h = Harness(redis_url, tokenizer)
    yield h
    await h.close()


async def test_a_request_streams_each_choice_and_is_acked(harness: Harness) -> None:
    harness.worker()
    async with harness.listening() as received:
        request = harness.request(tokens=6, n=2)
        await harness.queue.enqueue(request)
        await until(lambda: ended(received.get(request.request_id, []), choices=2), "both choices end", 10)
    events = received[request.request_id]
    expected = harness.tokenizer.decode(TokenTap(harness.tokenizer, 1).text(6))
    for index in (0, 1):
        assert text_of(events, index) == expected
        (done,) = [e for e in events if e.index == index and e.type == "done"]
        assert done.finish_reason == "length" and done.usage.completion_tokens == 6
    first = [e.seq for e in events if e.index == 0]
    assert first == list(range(1, len(first) + 1))

    async def acked() -> bool:  # an acked entry is deleted from the stream
        return await harness.redis.xlen(harness.keys.requests(MODEL, "interactive")) == 0

    await until(acked, "the request is acked", 5)


async def test_interactive_work_goes_before_batch_work_that_queued_first(harness: Harness) -> None:
    worker = harness.worker(max_batch=1)
    async with harness.listening() as received:
        holder = harness.request(tokens=30)
        await harness.queue.enqueue(holder)
        await until(lambda: worker.active, "the holder runs", 10)
        batch = harness.request(tokens=2, lane="batch")
        interactive = harness.request(tokens=2)
        await harness.queue.enqueue(batch)
        await harness.queue.enqueue(interactive)
        await until(lambda: ended(received.get(batch.request_id, [])), "all end", 10)
    assert harness.ended == [holder.request_id, interactive.request_id, batch.request_id]


async def test_a_request_past_its_deadline_is_refused_unstarted(harness: Harness) -> None:
    harness.worker()
    async with harness.listening() as received:
        late = harness.request(deadline_ms=now_ms() - 1)
        await harness.queue.enqueue(late)
        await until(lambda: ended(received.get(late.request_id, [])), "the refusal", 10)
    (event,) = received[late.request_id]
    assert event.type == "error" and event.error.code == "deadline_exceeded"


async def test_a_cancelled_request_stops_running_and_one_cancelled_while_queued_never_starts(
    harness: Harness,
) -> None:
    worker = harness.worker(max_batch=1)
    async with harness.listening() as received:
        running, queued = harness.request(tokens=500), harness.request(tokens=500)
        await harness.queue.enqueue(running)
        await until(lambda: received.get(running.request_id), "the first tokens", 10)
        await harness.queue.enqueue(queued)
        await harness.queue.cancel(queued.request_id, MODEL, now_ms() + 60_000)
        await harness.queue.cancel(running.request_id, MODEL, now_ms() + 60_000)
        await until(lambda: worker.cancelled == 2 and not worker.active, "both cancelled", 10)
    assert worker.tokens_wasted == len(received[running.request_id])  # one token per event
    assert worker.tokens_wasted < 500 and queued.request_id not in received


async def test_a_worker_that_stops_mid_answer_hands_it_to_another_which_continues_the_same_text(
    harness: Harness,
) -> None:
    first = harness.worker(step_s=0.02)
    async with harness.listening() as received:
        request = harness.request(tokens=60)
        await harness.queue.enqueue(request)
        await until(lambda: len(received.get(request.request_id, [])) >= 10, "some tokens", 10)
        first.stop()  # drain timeout 0: what still runs is handed back with its progress
        second = harness.worker(step_s=0.02)
        await until(lambda: ended(received.get(request.request_id, [])), "the answer ends", 20)
    events = received[request.request_id]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gap, no repeat
    assert text_of(events) == harness.tokenizer.decode(TokenTap(harness.tokenizer, 1).text(60))
    assert events[-1].usage.completion_tokens == 60 and second.reclaimed == 1


async def test_events_nobody_heard_are_sent_again_once_the_gateway_listens(harness: Harness) -> None:
    worker = harness.worker(unheard_grace_s=5.0)
    request = harness.request(tokens=5)
    await harness.queue.enqueue(request)  # nobody listens yet
    await until(lambda: request.request_id in worker.unheard, "events sent to nobody", 10)
    async with harness.listening() as received:
        await until(lambda: ended(received.get(request.request_id, [])), "the answer, from its start", 10)
    events = received[request.request_id]
    assert events[0].seq == 1 and sorted({e.seq for e in events}) == list(range(1, events[-1].seq + 1))

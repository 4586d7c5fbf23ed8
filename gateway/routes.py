"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from broker.queue import QueueFull
from broker.schemas import (
    ChatMessage,
    DetokenizeResult,
    EmbedResult,
    TokenizeResult,
    ToolCall,
    Usage,
    WorkerInfo,
)
from broker.structured import SchemaError, check_schema
from gateway.auth import Limited, LimitsDep, caller
from gateway.calls import Call, metadata_of, new_request, require_worker, sse
from gateway.errors import (
    Backlogged,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    sse_error,
)
from gateway.openai_schemas import (
    ChatCompletionCreate,
    CompletionCreate,
    DetokenizeCreate,
    EmbeddingCreate,
    ResponseShape,
    SamplingFields,
    TokenizeCreate,
    add_tool_calls,
    embedding_body,
)
from gateway.state import Gateway, GatewayDep

R = TypeVar("R", TokenizeResult, DetokenizeResult, EmbedResult)

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


def _model_card(name: str, workers: list[WorkerInfo]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(min(w.started_at for w in workers)),
        "owned_by": "corral",
        "max_model_len": max(w.context_length for w in workers),
        "metadata": metadata_of(name, workers),
    }


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    served = await gateway.models.get(refresh=True)
    return {
        "object": "list",
        "data": [_model_card(name, workers) for name, workers in sorted(served.items())],
    }


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, gateway: GatewayDep) -> dict[str, Any]:
    workers = await gateway.models.find(model_id)
    if workers is None:
        raise ModelNotFound(model_id)
    return _model_card(model_id, workers)


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionCreate, gateway: GatewayDep, who: Limited, http: Request
) -> Response:
    messages = [
        ChatMessage(
            role=m.role,
            content=m.text(),
            tool_calls=[ToolCall.model_validate(c.model_dump()) for c in m.tool_calls or []] or None,
            tool_call_id=m.tool_call_id,
        )
        for m in body.messages
    ]
    calls = [c for m in messages for c in m.tool_calls or []]
    written = sum(len(m.content) for m in messages) + sum(len(c.function.arguments) for c in calls)
    check_input_size(gateway, written, "messages")
    await _check_tools(body)
    return await _generate(gateway, body, "chat", who.id, http, messages=messages, **body.tool_fields())


async def _check_tools(body: ChatCompletionCreate) -> None:
    """400s for tool fields that do not go together, and for a forced tool whose parameters
    cannot be enforced (naming the function)."""
    refused = body.tool_refusal()
    if refused is not None:
        raise InvalidRequest(refused, param="tool_choice", code="invalid_value")
    forced = body.forced_tools()
    if not forced:
        return
    structured = body.response_format is not None and body.response_format.type != "text"
    for field, used in (("response_format", structured), ("ignore_eos", body.ignore_eos)):
        if used:
            raise InvalidRequest(
                f"{field} cannot be used with a tool_choice that forces a call: the call is the answer",
                param=field,
                code="invalid_value",
            )
    for tool in forced:
        try:
            await asyncio.to_thread(check_schema, tool.function.parameters or {"type": "object"})
        except SchemaError as e:
            raise InvalidRequest(
                f"the parameters of tool {tool.function.name!r} cannot be enforced: {e}",
                param="tools",
                code="invalid_schema",
            ) from None


@router.post("/completions")
async def completions(body: CompletionCreate, gateway: GatewayDep, who: Limited, http: Request) -> Response:
    prompt = body.prompt_fields()
    check_input_size(gateway, len(prompt.get("prompt") or prompt.get("prompt_token_ids") or ""), "prompt")
    return await _generate(gateway, body, "completions", who.id, http, **prompt)


@router.post("/embeddings")
async def embeddings(
    body: EmbeddingCreate, gateway: GatewayDep, who: Limited, limits: LimitsDep
) -> dict[str, Any]:
    check_input_size(gateway, sum(len(item) for item in body.inputs()), "input")
    result = await _ask(gateway, body.model, "embed", EmbedResult, inputs=body.inputs())
    tokens = result.prompt_tokens
    if limits.tokens_per_min:
        gateway.hub.in_background(limits.spend(who.id, tokens))
    return {
        "object": "list",
        "data": embedding_body(result.embeddings, body.encoding_format),
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeCreate, gateway: GatewayDep, _: Limited) -> dict[str, Any]:
    messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages] if body.messages else None
    check_input_size(gateway, len(body.prompt or "") + sum(len(m.content) for m in messages or []), "prompt")
    result = await _ask(
        gateway, body.model, "tokenize", TokenizeResult, messages=messages, prompt=body.prompt
    )
    return result.model_dump()


@router.post("/detokenize")
async def detokenize(body: DetokenizeCreate, gateway: GatewayDep, _: Limited) -> dict[str, Any]:
    check_input_size(gateway, len(body.tokens), "tokens")
    result = await _ask(gateway, body.model, "detokenize", DetokenizeResult, prompt_token_ids=body.tokens)
    return result.model_dump()


def check_input_size(gateway: Gateway, chars: int, param: str) -> None:
    """A prompt's size is checked before anything tokenizes it (tokens count one each)."""
    limit = gateway.settings.max_input_chars
    if chars > limit:
        raise InvalidRequest(
            f"The input has {chars} characters; this server takes at most {limit}.",
            param=param,
            code="input_too_long",
        )


async def _ask(gateway: Gateway, model: str, kind: str, expected: type[R], **fields: Any) -> R:
    """A request a worker answers with one result of the `expected` kind (it needs the model's
    tokenizer)."""
    await require_worker(gateway, model)
    request = new_request(gateway, model=model, kind=kind, **fields)
    call = Call(gateway, request, kind, caller="")
    try:
        await call.enqueue()
        async for event in call.events():
            if event.type == "error":
                assert event.error is not None
                raise GenerationFailed(event.error.code, event.error.message)
            if isinstance(event.result, expected):
                return event.result
    finally:
        call.release()
    raise GenerationFailed("engine_error", "the worker ended the request without a result")


async def _json_schema(body: SamplingFields) -> str | None:
    """The schema a response_format asks the output to follow, checked (None: free text)."""
    spec = body.response_format
    if spec is None or spec.type == "text":
        return None
    if body.ignore_eos:
        raise InvalidRequest(
            "ignore_eos cannot be used with response_format: the output ends where its JSON does",
            param="ignore_eos",
            code="invalid_value",
        )
    schema = spec.json_schema.schema_ if spec.type == "json_schema" else {"type": "object"}
    try:
        return await asyncio.to_thread(check_schema, schema)  # a big schema takes a while
    except SchemaError as e:
        raise InvalidRequest(
            f"response_format's schema cannot be enforced: {e}",
            param="response_format",
            code="invalid_schema",
        ) from None


async def _generate(
    gateway: Gateway, body: SamplingFields, endpoint: str, who: str, http: Request, **prompt: Any
) -> Response:
    refused = body.refusal()
    if refused is not None:
        raise InvalidRequest(refused[1], param=refused[0], code="unsupported_parameter")
    await require_worker(gateway, body.model)
    settings = gateway.settings
    max_tokens = body.requested_max_tokens() or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
            param="max_tokens",
            code="invalid_value",
        )
    if body.n > settings.max_n:
        raise InvalidRequest(
            f"n is {body.n}; this server allows at most {settings.max_n}", param="n", code="invalid_value"
        )
    request = new_request(
        gateway,
        json_schema=await _json_schema(body),
        response_format=body.response_format.model_dump(by_alias=True) if body.response_format else None,
        timeout_s=body.timeout,
        model=body.model,
        sampling=body.sampling(),
        max_new_tokens=max_tokens,
        n=body.n,
        lane=body.lane,
        stop=body.stop_list(),
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs_count(),
        defaulted=body.defaulted(),
        **prompt,
    )
    call = Call(gateway, request, endpoint, who)
    shape = ResponseShape(_response_id(endpoint, request.request_id), body.model, chat=endpoint == "chat")
    try:
        await call.enqueue(settings.max_backlog)
    except QueueFull as e:
        call.finished = True  # never queued: nothing to cancel
        call.release()
        raise Backlogged(body.model, e.waiting) from None
    except BaseException:
        call.release()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(call, shape, include_usage), media_type="text/event-stream")
    return await _complete_unless_abandoned(call, shape, http)


def _response_id(endpoint: str, request_id: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + request_id.split(".", 1)[1]


def _total(usages: list[Usage]) -> Usage:
    """One request's usage over its choices: the prompt is processed once."""
    return Usage(
        prompt_tokens=usages[0].prompt_tokens, completion_tokens=sum(u.completion_tokens for u in usages)
    )


async def _complete_unless_abandoned(call: Call, shape: ResponseShape, http: Request) -> Response:
    """The whole answer, unless the client leaves first: then the request is cancelled at
    once instead of generating until its deadline for nobody."""
    answer = asyncio.ensure_future(_complete(call, shape))
    watch = asyncio.ensure_future(_until_disconnected(http))
    try:
        await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping
        answer.cancel()
        raise
    finally:
        watch.cancel()
    gone = watch.done() and not watch.cancelled() and watch.exception() is None
    if answer.done() or not gone:
        return await answer
    answer.cancel()  # its `finally` releases the call, which cancels the request
    with contextlib.suppress(asyncio.CancelledError):
        await answer
    return Response(status_code=499)  # nobody reads it: the client is gone


async def _until_disconnected(http: Request) -> None:
    """Returns when the client goes away. The body has been read, so the next ASGI message is
    the disconnect (as Starlette's StreamingResponse listens for it); nothing is polled."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _complete(call: Call, shape: ResponseShape) -> JSONResponse:
    n = call.request.n
    texts: list[list[str]] = [[] for _ in range(n)]
    calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    usages: list[Usage] = []
    logprobs: list[list[Any] | None] = [None if call.request.logprobs is None else [] for _ in range(n)]
    try:
        async for event in call.events():
            if event.type == "error":
                assert event.error is not None
                raise GenerationFailed(event.error.code, event.error.message)
            if (event.text or event.tool_calls) and not (any(texts) or any(calls)):
                call.first_token()
            texts[event.index].append(event.text)
            if event.tool_calls:
                add_tool_calls(calls[event.index], event.tool_calls)
            if event.logprobs:
                logprobs[event.index] += event.logprobs  # type: ignore[operator]
            if event.type == "done":
                assert event.usage is not None
                finish[event.index] = event.finish_reason
                usages.append(event.usage)
    except DeadlineExceeded:
        call.count("timeout")
        raise
    except GenerationFailed:
        call.count("error")
        raise
    finally:
        call.release()
    if len(usages) < n:
        raise GenerationFailed("engine_error", "the worker ended the request without a result")
    usage = _total(usages)
    call.count("ok", usage)
    return JSONResponse(shape.complete(["".join(t) for t in texts], finish, usage, logprobs, calls))


class _Outbox:
    """SSE chunks that leave in one write. Events that arrived together go out together, and a
    choice's consecutive text deltas become one chunk: under load the gateway then pays per
    write and per chunk, not per token."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self._parts: list[bytes] = []
        self._text: list[str] = []  # deltas of choice `_index` not yet made a chunk
        self._index = 0

    def text(self, index: int, text: str) -> None:
        if self._text and index != self._index:
            self._close_text()
        self._index = index
        self._text.append(text)

    def chunk(self, payload: dict[str, Any]) -> None:
        self._close_text()
        self._parts.append(sse(payload))

    def _close_text(self) -> None:
        if self._text:
            self._parts.append(sse(self.shape.chunk("".join(self._text), self._index)))
            self._text = []

    def take(self) -> bytes:
        self._close_text()
        out, self._parts = b"".join(self._parts), []
        return out


async def _stream(call: Call, shape: ResponseShape, include_usage: bool) -> AsyncIterator[bytes]:
    sent_first = False
    usages: list[Usage] = []
    outbox = _Outbox(shape)
    try:
        for index in range(call.request.n):
            outbox.chunk(shape.chunk(None, index, first=True))
        yield outbox.take()
        async for event in call.events():
            if event.type == "error":
                assert event.error is not None
                call.count("error")
                yield outbox.take() + sse_error(event.error.code, event.error.message).encode()
                return
            if not sent_first and (event.text or event.logprobs or event.tool_calls):
                call.first_token()
                sent_first = True
            if event.logprobs or event.tool_calls:
                outbox.chunk(
                    shape.chunk(event.text, event.index, logprobs=event.logprobs, tool_calls=event.tool_calls)
                )
            elif event.text:
                outbox.text(event.index, event.text)
            if event.type == "done":
                assert event.usage is not None
                usages.append(event.usage)
                outbox.chunk(shape.chunk(None, event.index, finish_reason=event.finish_reason))
            if call.queue.empty() and (ready := outbox.take()):  # nothing else waits: send it
                yield ready
        usage = _total(usages)
        call.count("ok", usage)
        if include_usage:
            outbox.chunk(shape.usage_chunk(usage))
        yield outbox.take() + b"data: [DONE]\n\n"
    except DeadlineExceeded as e:
        call.count("timeout")
        yield outbox.take() + sse_error(e.code or "deadline_exceeded", e.message).encode()
    except GenerationFailed as e:
        call.count("error")
        yield outbox.take() + sse_error(e.code or "engine_error", e.message).encode()
    finally:
        call.release()

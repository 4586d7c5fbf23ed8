"""One request inside a worker: its prompt, its text so far, and the events it publishes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.progress import GRACE_MS, ChoiceProgress, ProgressUpdate, entry
from broker.queue import Claimed
from broker.schemas import (
    DetokenizeResult,
    EmbedResult,
    ErrorCode,
    Event,
    EventError,
    FinishReason,
    TokenizeResult,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from broker.structured import SchemaError, grammar_of
from workers import tools
from workers.chat_templates import NO_STOPS, Stops
from workers.engine import Engine, SamplingParams, StepOutput
from workers.text import IncrementalDetokenizer, StopStrings


class InvalidPrompt(Exception):
    """The request cannot be run as given; `code` is the OpenAI error code for it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_prompt(
    claimed: Claimed, tokenizer: Any, tool_format: tools.ToolFormat = tools.HERMES
) -> list[int]:
    """The request's prompt as token ids; never empty (the last line of defence: a zero-token
    sequence kills transformers' batching thread, and with it every request on the worker)."""
    ids = _encode(claimed, tokenizer, tool_format)
    if not ids:
        raise InvalidPrompt("invalid_request", "the prompt is empty: it encodes to no tokens")
    return ids


def _encode(claimed: Claimed, tokenizer: Any, tool_format: tools.ToolFormat = tools.HERMES) -> list[int]:
    request = claimed.request
    if request.messages is not None:
        template = tokenizer.chat_template
        if not template:
            raise InvalidPrompt(
                "no_chat_template",
                f"model {request.model} has no chat template; start its worker with --chat-template",
            )
        offered = request.tools if request.tool_choice != "none" else None
        extra: dict[str, Any] = {}
        if not (offered or any(m.tool_calls or m.role == "tool" for m in request.messages)):
            messages: list[dict[str, Any]] = [
                {"role": m.role, "content": m.content} for m in request.messages
            ]
        elif "tools" in template:  # the template has a tool format of its own
            messages, extra = tools.template_messages(request.messages), {"tools": offered}
        else:
            messages = tools.plain_messages(request.messages, offered, tool_format)
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
        )
        return list(ids)
    if request.prompt_token_ids is not None:
        return checked_ids(request.prompt_token_ids, tokenizer)
    return list(tokenizer.encode(request.prompt or ""))


def checked_ids(ids: list[int], tokenizer: Any) -> list[int]:
    vocab = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidPrompt(
            "invalid_request", f"prompt token ids out of the vocabulary (0..{vocab - 1}): {bad[:5]}"
        )
    return list(ids)


class Sequence:
    """One choice of one request; a request with n choices runs as n sequences."""

    def __init__(
        self,
        claimed: Claimed,
        prompt_ids: list[int],
        tokenizer: Any,
        context_length: int,
        index: int = 0,
        template_stops: Stops = NO_STOPS,
        adapter: str = "",
        grammar: str = "",
        tool_format: tools.ToolFormat | None = None,
    ) -> None:
        request = claimed.request
        self.claimed = claimed
        self.request_id = request.request_id
        self.index = index
        # The id the engine knows this choice by.
        self.engine_id = f"{request.request_id}/{index}"
        self.prompt_ids = prompt_ids
        room = context_length - len(prompt_ids)
        if room <= 0:
            raise InvalidPrompt(
                "context_length_exceeded",
                f"the prompt is {len(prompt_ids)} tokens; the model's context is {context_length}",
            )
        self.params = SamplingParams(
            **request.sampling.for_choice(index).model_dump(),
            # Clipped to what the context has left, as FastChat does.
            max_new_tokens=min(request.max_new_tokens, room),
            stop_token_ids=tuple(dict.fromkeys((*request.stop_token_ids, *template_stops.token_ids))),
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
            adapter=adapter,
            grammar=grammar,
        )
        self.tokenizer = tokenizer
        # The request's tool calls, parsed from its text as it streams (None: no tools offered).
        self.tool_calls: tools.ToolCallParser | None = None
        keep_special = False
        if tool_format is not None and request.tools and request.tool_choice != "none":
            self.tool_calls = tools.ToolCallParser(tool_format, request.request_id, index)
            # A format whose calls open with a special token ([TOOL_CALLS]) must see it.
            keep_special = tool_format.opener in getattr(tokenizer, "all_special_tokens", ())
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=not keep_special)
        self.stops = StopStrings(list(dict.fromkeys((*request.stop, *template_stops.strings))))
        self.completion_tokens = 0
        # Everything generated and sent so far: what another worker needs to continue this
        # choice if this one dies (see `record` and `resume`).
        self.generated: list[int] = []
        # How many of `generated` are recorded in Redis already (set once a write succeeds).
        self.recorded = 0
        self.sent_chars = 0
        # The prompt's text, sent ahead of the first delta when the request asks for an echo.
        self._echo = tokenizer.decode(prompt_ids, skip_special_tokens=False) if request.echo else ""
        self.finished = False
        self._seq = 0

    def _event(self, **fields: Any) -> Event:
        self._seq += 1
        return Event(seq=self._seq, index=self.index, **fields)

    def advance(self, out: StepOutput) -> list[Event]:
        """Events for the tokens an engine step produced. Sets `finished` when the request is
        over, including when a stop string was reached (the caller then cancels it in the engine)."""
        if out.error is not None:
            return [self.fail("engine_error", out.error)]
        self.completion_tokens += len(out.new_token_ids)
        self.generated += out.new_token_ids
        ids = out.new_token_ids
        if out.finish_reason == "stop" and ids:
            ids = ids[:-1]  # the EOS or stop token itself is not part of the text
        logprobs = self._logprobs(out.choices[: len(ids)]) if self.params.logprobs is not None else None
        text, hit_stop = self.stops.feed(self.detokenizer.push(ids))
        reason: FinishReason | None = "stop" if hit_stop else out.finish_reason if out.finished else None
        if reason is not None and not hit_stop:
            text += self.stops.feed(self.detokenizer.flush())[0] + self.stops.flush()
        if self._echo:
            text, self._echo = self._echo + text, ""
        self.sent_chars += len(text)  # the text as generated, before tool calls are taken out
        calls: list[ToolCallDelta] = []
        if self.tool_calls is not None:
            text, calls = self.tool_calls.feed(text)
            if reason is not None:
                rest, more = self.tool_calls.finish()
                text, calls = text + rest, calls + more
            if reason == "stop" and self.tool_calls.calls:
                reason = "tool_calls"
        events = []
        if text or logprobs or calls:
            events.append(
                self._event(
                    type="delta",
                    text=text,
                    token_ids=out.new_token_ids,
                    logprobs=logprobs,
                    tool_calls=calls or None,
                )
            )
        if reason is not None:
            events.append(self.finish(reason))
        return events

    @property
    def engine_prompt(self) -> list[int]:
        """What the engine starts from: the prompt, plus the tokens of an earlier attempt."""
        return self.prompt_ids + self.generated

    def record(self, update: ProgressUpdate) -> int:
        """Add where this choice stands to `update`: the tokens not yet recorded and its state.
        Returns the token count recorded once the update is written (see `recorded`)."""
        start = self.recorded
        if start == 0:  # the log's first write: it lasts a little longer than the request can
            update.expire_at_ms = self.claimed.request.deadline_ms + GRACE_MS
        update.entries += entry(
            self.index, start, self.generated[start:], self._seq, self.sent_chars, self.finished
        )
        return len(self.generated)

    def resume(self, progress: ChoiceProgress) -> None:
        """Continue where an earlier worker stopped: same seq numbers, the same text already
        sent, only the tokens still missing left to generate; penalties and a seeded draw carry
        on from the tokens already generated."""
        self._seq = progress.seq
        self.generated = list(progress.tokens)
        self.recorded = len(self.generated)
        self.completion_tokens = len(self.generated)
        self.sent_chars = progress.sent
        sent_text = self.sent_chars
        if self._echo and self.sent_chars:
            sent_text -= len(self._echo)
            self._echo = ""
        decoded = self.detokenizer.push(self.generated)
        self.stops.hold(decoded[sent_text:])  # generated but held back: still to be sent
        if self.tool_calls is not None:  # its state is a function of the text it was fed
            self.tool_calls.feed(decoded[:sent_text])
        left = self.params.max_new_tokens - len(self.generated)
        self.params = self.params.model_copy(
            update={"max_new_tokens": max(left, 0), "resumed_tokens": len(self.generated)}
        )

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _logprobs(self, choices: list) -> list[TokenLogprob]:
        return [
            TokenLogprob(
                **self._entry(c.token_id, c.logprob).model_dump(),
                top_logprobs=[self._entry(token, logprob) for token, logprob in c.top],
            )
            for c in choices
        ]

    def finish(self, reason: FinishReason) -> Event:
        self.finished = True
        usage = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.completion_tokens)
        return self._event(type="done", finish_reason=reason, usage=usage)

    def fail(self, code: ErrorCode, message: str) -> Event:
        self.finished = True
        return self._event(type="error", finish_reason="error", error=EventError(code=code, message=message))


def answer(claimed: Claimed, tokenizer: Any, engine: Engine) -> Event:
    """The one event that answers a tokenize, detokenize or embed request (blocking work)."""
    request = claimed.request
    context_length = engine.context_length
    if request.kind == "embed":
        inputs = [
            tokenizer.encode(i) if isinstance(i, str) else checked_ids(i, tokenizer)
            for i in request.inputs or []
        ]
        if not inputs or any(not 0 < len(ids) <= context_length for ids in inputs):
            raise InvalidPrompt("invalid_request", f"each input must have 1 to {context_length} tokens")
        vectors = engine.embed(inputs)
        return Event(
            seq=1, type="done", result=EmbedResult(embeddings=vectors, prompt_tokens=sum(map(len, inputs)))
        )
    if request.kind == "detokenize":
        ids = checked_ids(request.prompt_token_ids or [], tokenizer)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        return Event(seq=1, type="done", result=DetokenizeResult(prompt=text))
    ids = _encode(claimed, tokenizer)  # tokenizing "" is fine: no engine sees it
    return Event(
        seq=1, type="done", result=TokenizeResult(tokens=ids, count=len(ids), max_model_len=context_length)
    )


class TokenFrontend:
    """The frontend of a model's engine: the tokenizer encodes prompts (with the chat template)
    into `Sequence`s, and answers tokenize, detokenize and embed requests."""

    def __init__(
        self,
        tokenizer: Any,
        template_stops: Stops = NO_STOPS,
        adapters: frozenset[str] = frozenset(),
        base: str = "",
        tool_parser: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template_stops = template_stops
        # How this model writes tool calls: forced, or read off its chat template.
        self.tool_format = tools.pick_format(tool_parser, getattr(tokenizer, "chat_template", None))
        # The LoRA adapters' served names (a request for one runs with it), and the base's name.
        self.adapters = adapters
        self.base = base

    def choices(self, item: Claimed, engine: Engine) -> Callable[[int], Sequence]:
        ids = encode_prompt(item, self.tokenizer, self.tool_format)  # once for all n choices
        grammar = self._grammar(item, engine)
        adapter = item.request.model if item.request.model in self.adapters else ""
        return lambda index: Sequence(
            item,
            ids,
            self.tokenizer,
            engine.context_length,
            index=index,
            template_stops=self.template_stops,
            adapter=adapter,
            grammar=grammar,
            tool_format=self.tool_format,
        )

    def _grammar(self, item: Claimed, engine: Engine) -> str:
        """The grammar the request's output must follow (a response_format's schema, or the call
        a `required` or named tool_choice forces), compiled here, once, so the engine's thread
        only ever copies it; "" for free text."""
        request = item.request
        grammars = getattr(engine, "grammars", None)
        if grammars is None:
            return ""
        try:
            if request.json_schema:
                grammar, what = grammar_of(request.json_schema), "response_format's schema"
            elif request.tools and request.tool_choice not in ("auto", "none"):
                grammar, what = tools.forced_grammar(self.tool_format, request, self.tokenizer), "the tools"
            else:
                return ""
            grammars.matcher(grammar)
        except SchemaError as e:
            raise InvalidPrompt("invalid_request", f"{what} cannot be enforced: {e}") from None
        return grammar

    def answer(self, item: Claimed, engine: Engine) -> Event:
        if item.request.kind == "embed" and item.request.model in self.adapters:
            return rejection("invalid_request", f"embeddings come from the base model only: ask {self.base}")
        return answer(item, self.tokenizer, engine)

    async def warmup(self, engine: Engine) -> None:
        """One tiny request, so the engine's first-batch set-up (cache allocation: seconds on a
        CPU) is never paid by a client."""
        request_id = "warmup"
        prompt_ids = list(self.tokenizer.encode("Hello"))
        engine.add(request_id, prompt_ids, SamplingParams(temperature=0, max_new_tokens=2))
        while not any(
            out.finished for out in await engine.step(timeout_s=60) if out.request_id == request_id
        ):
            pass


def rejection(code: ErrorCode, message: str) -> Event:
    """The one event of a request that never started."""
    return Event(seq=1, type="error", finish_reason="error", error=EventError(code=code, message=message))

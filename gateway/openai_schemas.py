"""OpenAI request bodies, validated; and the response objects built from worker events."""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.schemas import Sampling, TokenLogprob, ToolCallDelta, Usage

# A token id as a client may send one: any int beyond this is no model's (a bigger one would
# overflow the tensors it goes into); ids past the model's vocabulary are the worker's 400.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields Corral accepts only at the value that means "not used"; anything else is a 400
# naming the field, never a silent ignore.
_ONLY_NEUTRAL: dict[str, tuple[Any, ...]] = {
    # OpenAI's deprecated form of tools (use `tools` and `tool_choice`).
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "store": (None, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "metadata": (None, {}),
    "best_of": (None, 1),
}


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Corral enforces every schema it accepts, strict or not (decisions.md, "Structured outputs").
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class SamplingFields(Sampling):
    """What chat and completions requests share: the sampling fields (broker.schemas.Sampling,
    with their bounds) and the rest of OpenAI's request shape."""

    # Extra fields are kept so that `refusal` can name them; none is ever ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    # Corral's extensions: the request's deadline in seconds (default CORRAL_REQUEST_TIMEOUT_S);
    # `batch` lane waits until no interactive request waits (judges, bulk jobs).
    timeout: float | None = Field(None, gt=0, le=86_400)
    lane: Literal["interactive", "batch"] = "interactive"
    # vLLM's extensions: token ids that end generation, and generating exactly max_tokens.
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    user: str | None = None
    response_format: ResponseFormat | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per token for the worker; None = no logprobs."""
        return None

    def defaulted(self) -> list[str]:
        """The sampling fields the client left out, as the worker names them (a served profile
        fills these with its own preset)."""
        given = self.model_fields_set
        unset = [name for name in Sampling.model_fields if name not in given]
        if not given & {"max_tokens", "max_completion_tokens"}:
            unset.append("max_new_tokens")
        return unset

    def refusal(self) -> tuple[str, str] | None:
        """(field, message) for the first field this request uses that Corral does not serve."""
        for name, value in (self.model_extra or {}).items():
            if name in _CHAT_ONLY:
                return name, f"{name} is only accepted by /v1/chat/completions"
            if name not in _ONLY_NEUTRAL:
                return name, f"Unrecognized request argument supplied: {name}"
            if value not in _ONLY_NEUTRAL[name]:
                return name, f"{name} is not supported by Corral yet"
        return None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# Fields of chat requests that a legacy completions request is refused with (never ignored).
_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    name: str = Field(max_length=256)
    arguments: str


class ToolCallIn(BaseModel):
    """A call an assistant turn of the history made."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only on an assistant turn that called tools.
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _shape_of_its_role(self) -> ChatMessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, but on an assistant message with tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message answers one call: it has a tool_call_id, and only it does")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # A JSON schema of the arguments; none: the function takes none.
    parameters: dict[str, Any] | None = None
    # Corral enforces the arguments of a call that tool_choice forces, strict or not.
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionCreate(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # At most 128 tools, as OpenAI allows.
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionCreate:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def tool_refusal(self) -> str | None:
        """Why the request's tool fields do not go together (None: they do)."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            return "tools has two functions of the same name"
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return f"tool_choice names function {choice.function.name!r}, which is not in tools"
        if choice == "required" and not names:
            return "tool_choice 'required' needs tools"
        return None

    def forced_tools(self) -> list[Tool]:
        """The tools whose arguments constrained decoding enforces: those tool_choice forces."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return list(self.tools or []) if choice == "required" else []

    def tool_fields(self) -> dict[str, Any]:
        """The tool fields as a GenerationRequest takes them."""
        if not self.tools:
            return {}
        choice = self.tool_choice or "auto"
        return {
            "tools": [t.model_dump(exclude_none=True) for t in self.tools],
            "tool_choice": choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per token for the worker; None = no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionCreate(SamplingFields):
    # A string, or token ids (decoded by the model's own tokenizer), or a list of one of either.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    # OpenAI's default for legacy completions.
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[Any]) -> str | list[Any]:
        # An empty prompt has nothing for the model to continue (and would reach the engine as
        # a zero-token sequence): "", [""], [] and [[]] alike.
        if not prompt or (isinstance(prompt, list) and isinstance(prompt[0], str) and not prompt[0]):
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and isinstance(prompt[0], str | list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is served per request for now")
        if isinstance(prompt, list) and isinstance(prompt[0], list) and not prompt[0]:
            raise ValueError("the prompt is empty")
        return prompt

    def prompt_fields(self) -> dict[str, Any]:
        """The prompt as GenerationRequest fields: `prompt` text or `prompt_token_ids`."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        fields = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        return {**fields, "echo": self.echo}

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeCreate(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages (rendered with the model's chat template)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    tokens: list[TokenId] = Field(min_length=1)


class EmbeddingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    # A text, token ids, or a list of either (at most 2048 inputs, as OpenAI allows).
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = Field(None, description="Corral returns the model's full hidden size.")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[Any]) -> str | list[Any]:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not items or len(items) > 2048 or any(len(item) == 0 for item in items):
            raise ValueError("give 1 to 2048 non-empty inputs")
        return value

    def inputs(self) -> list[str | list[TokenId]]:
        value = self.input
        if isinstance(value, str) or isinstance(value[0], int):
            return [value]
        return list(value)


def embedding_body(vectors: list[list[float]], encoding_format: str) -> list[dict[str, Any]]:
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":  # OpenAI's wire format: little-endian float32
            encoded: list[float] | str = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return data


def usage_body(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ResponseShape:
    """The fixed fields of one response (id, object, created, model) and its chunks."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id = response_id
        self.model = model
        self.chat = chat
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        if self.chat:
            return {"content": [e.model_dump() for e in entries], "refusal": None}
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
            "text_offset": offsets,
        }

    def chunk(
        self,
        text: str | None,
        index: int = 0,
        finish_reason: str | None = None,
        first: bool = False,
        logprobs: list[TokenLogprob] | None = None,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> dict[str, Any]:
        lp = self._logprobs(logprobs)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [tool_call_delta(d) for d in tool_calls]
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object_), "choices": [], "usage": usage_body(usage)}

    def complete(
        self,
        texts: list[str],
        finish_reasons: list[str | None],
        usage: Usage | None,
        logprobs: list[list[TokenLogprob] | None],
        tool_calls: list[list[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        choices = []
        for index, (text, finish_reason, entries) in enumerate(
            zip(texts, finish_reasons, logprobs, strict=True)
        ):
            lp = self._logprobs(entries)
            if self.chat:
                calls = tool_calls[index] if tool_calls else []
                message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else text)}
                if calls:
                    message["tool_calls"] = calls
                choices.append(
                    {"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason}
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason})
        object_ = "chat.completion" if self.chat else "text_completion"
        return {**self._head(object_), "choices": choices, "usage": usage_body(usage)}


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A streamed piece of a tool call, in OpenAI's shape: the first piece of a call carries its
    id, type and name; the ones after, more of its arguments."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}


def add_tool_calls(calls: list[dict[str, Any]], deltas: list[ToolCallDelta]) -> None:
    """Builds a choice's whole tool calls from their pieces."""
    for delta in deltas:
        if delta.id is not None:
            function = {"name": delta.name, "arguments": ""}
            calls.append({"id": delta.id, "type": "function", "function": function})
        calls[delta.index]["function"]["arguments"] += delta.arguments

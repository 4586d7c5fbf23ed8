"""Messages that cross a process boundary, typed once and imported by both sides."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# "tool_calls": the answer ended after calling one or more of the request's tools.
FinishReason = Literal["stop", "length", "tool_calls", "error"]
# Why a request ended in an error (an error event's code); the gateway maps each to a status.
ErrorCode = Literal[
    "invalid_request",
    "context_length_exceeded",
    "no_chat_template",  # the client's: 400
    "deadline_exceeded",  # 504
    "upstream_error",  # an API-backed model's server failed or refused: 502
    "engine_error",
    "worker_lost",
    "events_lost",  # 500
]
CLIENT_ERRORS: frozenset[ErrorCode] = frozenset(
    {"invalid_request", "context_length_exceeded", "no_chat_template"}
)


def now_ms() -> int:
    return int(time.time() * 1000)


class FunctionCall(BaseModel):
    name: str
    # JSON text, as OpenAI sends it (and as a model may have written it: not always valid).
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str
    content: str
    # An assistant turn's calls of tools, and a `tool` turn's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a tool call, as the worker parses it from the output: the call's `id` and
    `name` come once, first; its `arguments` text in pieces after."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Sampling(BaseModel):
    """How a request's tokens are drawn: the one list of sampling parameters. The gateway's API
    schema inherits these fields with their bounds, the worker's per-choice parameters extend
    them, and each field's default is its neutral value (the one that changes nothing). A new
    parameter is a field here, and its use in the worker."""

    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Not in OpenAI's API; vLLM and FastChat accept it. 0 = off.
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM's and FastChat's extension: 1 = off.
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # Same seed and same request: same output (choice i of n draws with seed + i).
    seed: int | None = None

    def sampling(self) -> Sampling:
        """Only the sampling fields (of a model that extends them)."""
        return Sampling.model_validate({name: getattr(self, name) for name in Sampling.model_fields})

    def changed(self) -> dict[str, Any]:
        """The sampling fields that differ from their neutral defaults."""
        return {
            name: getattr(self, name)
            for name, field in Sampling.model_fields.items()
            if getattr(self, name) != field.default
        }

    def for_choice(self, index: int) -> Sampling:
        """Choice `index` of n: each draws its own tokens, and the same seed repeats them."""
        seeded = self.sampling()
        return seeded if self.seed is None else seeded.model_copy(update={"seed": self.seed + index})


class GenerationRequest(BaseModel):
    """One generation request on a model's stream. Exactly one of `messages` (chat), `prompt`
    or `prompt_token_ids` (plain completion) is set; the worker owns tokenization and the chat
    template."""

    request_id: str
    model: str
    # Which of the model's streams it waits on (broker.keys.LANES).
    lane: Literal["interactive", "batch"] = "interactive"
    # generate: token events; tokenize / detokenize: one `done` event with a `result`.
    kind: Literal["generate", "tokenize", "detokenize", "embed"] = "generate"
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    # Completions given as token ids, or the ids to detokenize.
    prompt_token_ids: list[int] | None = None
    # Embeddings: the inputs, each a text or token ids.
    inputs: list[str | list[int]] | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    max_new_tokens: int = 256
    # Choices to generate from the one prompt (the engine shares the prompt's KV blocks).
    n: int = 1
    # Log-probabilities of each token and of this many alternatives; None = off.
    logprobs: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    # Completions: the text starts with the prompt (decoded by the worker's tokenizer).
    echo: bool = False
    # Keep generating past EOS (benchmarks with a fixed output length).
    ignore_eos: bool = False
    # response_format json_object / json_schema: the JSON schema the output follows, as the text
    # broker.structured.check_schema returned (the worker compiles it); None = free text.
    json_schema: str | None = None
    # The request's response_format as the client sent it (an upstream API gets it as is).
    response_format: dict[str, Any] | None = None
    # Chat only: the tools the model may call (OpenAI's `tools` entries), and OpenAI's
    # `tool_choice` ("none", "auto", "required" or {"type": "function", "function": {"name"}})
    # and `parallel_tool_calls`, as the gateway checked them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    # The sampling fields (and max_new_tokens) the client did not set: a served profile fills them.
    defaulted: list[str] = Field(default_factory=list)
    created_ms: int = Field(default_factory=now_ms)
    # Wall-clock deadline (epoch ms); a worker never starts work past it.
    deadline_ms: int

    def expired(self, at_ms: int | None = None) -> bool:
        return (at_ms or now_ms()) >= self.deadline_ms


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """OpenAI's per-token log-probability entry (chat `logprobs.content[i]`)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EventError(BaseModel):
    code: ErrorCode
    message: str


class TokenizeResult(BaseModel):
    """The answer to a tokenize request (vLLM's /tokenize)."""

    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str


class EmbedResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embeddings: list[list[float]]
    prompt_tokens: int


Result = TokenizeResult | DetokenizeResult | EmbedResult


class Event(BaseModel):
    """One event on a request's output channel. `text` is a delta, never the text so far."""

    seq: int
    type: Literal["delta", "done", "error"]
    index: int = 0
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    # Tool calls parsed from the output (their text is not in `text`).
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: EventError | None = None
    # The answer of a request that is not a generation (tokenize, detokenize, embed).
    result: Result | None = None


class ModelMetadata(BaseModel):
    """What people see about a model: in /v1/models, and in the arena and leaderboard."""

    model_config = ConfigDict(extra="forbid")
    display_name: str | None = None
    link: str | None = None
    organization: str | None = None
    license: str | None = None
    description: str | None = None


class WorkerInfo(BaseModel):
    """What a worker advertises in its heartbeat hash."""

    worker_id: str
    models: list[str]
    device: str
    max_batch: int
    in_flight: int = 0
    requests_done: int = 0
    # Requests taken over from workers that died or handed them back.
    reclaimed: int = 0
    tokens_per_s: float = 0.0
    # Output tokens generated since the worker started.
    tokens_out: int = 0
    # Requests it dropped unfinished (client gone, deadline passed; some before they started),
    # and the tokens it had generated for them.
    cancelled: int = 0
    tokens_wasted: int = 0
    # Whether its engine works: its thread is alive, and it has made a step lately while it had
    # work. A worker whose engine is not is left out of the served models.
    engine_alive: bool = True
    context_length: int = 0
    started_at: float = Field(default_factory=time.time)
    metadata: ModelMetadata = Field(default_factory=ModelMetadata)
    # Metadata of the other names it serves (its LoRA adapters), where it differs from `metadata`.
    model_metadata: dict[str, ModelMetadata] = Field(default_factory=dict)

    def metadata_of(self, model: str) -> ModelMetadata:
        return self.model_metadata.get(model, self.metadata)

    def to_hash(self) -> dict[str, str]:
        return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in self.model_dump().items()}

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> WorkerInfo:
        decoded = {k: (v if k in ("worker_id", "device") else json.loads(v)) for k, v in fields.items()}
        return cls.model_validate(decoded)

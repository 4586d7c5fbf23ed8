"""What the worker runtime needs from an inference engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    # Token ids that end generation besides the model's EOS.
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # alternatives to report per token; None = off


@dataclass
class StepOutput:
    """What one request gained since the engine last reported on it."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    # "stop" (EOS or a stop token) or "length"; set when finished.
    finish_reason: str | None = None
    error: str | None = None
    # With logprobs on: one entry per new token (workers.sampling.TokenChoice).
    choices: list = field(default_factory=list)


class Engine(Protocol):
    """A continuous-batching engine. `add` and `cancel` return at once; generation runs off the
    event loop; `step` waits (up to `timeout_s`) for the tokens produced since the last call."""

    max_batch: int
    context_length: int
    eos_token_ids: frozenset[int]

    def start(self) -> None: ...

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    async def step(self, timeout_s: float) -> list[StepOutput]: ...

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states; blocking (call it off the event loop)."""
        ...

    def stop(self) -> None: ...

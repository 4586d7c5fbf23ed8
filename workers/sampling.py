"""Per-request sampling that transformers' continuous batching does not offer: OpenAI's presence and
frequency penalties, the repetition penalty, min_p, a per-request seed, and logprobs.

They plug into transformers' own per-request logits-processor list (the same mechanism its
temperature/top_k/top_p use): `Penalties` runs first on the raw logits, `Sampler` runs last. For a
row that asks for a seed or logprobs, `Sampler` draws the token itself with the Gumbel-max trick
(argmax of scores + Gumbel noise is a draw from softmax(scores)) with noise seeded by the
request's seed and the step number, then leaves only that token possible, so transformers' own
sampling step picks it. Seeding per step (not one generator per request) lets a request taken
over by another worker continue with exactly the draws the first one would have made.

Facts this relies on (transformers 5.23): `prepare_tensor_args` receives the batch's requests in
the order of the score rows, and is called before `__call__` for the same batch (true without
async double-buffering and CUDA graphs, which the engine turns off).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.model_runner import ModelRunner

from broker.schemas import Sampling
from workers.engine import SamplingParams
from workers.grammar import Grammars

log = logging.getLogger(__name__)

# transformers' own processors take these (every request passes them).
_TRANSFORMERS_OWN = ("temperature", "top_k", "top_p")
# The fields this module's processors take, and the value that means "off": every other
# sampling field (broker.schemas.Sampling's defaults are its neutral values), and two of a
# choice's own.
_NEUTRAL = {
    **{name: field.default for name, field in Sampling.model_fields.items() if name not in _TRANSFORMERS_OWN},
    "logprobs": None,
    "resumed_tokens": 0,
    "grammar": "",
}
# A temperature this small is treated as greedy.
_GREEDY_BELOW = 1e-5


def request_kwargs(params: SamplingParams, vocab_size: int) -> dict:
    """A request's per-request processor kwargs: temperature, top_k and top_p for transformers'
    own processors (a greedy request gets top_k=1, so sampling picks the argmax), and only those
    of this module's fields that the request changes, so rows that use none cost nothing extra."""
    if params.temperature < _GREEDY_BELOW:
        kwargs: dict = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    else:
        top_k = params.top_k if 0 < params.top_k < vocab_size else vocab_size
        kwargs = {"temperature": float(params.temperature), "top_k": int(top_k), "top_p": float(params.top_p)}
    for name, neutral in _NEUTRAL.items():
        value = getattr(params, name)
        if value != neutral:
            kwargs[name] = value
    return kwargs


@dataclass
class TokenChoice:
    """The log-probability of one sampled token, and of the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowBatch:
    """What the two processors share about the rows of the batch being sampled."""

    rows: list = field(default_factory=list)  # RequestState per score row
    # Whether any row uses Corral's fields: most batches use none, and then cost nothing.
    used: bool = False
    raw_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)  # row → log_softmax of raw logits
    # Request id → [grammar matcher, tokens it has consumed] (requests with a response_format).
    matchers: dict[str, list] = field(default_factory=dict)


def _kwargs_of(*processors: type) -> frozenset[str]:
    return frozenset(name for processor in processors for name in processor.supported_kwargs)


def _generated(state, kwargs: dict) -> list[int]:
    """The request's generated tokens, those of an earlier attempt (now ending the prompt) included."""
    resumed = kwargs.get("resumed_tokens", 0)
    return (state.initial_tokens[-resumed:] if resumed else []) + state.generated_tokens


# Mixes a seed and a step number into the seed of that step's draw.
_GOLDEN = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


class _Processor(ContinuousBatchingLogitsProcessor):
    """A processor of this module: its per-request fields are read from each row's state, so the
    tensors transformers hands every processor carry nothing."""

    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        return torch.zeros(len(requests_with_new_token), dtype=torch.int32)


class Penalties(_Processor):
    supported_kwargs: ClassVar[dict[str, type]] = {
        "presence_penalty": float,
        "frequency_penalty": float,
        "repetition_penalty": float,
        "logprobs": int,
        "resumed_tokens": int,
    }

    def __init__(self, batch: RowBatch) -> None:
        self.batch = batch

    def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
        self.batch.rows = [request.state for request in requests_with_new_token]
        self.batch.used = any(
            CORRAL_KWARGS & state.logit_processor_kwargs.keys() for state in self.batch.rows
        )
        return torch.zeros(len(self.batch.rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        self.batch.raw_logprobs = {}
        if not self.batch.used:
            return scores
        for row, state in enumerate(self.batch.rows[: scores.size(0)]):
            kwargs = state.logit_processor_kwargs
            if not kwargs:
                continue
            if "logprobs" in kwargs:  # OpenAI reports log-probabilities of the model's raw distribution
                self.batch.raw_logprobs[row] = torch.log_softmax(scores[row], dim=-1)
            repetition = kwargs.get("repetition_penalty", 1.0)
            if repetition != 1.0:  # CTRL's penalty on every token seen, prompt included
                seen = torch.tensor(
                    state.initial_tokens + state.generated_tokens, device=scores.device
                ).unique()
                logits = scores[row, seen]
                scores[row, seen] = torch.where(logits > 0, logits / repetition, logits * repetition)
            presence = kwargs.get("presence_penalty", 0.0)
            frequency = kwargs.get("frequency_penalty", 0.0)
            generated = _generated(state, kwargs) if presence or frequency else []
            if generated:  # OpenAI's penalties count generated tokens only
                generated = torch.tensor(generated, device=scores.device)
                counts = torch.bincount(generated, minlength=scores.size(1)).to(scores.dtype)  # [V]
                scores[row] -= frequency * counts + presence * (counts > 0).to(scores.dtype)
        return scores


class GrammarMask(_Processor):
    """A response_format's token mask: on each row with a schema, every token that would not
    continue valid output is set to -inf, after the penalties and before any other processor
    (so top-k and top-p choose among valid tokens, and the seeded draw draws from them). The
    matcher is brought up to date from the request's generated tokens, those of an earlier
    attempt included: a request taken over mid-answer goes on inside the same grammar."""

    supported_kwargs: ClassVar[dict[str, type]] = {"grammar": str}

    def __init__(self, batch: RowBatch, grammars: Grammars | None) -> None:
        self.batch = batch
        self.grammars = grammars
        self._bitmask: torch.Tensor | None = None

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.batch.used:
            return scores
        for row, state in enumerate(self.batch.rows[: scores.size(0)]):
            kwargs = state.logit_processor_kwargs
            if kwargs.get("grammar"):
                self._mask(scores, row, state, kwargs)
        return scores

    def _mask(self, scores: torch.Tensor, row: int, state, kwargs: dict) -> None:
        try:
            allowed = self._allowed(state, kwargs, scores.size(1)).to(scores.device)
        except Exception:  # never the engine's thread: the request ends, the others go on
            log.exception("request %s: its grammar failed; it ends here", state.request_id)
            allowed = torch.zeros(scores.size(1), dtype=torch.bool, device=scores.device)
            allowed[list(self.grammars.eos if self.grammars else [])] = True
        scores[row] = scores[row].masked_fill(~allowed, float("-inf"))

    def _allowed(self, state, kwargs: dict, vocab: int) -> torch.Tensor:
        import llguidance.torch as llg

        assert self.grammars is not None, "this engine has no tokenizer for structured outputs"
        generated = _generated(state, kwargs)
        entry = self.batch.matchers.get(state.request_id)
        if entry is None or entry[1] > len(generated):  # new, or a finished request's id again
            entry = self.batch.matchers[state.request_id] = [self.grammars.matcher(kwargs["grammar"]), 0]
        matcher, consumed = entry
        if len(generated) > consumed:
            matcher.consume_tokens(generated[consumed:])
            entry[1] = len(generated)
        if matcher.is_error():  # cannot happen while every token came through this mask
            raise ValueError(f"the output left its grammar: {matcher.get_error()}")
        if self._bitmask is None:
            self._bitmask = llg.allocate_token_bitmask(1, vocab)
        llg.fill_next_token_bitmask(matcher, self._bitmask, 0)
        return _unpack(self._bitmask, vocab)


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """A packed token bitmask (32 tokens per int32, lowest bit first) as one bool per token."""
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


class Sampler(_Processor):
    supported_kwargs: ClassVar[dict[str, type]] = {"min_p": float, "seed": int}

    def __init__(self, batch: RowBatch) -> None:
        self.batch = batch
        self._seeds: dict[str, int] = {}
        self._choices: dict[str, list[TokenChoice]] = {}
        self._lock = threading.Lock()

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.batch.used:
            return scores
        for row, state in enumerate(self.batch.rows[: scores.size(0)]):
            kwargs = state.logit_processor_kwargs
            min_p = kwargs.get("min_p", 0.0)
            if min_p > 0:
                probs = torch.softmax(scores[row], dim=-1)
                scores[row] = scores[row].masked_fill(probs < min_p * probs.max(), float("-inf"))
            if "seed" in kwargs or "logprobs" in kwargs:
                self._draw(scores, row, state, kwargs)
        return scores

    def _draw(self, scores: torch.Tensor, row: int, state, kwargs: dict) -> None:
        """One draw, from a generator seeded by (request seed, step): the k-th token of a seeded
        request is the same whether or not its run was interrupted before step k."""
        base = self._seeds.get(state.request_id)
        if base is None:
            base = kwargs["seed"] if "seed" in kwargs else int.from_bytes(os.urandom(8), "little")
            self._seeds[state.request_id] = base
        step = len(_generated(state, kwargs))
        generator = torch.Generator(device=scores.device).manual_seed((base * _GOLDEN + step) & _SEED_MASK)
        uniform = torch.rand(scores.size(1), generator=generator, device=scores.device)
        token = int(torch.argmax(scores[row] - torch.log(-torch.log(uniform))))
        scores[row] = torch.full_like(scores[row], float("-inf"))
        scores[row, token] = 0.0
        raw = self.batch.raw_logprobs.get(row)
        if raw is not None:
            values, ids = torch.topk(raw, kwargs["logprobs"]) if kwargs["logprobs"] else (raw[:0], raw[:0])
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
            choice = TokenChoice(token, float(raw[token]), top)
            with self._lock:
                self._choices.setdefault(state.request_id, []).append(choice)

    def take(self, request_id: str) -> list[TokenChoice]:
        """The choices recorded for a request since the last call (called from the event loop)."""
        with self._lock:
            return self._choices.pop(request_id, [])

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._choices.pop(request_id, None)
        self._seeds.pop(request_id, None)
        self.batch.matchers.pop(request_id, None)


def keep_argmax(scores: torch.Tensor, rows: torch.Tensor, filter_value: float = float("-inf")) -> None:
    """Leaves each of these rows only its argmax (the lowest id among equal scores), in place."""
    best = scores[rows].argmax(dim=-1)
    kept = scores[rows, best]
    scores[rows] = filter_value
    scores[rows, best] = kept


class TopK(ContinuousBatchingTopKLogitsWarper):
    """transformers' per-request top-k without its full sort of every row: rows whose k covers the
    vocabulary are left alone and the rest need only the top max(k) scores. A greedy row (k=1)
    keeps exactly one token, its argmax (the lowest id among equal scores, as `generate` picks):
    bf16 logits tie often (at 33 their step is 0.25), and a threshold keeps every tied token, so
    the draw after it chose between them at random."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        vocab = scores.size(-1)
        top_k = tensor_arg[: scores.size(0)].to(torch.int64)  # [B]
        greedy = (top_k == 1).nonzero().squeeze(-1)
        if greedy.numel():
            keep_argmax(scores, greedy, self.filter_value)
        limited = (top_k < vocab) & (top_k != 1)
        if not bool(limited.any()):
            return scores
        k_max = int(top_k[limited].max())
        values = torch.topk(scores, k_max, dim=-1).values  # [B, k_max], descending
        thresholds = values.gather(-1, (top_k.clamp(max=k_max) - 1).unsqueeze(-1))  # [B, 1]
        thresholds = thresholds.masked_fill(~limited.unsqueeze(-1), float("-inf"))
        return scores.masked_fill(scores < thresholds, self.filter_value)


class TopP(ContinuousBatchingTopPLogitsWarper):
    """transformers' per-request top-p, run only on the rows that ask for it (top_p < 1)."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)  # [B]
        rows = (top_p < 1.0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return scores
        scores[rows] = super().__call__(scores[rows], tensor_arg[rows])
        return scores


# Every per-request field these processors read.
CORRAL_KWARGS = _kwargs_of(Penalties, GrammarMask, Sampler)


def _sample_by_inverse_cdf(self: ModelRunner, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
    """transformers' `ModelRunner._sample`, drawing each row's token from one uniform number by
    inverse CDF instead of `torch.multinomial`, which on a CPU draws a random number per
    vocabulary entry: 15 ms for a 16 × 49,152 batch (13% of a bf16 decode step of SmolLM2),
    against well under 1 ms for a softmax, a cumsum and a search. Same distribution; a row that
    processors left one token (greedy, or Corral's seeded draw) gets that token."""
    probs = torch.softmax(scores[0], dim=-1)  # [N, V]
    cdf = probs.cumsum(dim=-1)  # [N, V]
    # Scaled by each row's total, so that float rounding in the sum can never push u past it.
    u = torch.rand(cdf.size(0), 1, device=cdf.device) * cdf[:, -1:]  # [N, 1]
    next_tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(1) - 1)  # [N, 1]
    tokens = next_tokens.size(0)
    output_ids[0, :tokens].copy_(next_tokens.squeeze(-1))
    if self.return_logprobs:  # as transformers stores them: fp32 bits in the int32 output row
        logprobs = probs.gather(dim=1, index=next_tokens).squeeze(-1).log()
        output_ids[1, :tokens].copy_(logprobs.view(dtype=torch.int32))


def install(manager, grammars: Grammars | None = None) -> Sampler:
    """Add Corral's processors to a manager's list; call before the manager starts."""
    batch = RowBatch()
    processors = manager.logit_processor
    faster = {ContinuousBatchingTopKLogitsWarper: TopK, ContinuousBatchingTopPLogitsWarper: TopP}
    for processor in processors.logits_processor:
        if type(processor) in faster:
            processor.__class__ = faster[type(processor)]  # same state, a faster __call__
    sampler = Sampler(batch)
    processors.logits_processor.insert(0, GrammarMask(batch, grammars))
    processors.logits_processor.insert(0, Penalties(batch))
    processors.logits_processor.append(sampler)
    processors.tensors_required += 3
    processors._retrieve_processors_kwargs()
    processors.do_processing = True
    # The manager always samples (see workers/hf_engine.py), so this is the only draw it makes.
    ModelRunner._sample = _sample_by_inverse_cdf
    return sampler

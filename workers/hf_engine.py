"""The transformers engine: transformers' own continuous batching, driven from asyncio.

transformers runs the batch in a background thread (paged KV cache, new requests admitted
between decode steps) and hands each new token to a callback on our event loop. Facts learned
on transformers 5.23 that shape this file:
- sampling on/off is one switch for the whole manager, so it is always on; a greedy request
  gets top_k=1, which makes sampling pick the argmax (matches `generate(do_sample=False)`);
- per-request temperature/top_k/top_p only exist if the manager was built with non-neutral
  defaults for them, hence the defaults below that no request ever relies on;
- a streamed result carries all tokens so far, so we compute the delta ourselves;
- `cancel_request` emits no final result, so cancelled requests are forgotten here at once.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import ClassVar

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler

from workers import invariant
from workers.engine import Outbox, SamplingParams, StepOutput
from workers.grammar import Grammars
from workers.loading import LoadedModel, eos_ids, free_memory_bytes
from workers.lora import MultiLoRA
from workers.lora import install as install_lora
from workers.pooling import mean_pooled
from workers.sampling import install, request_kwargs

log = logging.getLogger(__name__)

# Tokens per KV-cache page (transformers' default).
_PAGE_TOKENS = 256
# On a CPU: tokens per engine step, and the share of free memory the KV cache may take.
_CPU_MAX_BATCH_TOKENS = 1024
_CPU_KV_SHARE = 0.25
# Tokens planned per request slot: most chats are far shorter than a model's context, and a CPU
# is slow to fill a long one. One request may still use the whole context (the plan holds one).
_CPU_KV_TOKENS_PER_SLOT = 2048
_CPU_KV_MAX_BYTES = 4 << 30  # as vLLM's CPU backend reserves by default
# Prompt tokens a step may take while others decode. On this 2-core CPU (bench/prefill.py, fp32,
# one thread, 8 streams, a 7,372-token prompt): no bound 13.4 s worst gap / 66 s to the long
# prompt's first token; 64: 1.8 s / 108 s; 128: 2.2 s / 77 s; 256: 3.6 s / 69 s.
_CPU_PREFILL_WHILE_DECODING = 128
_GPU_PREFILL_WHILE_DECODING = 512


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


def cpu_cache_plan(loaded: LoadedModel, max_batch: int, kv_cache_tokens: int, max_batch_tokens: int) -> tuple:
    """KV-cache tokens and batch tokens for a CPU worker, each logged with its reason.

    transformers sizes both for a GPU: a cache from (almost) all free memory and steps of up to
    8192 tokens, with an attention mask of steps × cache tokens beside them. On a CPU that is
    gigabytes of RAM for a 135M model (7.4 GB for SmolLM2) and prefill steps of seconds during
    which no stream gets a token."""
    if not max_batch_tokens:
        max_batch_tokens = _CPU_MAX_BATCH_TOKENS
        log.info("max_batch_tokens=%d (auto: CPU steps stay short)", max_batch_tokens)
    if not kv_cache_tokens:
        per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        slot = min(_CPU_KV_TOKENS_PER_SLOT, loaded.context_length)
        wanted = max(max_batch * slot, loaded.context_length)
        affordable = int(min(_CPU_KV_SHARE * free_memory_bytes(), _CPU_KV_MAX_BYTES) / per_token)
        kv_cache_tokens = max(min(wanted, affordable), max_batch_tokens)
        log.info(
            "KV cache: %d tokens, %d MiB: room for %d requests of %d tokens at once, or one of the full "
            "%d-token context (auto, within a quarter of free memory; set --kv-cache-tokens to change)",
            kv_cache_tokens,
            kv_cache_tokens * per_token >> 20,
            kv_cache_tokens // slot,
            slot,
            loaded.context_length,
        )
    return kv_cache_tokens, max_batch_tokens


class FairScheduler(FIFOScheduler):
    """transformers' FIFO scheduler (decoding requests first), with the prompt tokens of one step
    bounded while any request decodes. Unbounded, a long prompt fills whole steps of
    `max_batch_tokens` (1,024 on a CPU) until it is read in, and every other stream waits that
    long for its next token; bounded, it is read in slices between their tokens. Alone, a prompt
    still gets the whole step. The bound is a class attribute: transformers builds the scheduler
    itself, from a name (see `fair_scheduler`)."""

    prefill_tokens_while_decoding: ClassVar[int] = _CPU_PREFILL_WHILE_DECODING

    def schedule_batch(self, token_budget: int, cache_budget: int):
        decoding = sum(s.status == RequestStatus.DECODING for s in self.active_requests.values())
        if decoding:
            token_budget = min(token_budget, decoding + self.prefill_tokens_while_decoding)
        return super().schedule_batch(token_budget, cache_budget)


def fair_scheduler(prefill_tokens_while_decoding: int) -> str:
    """The name under which transformers finds a FairScheduler with this bound ("fifo" for none)."""
    if not prefill_tokens_while_decoding:
        return "fifo"
    params = list(inspect.signature(FIFOScheduler.schedule_batch).parameters)
    if params != ["self", "token_budget", "cache_budget"]:  # transformers 5.25 (tests/test_internals.py)
        raise RuntimeError(f"transformers' scheduler changed ({params}); update workers/hf_engine.py")
    name = f"corral-fair-{prefill_tokens_while_decoding}"
    bound = {"prefill_tokens_while_decoding": prefill_tokens_while_decoding}
    SCHEDULER_MAPPING.setdefault(name, type(name, (FairScheduler,), bound))
    return name


class TransformersEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        kv_cache_tokens: int = 0,
        max_batch_tokens: int = 0,
        adapters: dict[str, Path] | None = None,
        prefill_tokens_while_decoding: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.loaded = loaded
        self.max_batch = max_batch
        if loaded.device == "cpu":
            # transformers repeats each KV head for grouped-query attention unless told that
            # SDPA may take them as they are; torch's CPU SDPA can (same tokens, checked on
            # SmolLM2), and skipping the copies makes a batched decode step ~9% faster.
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
            kv_cache_tokens, max_batch_tokens = cpu_cache_plan(
                loaded, max_batch, kv_cache_tokens, max_batch_tokens
            )
        if prefill_tokens_while_decoding is None:
            auto = _CPU_PREFILL_WHILE_DECODING if loaded.device == "cpu" else _GPU_PREFILL_WHILE_DECODING
            prefill_tokens_while_decoding = auto
            log.info("prefill_tokens_while_decoding=%d (auto)", prefill_tokens_while_decoding)
        self.context_length = loaded.context_length
        tokenizer, model = loaded.tokenizer, loaded.model
        self.eos_token_ids = eos_ids(loaded)
        eos = min(self.eos_token_ids, default=None)
        self.vocab_size = int(model.config.vocab_size)
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=0.7,
            top_k=50,
            top_p=0.95,
            eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
        if batch_invariant:
            invariant.install(model)
        self.manager = model.init_continuous_batching(
            generation_config=generation_config,
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True,
                max_requests_per_batch=max_batch,
                # Corral's own processors (workers/sampling.py) keep per-batch state in Python,
                # which neither CUDA graphs nor async double-buffering would respect.
                use_cuda_graph=False,
                use_async_batching=False,
                # None lets transformers size these from free memory.
                num_blocks=-(-kv_cache_tokens // _PAGE_TOKENS) if kv_cache_tokens else None,
                max_batch_tokens=max_batch_tokens or None,
                page_size=_PAGE_TOKENS,
                scheduler_type=fair_scheduler(prefill_tokens_while_decoding),
                # Flash attention would bypass the batch-invariant attention.
                auto_switch_to_flash=not batch_invariant,
            ),
        )
        # request id → (tokens already reported, the token ids that end it)
        self._active: dict[str, tuple[int, frozenset[int]]] = {}
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_token_ids)
        self.sampler = install(self.manager, self.grammars)
        self.lora = MultiLoRA(model, adapters) if adapters else None
        if self.lora is not None:
            install_lora(self.manager, self.lora)
        self.outbox = Outbox()  # results delivered by the manager since the last step

    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)

    def alive(self) -> bool:
        # A crash asks for a hard stop before it fails every request (transformers 5.24), so a
        # dead engine's error results are never mistaken for errors of their requests.
        status = self.manager.background_thread_status
        return (
            self.manager.is_running()
            and status.fatal_error is None
            and status.local_status == status.DONT_STOP
        )

    def fail_next_step(self) -> None:
        """Fault injection (tests): the generation thread's next step raises, and it dies."""

        def broken() -> None:
            raise RuntimeError("fault injected: the engine's thread dies")

        self.manager._generation_step = broken

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        self._active[request_id] = (0, stop_ids)
        if self.lora is not None:
            self.lora.assign(request_id, params.adapter)
        self.manager.register_result_handler(request_id, self.outbox.put)
        self.manager.add_request(
            prompt_ids,
            request_id=request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(stop_ids) or -1,
            **request_kwargs(params, self.vocab_size),
        )

    def cancel(self, request_id: str) -> None:
        if self._active.pop(request_id, None) is not None:
            self.manager.cancel_request(request_id)
            self._forget(request_id)
            # A cancelled request gets no final result, so its handler would never be removed
            # (the manager only drops handlers on a finished result): drop it here.
            with self.manager.output_router._lock:
                self.manager.output_router.result_handlers.pop(request_id, None)

    def _forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)
        if self.lora is not None:
            self.lora.forget(request_id)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        # The base model's forward runs beside the batch thread: both only read the weights.
        return mean_pooled(self.loaded.model, inputs)

    async def step(self, timeout_s: float) -> list[StepOutput]:
        return [out for out in map(self._to_output, await self.outbox.take(timeout_s)) if out is not None]

    def _to_output(self, result) -> StepOutput | None:
        active = self._active.get(result.request_id)
        if active is None:  # cancelled while the result was on its way
            return None
        sent, stop_ids = active
        tokens = result.generated_tokens
        out = StepOutput(result.request_id, list(tokens[sent:]), choices=self.sampler.take(result.request_id))
        self._active[result.request_id] = (len(tokens), stop_ids)
        if result.error is not None:
            out.finished, out.finish_reason, out.error = True, "error", result.error
        elif result.is_finished():
            out.finished = True
            out.finish_reason = "stop" if tokens and tokens[-1] in stop_ids else "length"
        if out.finished:
            del self._active[result.request_id]
            self._forget(result.request_id)
        return out

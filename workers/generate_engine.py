"""The fallback engine: one request at a time through a plain decode loop (the model's own
forward with a DynamicCache), for models transformers' continuous batching cannot run — a
model split over several GPUs or with weights offloaded to the CPU (its paged cache lives on
one device), or a quantization whose kernels the batch manager rejects.

Slower, but the same answers and the same request options: the per-request sampling of
workers/sampling.py runs on a one-row batch, in the same order as in a continuous batch
(penalties, temperature, top-k, top-p, min-p and the seeded draw), so a seeded request gives
the same tokens on either engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from workers import invariant
from workers.engine import Outbox, SamplingParams, StepOutput
from workers.grammar import Grammars
from workers.loading import LoadedModel, eos_ids
from workers.lora import MultiLoRA
from workers.pooling import mean_pooled
from workers.sampling import (
    CORRAL_KWARGS,
    GrammarMask,
    Penalties,
    RowBatch,
    Sampler,
    keep_argmax,
    request_kwargs,
)

log = logging.getLogger(__name__)


def _greedy(_: object, scores: torch.Tensor) -> torch.Tensor:
    """A greedy request's warper: only the argmax is left, as in a continuous batch."""
    keep_argmax(scores, torch.arange(scores.size(0), device=scores.device))
    return scores


class GenerateEngine:
    # One request at a time: the worker claims the next when this one is done.
    max_batch = 1

    def __init__(
        self,
        loaded: LoadedModel,
        reason: str,
        adapters: dict[str, Path] | None = None,
        batch_invariant: bool = False,
    ) -> None:
        if batch_invariant:
            # One request at a time shares no step, but a takeover reads the positions decoded
            # one by one back in as a prompt: invariance makes those numbers the same.
            invariant.install(loaded.model)
        self.loaded = loaded
        self.context_length = loaded.context_length
        self.eos_token_ids = eos_ids(loaded)
        self.vocab_size = int(loaded.model.config.vocab_size)
        self.lora = MultiLoRA(loaded.model, adapters) if adapters else None
        self.outbox = Outbox()
        self._batch = RowBatch()
        self._penalties = Penalties(self._batch)
        self.grammars = Grammars(loaded.tokenizer, self.vocab_size, self.eos_token_ids)
        self._grammar = GrammarMask(self._batch, self.grammars)
        self.sampler = Sampler(self._batch)
        self._jobs: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="corral-generate", daemon=True)
        log.warning("continuous batching is off (%s): one request at a time, slower, same answers", reason)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._cancelled.discard(request_id)
        self._jobs.put((request_id, prompt_ids, params))

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    async def step(self, timeout_s: float) -> list[StepOutput]:
        return await self.outbox.take(timeout_s)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return mean_pooled(self.loaded.model, inputs)

    def _emit(self, out: StepOutput) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.outbox.put, out)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            request_id, prompt_ids, params = job
            if request_id in self._cancelled:
                continue
            try:
                self._decode(request_id, prompt_ids, params)
            except Exception as e:  # one bad request must never stop the engine
                log.exception("request %s failed", request_id)
                self._emit(StepOutput(request_id, [], finished=True, finish_reason="error", error=repr(e)))
            finally:
                self.sampler.forget(request_id)
                self._cancelled.discard(request_id)

    @torch.no_grad()
    def _decode(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        model = self.loaded.model
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        stop_ids = frozenset(params.stop_token_ids) | eos
        kwargs = request_kwargs(params, self.vocab_size)
        state = SimpleNamespace(
            request_id=request_id,
            logit_processor_kwargs=kwargs,
            initial_tokens=list(prompt_ids),
            generated_tokens=[],
        )
        warpers = [TemperatureLogitsWarper(kwargs["temperature"])] if kwargs["temperature"] != 1.0 else []
        if kwargs["top_k"] == 1:
            warpers.append(_greedy)  # a threshold would keep every token tied for the top
        elif kwargs["top_k"] < self.vocab_size:
            warpers.append(TopKLogitsWarper(kwargs["top_k"]))
        if kwargs["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(kwargs["top_p"]))
        if self.lora is not None:
            self.lora.use(params.adapter)
        cache = DynamicCache(config=model.config)
        feed = list(prompt_ids)
        for _ in range(params.max_new_tokens):
            if request_id in self._cancelled:
                return  # as in a continuous batch, a cancelled request gets no final output
            ids = torch.tensor([feed], device=model.device)
            out = model(input_ids=ids, cache=cache, use_cache=True)  # transformers 5.25 names it `cache`
            logits = out.logits[:, -1].float()  # [1, V]
            token = self._pick(state, logits, warpers)
            state.generated_tokens.append(token)
            feed = [token]
            stopped = token in stop_ids
            finished = stopped or len(state.generated_tokens) == params.max_new_tokens
            reason = ("stop" if stopped else "length") if finished else None
            choices = self.sampler.take(request_id)
            self._emit(StepOutput(request_id, [token], finished, reason, choices=choices))
            if finished:
                return

    def _pick(self, state, logits: torch.Tensor, warpers: list) -> int:
        """The next token, by the processors of a continuous batch applied to one row."""
        self._batch.rows = [state]
        self._batch.used = bool(CORRAL_KWARGS & state.logit_processor_kwargs.keys())
        scores = self._grammar(self._penalties(logits, None), None)
        for warper in warpers:
            scores = warper(None, scores)
        scores = self.sampler(scores, None)
        probs = torch.softmax(scores[0], dim=-1)
        if int((probs > 0).sum()) == 1:  # greedy, or the seeded draw already chose
            return int(torch.argmax(probs))
        return int(torch.multinomial(probs, 1))

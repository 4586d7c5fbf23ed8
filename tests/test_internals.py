"""The transformers internals Corral patches or reaches into (workers/hf_engine.py,
workers/sampling.py, workers/invariant.py), checked by name and signature: a transformers
release that moves one fails here, naming it, instead of somewhere deep in a serving test.
pyproject.toml pins the minor release these were written against; this test is what to run when
raising that pin."""

from __future__ import annotations

import inspect

import pytest
from transformers import AttentionInterface
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import cache, cb_logits_processors, continuous_api, scheduler
from transformers.generation.continuous_batching.model_runner import ModelRunner
from transformers.generation.continuous_batching.requests import RequestStatus

ProcessorList = cb_logits_processors.ContinuousBatchingLogitsProcessorList


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def assigned_in_init(cls: type) -> str:
    return inspect.getsource(cls.__init__)


@pytest.mark.parametrize(
    ("what", "found"),
    [
        # workers/sampling.py replaces ModelRunner._sample with an inverse-CDF draw.
        (
            "ModelRunner._sample(self, scores, output_ids)",
            lambda: params(ModelRunner._sample) == ["self", "scores", "output_ids"],
        ),
        ("ModelRunner sets return_logprobs", lambda: "self.return_logprobs" in assigned_in_init(ModelRunner)),
        # ... and adds its processors to the manager's processor list.
        (
            "ContinuousBatchingLogitsProcessorList: logits_processor, tensors_required, do_processing",
            lambda: all(
                f"self.{name}" in assigned_in_init(ProcessorList)
                for name in ("logits_processor", "tensors_required", "do_processing")
            ),
        ),
        (
            "ContinuousBatchingLogitsProcessorList._retrieve_processors_kwargs()",
            lambda: params(ProcessorList._retrieve_processors_kwargs) == ["self"],
        ),
        (
            "top-k and top-p warpers",
            lambda: all(
                hasattr(cb_logits_processors, name)
                for name in (
                    "ContinuousBatchingTopKLogitsWarper",
                    "ContinuousBatchingTopPLogitsWarper",
                    "ContinuousBatchingLogitsProcessor",
                )
            ),
        ),
        # workers/hf_engine.py: the fair scheduler, registered by name.
        (
            "FIFOScheduler.schedule_batch(self, token_budget, cache_budget)",
            lambda: (
                params(scheduler.FIFOScheduler.schedule_batch) == ["self", "token_budget", "cache_budget"]
            ),
        ),
        ("SCHEDULER_MAPPING", lambda: "fifo" in scheduler.SCHEDULER_MAPPING),
        ("RequestStatus.DECODING", lambda: hasattr(RequestStatus, "DECODING")),
        # ... cancelling drops the result handler under the router's lock; health reads the
        # background thread's status; fault injection replaces the generation step.
        (
            "OutputRouter.result_handlers and _lock",
            lambda: all(
                f"self.{name}" in assigned_in_init(continuous_api.OutputRouter)
                for name in ("result_handlers", "_lock")
            ),
        ),
        (
            "manager: output_router, background_thread_status, logit_processor",
            lambda: all(
                name in inspect.getsource(continuous_api)
                for name in ("self.output_router", "self.background_thread_status", "self.logit_processor")
            ),
        ),
        (
            "BackgroundThreadStatus: fatal_error, local_status, DONT_STOP",
            lambda: all(
                name in inspect.getsource(continuous_api.BackgroundThreadStatus)
                for name in ("fatal_error", "local_status", "DONT_STOP")
            ),
        ),
        (
            "ContinuousBatchingManager._generation_step",
            lambda: hasattr(continuous_api.ContinuousBatchingManager, "_generation_step"),
        ),
        # workers/invariant.py: the attention registered as "sdpa" reads where each request's
        # queries and keys start, which the paged cache puts in the attention's kwargs, and the
        # engine keeps transformers from switching a batch-invariant model to flash attention.
        (
            "PagedAttentionCache.update fills kwargs['cu_seq_lens_k'] per layer",
            lambda: (
                'kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"]['
                in inspect.getsource(cache.PagedAttentionCache.update)
            ),
        ),
        (
            "ContinuousBatchingConfig.auto_switch_to_flash",
            lambda: "auto_switch_to_flash" in inspect.signature(ContinuousBatchingConfig).parameters,
        ),
        ("AttentionInterface.register", lambda: callable(getattr(AttentionInterface, "register", None))),
    ],
)
def test_the_transformers_internals_corral_relies_on_are_where_it_expects(what: str, found) -> None:
    assert found(), f"transformers moved {what}: update workers/hf_engine.py, sampling.py or invariant.py"

"""GPU-only placement: a model spread over GPUs (--num-gpus) or partly offloaded to the CPU
(--cpu-offloading) is served by the one-request-at-a-time engine and answers through the
gateway. These need CUDA devices, so they skip on CPU machines and in CI; run them on a GPU
machine with `python -m pytest tests/test_gpu_placement.py`."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import Stack, free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def serve_and_ask(redis_url: str, key_prefix: str, **env: str) -> str:
    stack = Stack(redis_url, key_prefix, free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        stack.start_worker(served_name="placed", CORRAL_DEVICE="cuda", **env)
        body = {"model": "placed", "messages": QUESTION, "max_tokens": 16, "temperature": 0}
        reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]
    finally:
        stack.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_a_model_partly_offloaded_to_the_cpu_answers(redis_url, key_prefix, model_path) -> None:
    # 150 MiB of GPU memory holds part of SmolLM2's 513 MiB (fp32); the rest waits on the CPU.
    offloaded = {"CORRAL_CPU_OFFLOADING": "true", "CORRAL_MAX_GPU_MEMORY": "150MiB"}
    answer = serve_and_ask(redis_url, key_prefix, **offloaded)
    assert "Paris" in answer


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_over_two_gpus_answers(redis_url, key_prefix, model_path) -> None:
    answer = serve_and_ask(redis_url, key_prefix, CORRAL_NUM_GPUS="2", CORRAL_MAX_GPU_MEMORY="300MiB")
    assert "Paris" in answer

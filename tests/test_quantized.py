"""Quantized loading: an 8-bit (bitsandbytes) worker of the default model answers through the
gateway on a CPU, with continuous batching; a missing extra is a named error."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.conftest import HOME, MODEL, Stack, free_port
from workers.loading import MissingExtra, load_model


def test_an_8bit_worker_answers_through_the_gateway(redis_url, model_path, key_prefix):
    stack = Stack(redis_url, key_prefix, free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        worker = stack.start_worker(served_name="smollm2-8bit", CORRAL_LOAD_8BIT="true")
        bodies = [
            {
                "model": "smollm2-8bit",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 16,
                "temperature": 0,
            }
            for question in ("What is the capital of France?", "Name a colour.")
        ]
        replies = [httpx.post(f"{stack.url}/v1/chat/completions", json=b, timeout=120).json() for b in bodies]
        assert "Paris" in replies[0]["choices"][0]["message"]["content"]
        assert all(r["usage"]["completion_tokens"] >= 1 for r in replies)
        assert worker.poll() is None
    finally:
        stack.stop()


def test_8bit_weights_take_less_memory_than_fp32():
    fp32 = load_model(MODEL, HOME, device="cpu", dtype="float32", threads=1)
    int8 = load_model(MODEL, HOME, device="cpu", dtype="float32", threads=1, load_8bit=True)
    assert int8.model.get_memory_footprint() < 0.6 * fp32.model.get_memory_footprint()


def test_a_missing_quantization_extra_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(MissingExtra, match=r"--load-4bit needs bitsandbytes.*pip install 'corral\[quant\]'"):
        load_model(MODEL, HOME, device="cpu", load_4bit=True)


def test_asking_for_both_8_and_4_bits_is_refused():
    with pytest.raises(ValueError, match="one of --load-8bit and --load-4bit"):
        load_model(MODEL, HOME, device="cpu", load_8bit=True, load_4bit=True)

"""GPTQ end to end: quantize the default model to 4 bits with GPTQModel (through transformers'
GPTQConfig), save it, and serve the folder through the gateway. Needs the `quant` extra, whose
GPTQModel needs torch >= 2.14.1 (a CUDA build of several GB), so CI and the dev install lack it
and this module skips there. Run it with:

    pip install torch==2.14.1 -e '.[dev,quant]' && python -m pytest tests/test_gptq.py
"""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("optimum", reason="the quant extra is not installed (see this module's docstring)")
pytest.importorskip("gptqmodel", reason="the quant extra is not installed (see this module's docstring)")

from tests.conftest import Stack, free_port
from workers.loading import prequantized

CALIBRATION = [
    "The capital of France is Paris, a city on the Seine.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A haiku has three lines of five, seven and five syllables.",
    "The mitochondria is the part of the cell that makes energy.",
] * 8


@pytest.fixture(scope="module")
def gptq_folder(model_path: str, tmp_path_factory) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = GPTQConfig(bits=4, group_size=64, dataset=CALIBRATION, tokenizer=tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config, device_map=device)
    folder = tmp_path_factory.mktemp("gptq") / "smollm2-gptq"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_gptq_checkpoint_is_detected_and_answers_through_the_gateway(redis_url, key_prefix, gptq_folder):
    assert prequantized(gptq_folder) == "GPTQ"
    stack = Stack(redis_url, key_prefix, free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        worker = stack.start_worker(served_name="gptq", CORRAL_MODEL=gptq_folder, CORRAL_DEVICE="auto")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": "gptq", "messages": question, "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=300).json()
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
        assert worker.poll() is None
    finally:
        stack.stop()

"""GPTQ and AWQ end to end: quantize the default model to 4 bits with GPTQModel (GPTQ through
transformers' GPTQConfig, AWQ through GPTQModel's own API), save it, and serve the folder
through the gateway; the served greedy answer must be what transformers' `generate` says on
the same checkpoint. Needs the `quant` extra, whose GPTQModel needs torch >= 2.14.1 (a CUDA
build of several GB), so CI and the dev install lack it and this module skips there. Run it:

    pip install torch==2.14.1 -e '.[dev,quant]' && python -m pytest tests/test_gptq.py
"""

from __future__ import annotations

import os

import httpx
import pytest

# GPTQModel sizes its CPU thread pools from the core count; on 2 cores its defaults conflict.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
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
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 16


def quantize(method: str, model_path: str, folder) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if method == "gptq":
        config = GPTQConfig(bits=4, group_size=64, dataset=CALIBRATION, tokenizer=tokenizer)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=config, device_map=device
        )
        model.save_pretrained(folder)
    else:  # transformers loads AWQ checkpoints but does not make them; GPTQModel does
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.quantization import FORMAT, METHOD

        config = QuantizeConfig(bits=4, group_size=64, quant_method=METHOD.AWQ, format=FORMAT.GEMM)
        model = GPTQModel.load(model_path, config)
        model.quantize(CALIBRATION)
        model.save(str(folder))
    tokenizer.save_pretrained(folder)


def reference(folder: str) -> str:
    """transformers' greedy answer on the quantized checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_quantized_checkpoint_is_detected_and_served(method, model_path, redis_url, key_prefix, tmp_path):
    folder = tmp_path / f"smollm2-{method}"
    quantize(method, model_path, folder)
    assert prequantized(str(folder)) == method.upper()
    expected = reference(str(folder))
    stack = Stack(redis_url, key_prefix, free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        worker = stack.start_worker(served_name=method, CORRAL_MODEL=str(folder))
        body = {"model": method, "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0}
        reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=300).json()
        assert reply["choices"][0]["message"]["content"] == expected
        assert worker.poll() is None
    finally:
        stack.stop()

"""The one-request-at-a-time engine that serves what continuous batching cannot (a model split
over GPUs, offloaded weights, a quantization the batch manager rejects): forced on here with
--engine generate, it must answer as the batching worker does, options included. And the
loading options that need GPUs or extras fail on a CPU with their names."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import MODEL, Stack
from workers.loading import MissingExtra, Placement, prequantized

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def one_at_a_time(stack: Stack) -> str:
    stack.start_worker(served_name="one-at-a-time", CORRAL_ENGINE="generate")
    return "one-at-a-time"


def chat(url: str, model: str, question: str, **options) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 20, **options}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()


async def test_greedy_answers_are_generate_s_even_when_requests_queue(
    stack: Stack, one_at_a_time, greedy
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=180) as client:

        async def ask(question: str) -> str:
            body = {
                "model": one_at_a_time,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 20,
                "temperature": 0,
            }
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        answers = await asyncio.gather(*(ask(q) for q in QUESTIONS))
    for question, answer in zip(QUESTIONS, answers, strict=True):
        assert answer == greedy([{"role": "user", "content": question}], 20)[0]


def test_seeded_sampling_and_logprobs_match_the_batching_worker(stack: Stack, one_at_a_time) -> None:
    options = {"temperature": 0.9, "seed": 11, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5}
    alone = chat(stack.url, one_at_a_time, QUESTIONS[1], **options)
    batched = chat(stack.url, MODEL, QUESTIONS[1], **options)
    assert alone["choices"][0]["message"]["content"] == batched["choices"][0]["message"]["content"]
    ours, theirs = (r["choices"][0]["logprobs"]["content"] for r in (alone, batched))
    assert [t["token"] for t in ours] == [t["token"] for t in theirs]
    assert [t["logprob"] for t in ours] == pytest.approx([t["logprob"] for t in theirs], abs=1e-3)
    draws = [chat(stack.url, one_at_a_time, QUESTIONS[1], temperature=1.0) for _ in range(3)]
    unseeded = {d["choices"][0]["message"]["content"] for d in draws}
    assert len(unseeded) > 1  # without a seed, draws differ


def test_stop_strings_and_lengths_end_generation(stack: Stack, one_at_a_time) -> None:
    full = chat(stack.url, one_at_a_time, QUESTIONS[0], temperature=0)["choices"][0]["message"]["content"]
    word = full.split()[3]
    stopped = chat(stack.url, one_at_a_time, QUESTIONS[0], temperature=0, stop=[word])["choices"][0]
    assert stopped["message"]["content"] == full[: full.index(word)]
    assert stopped["finish_reason"] == "stop"
    short = chat(stack.url, one_at_a_time, QUESTIONS[2], temperature=0, max_tokens=3, n=2)
    assert [c["finish_reason"] for c in short["choices"]] == ["length", "length"]
    assert short["usage"]["completion_tokens"] == 6


def test_gpu_placement_options_are_refused_on_a_cpu_by_name(stack: Stack) -> None:
    with pytest.raises(ValueError, match="--num-gpus spreads the weights over GPUs; this worker runs on cpu"):
        Placement(num_gpus=2).from_pretrained_kwargs("cpu", None)
    with pytest.raises(ValueError, match="--cpu-offloading"):
        Placement(cpu_offloading=True).from_pretrained_kwargs("cpu", None)
    assert Placement().from_pretrained_kwargs("cpu", None) == {}
    assert Placement(num_gpus=2).unbatchable() and Placement(cpu_offloading=True).unbatchable()
    env = stack.env(CORRAL_NUM_GPUS="2", CORRAL_DEVICE="cpu")
    command = [sys.executable, "-m", "workers"]
    worker = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2
    assert "--num-gpus spreads the weights over GPUs" in worker.stderr
    assert "Traceback" not in worker.stderr


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_prequantized_checkpoints_are_detected_and_need_the_quant_extra(
    tmp_path, monkeypatch, method
) -> None:
    config = {"model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # as if the extra were not installed
    with pytest.raises(
        MissingExtra, match=rf"a {method.upper()} checkpoint needs .*pip install 'corral\[quant\]'"
    ):
        prequantized(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert prequantized(str(tmp_path)) is None

"""LoRA adapters built here with peft, served next to their base on one copy of its weights:
each under its own name, requests for different adapters decoded in one batch, and each
answer what peft itself computes for that adapter."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import LORA_TOKENS as TOKENS
from tests.conftest import PROMPTS, Stack, prompt_ids
from workers.engine import SamplingParams
from workers.generate_engine import GenerateEngine
from workers.hf_engine import TransformersEngine
from workers.loading import load_model
from workers.lora import AdapterError, MultiLoRA, parse_specs


async def run_all(engine, tokenizer, jobs: list[tuple[str, str]]) -> list[list[int]]:
    """Greedy token ids of each (adapter, prompt) job, all added to the engine at once."""
    engine.start()
    try:
        for n, (adapter, prompt) in enumerate(jobs):
            params = SamplingParams(temperature=0, max_new_tokens=TOKENS, adapter=adapter)
            engine.add(f"r{n}", prompt_ids(tokenizer, prompt), params)
        produced: dict[str, list[int]] = {f"r{n}": [] for n in range(len(jobs))}
        left = set(produced)
        while left:
            for out in await asyncio.wait_for(engine.step(timeout_s=60), 120):
                produced[out.request_id] += out.new_token_ids
                if out.finished:
                    left.discard(out.request_id)
    finally:
        engine.stop()
    return [produced[f"r{n}"] for n in range(len(jobs))]


async def test_one_batch_mixes_adapters_and_each_answer_is_peft_s(model_path, adapters, reference, tokenizer):
    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="float32", threads=1)
    engine = TransformersEngine(loaded, max_batch=9, kv_cache_tokens=4096, adapters=adapters)
    jobs = [(adapter, prompt) for adapter in ("", "tuned", "other") for prompt in PROMPTS]
    produced = await run_all(engine, tokenizer, jobs)
    assert engine.lora is not None and engine.lora.mixed_steps > 0  # the adapters shared steps
    for (adapter, prompt), tokens in zip(jobs, produced, strict=True):
        assert tokens == reference(adapter, prompt)[0], (adapter, prompt)
    # Each adapter changes some answers (else the test above could not tell them apart).
    for adapter in ("tuned", "other"):
        assert any(reference(adapter, p)[0] != reference("", p)[0] for p in PROMPTS), adapter


@pytest.fixture(scope="module")
def lora_worker(stack: Stack, adapters: dict[str, Path]) -> str:
    specs = [f"{name}={path}" for name, path in adapters.items()]
    stack.start_worker(served_name="lora-base", CORRAL_LORA=json.dumps(specs))
    return "lora-base"


def test_adapters_are_served_under_their_names_with_their_own_logits(
    stack: Stack, lora_worker, reference, tokenizer
):
    cards = {m["id"]: m for m in httpx.get(f"{stack.url}/v1/models", timeout=10).json()["data"]}
    assert {"lora-base", "tuned", "other"} <= set(cards)
    assert cards["tuned"]["metadata"]["description"] == "LoRA adapter tuned on lora-base"

    def first_logprobs(model: str) -> dict[str, float]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
        }
        response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        top = response.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {t["token"]: t["logprob"] for t in top}

    served = {name: first_logprobs(name) for name in ("lora-base", "tuned", "other")}
    assert served["tuned"] != served["lora-base"] and served["other"] != served["lora-base"]
    for name, adapter in (("lora-base", ""), ("tuned", "tuned"), ("other", "other")):
        expected = reference(adapter, PROMPTS[0])[1]
        top = torch.topk(expected, 5)
        from_peft = {
            tokenizer.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        }
        assert served[name].keys() == from_peft.keys(), name
        for token, logprob in from_peft.items():
            assert served[name][token] == pytest.approx(logprob, abs=1e-3), (name, token)


def test_bad_adapter_specs_and_folders_are_named(tmp_path: Path, model_path: str) -> None:
    with pytest.raises(AdapterError, match="NAME=PATH"):
        parse_specs(["no-equals-sign"])
    with pytest.raises(AdapterError, match="twice"):
        parse_specs(["a=/x", "a=/y"])
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True})
    )
    with pytest.raises(AdapterError, match="DoRA"):
        MultiLoRA(torch.nn.Linear(2, 2), {"d": tmp_path / "dora"})
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        MultiLoRA(torch.nn.Linear(2, 2), {"e": tmp_path})


async def test_the_one_at_a_time_engine_serves_adapters_too(model_path, adapters, reference, tokenizer):
    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="float32", threads=1)
    jobs = [(adapter, PROMPTS[2]) for adapter in ("tuned", "", "other")]
    produced = await run_all(GenerateEngine(loaded, "a test", adapters=adapters), tokenizer, jobs)
    for (adapter, prompt), tokens in zip(jobs, produced, strict=True):
        assert tokens == reference(adapter, prompt)[0], adapter

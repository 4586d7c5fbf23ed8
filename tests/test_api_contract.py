"""The API as clients see it: deadlines mid-stream, async client, SSE framing, and a property:
at temperature 0 a streamed answer equals the unstreamed one, with exact token counts."""

from __future__ import annotations

import json
import random
import subprocess

import openai
import pytest

from tests.conftest import MODEL, Stack

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits.",
    "Explain gravity to a child.",
    "Say hello in Spanish.",
]


def test_a_deadline_passing_mid_stream_ends_it_with_an_error_the_client_raises(stack: Stack) -> None:
    url = stack.start_gateway(CORRAL_REQUEST_TIMEOUT_S="1.5")
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    received = []
    with pytest.raises(openai.APIError, match="deadline"):
        for chunk in api.chat.completions.create(
            model=MODEL, messages=story, max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
        ):
            received.append(chunk)
    assert len(received) > 2  # it failed mid-stream, after tokens had flowed

    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(
            model=MODEL, messages=story, max_tokens=1000, extra_body={"ignore_eos": True}
        )
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "deadline_exceeded"


def test_a_client_timeout_sets_the_deadline(stack: Stack) -> None:
    api = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    with pytest.raises(openai.APIStatusError) as caught:
        api.chat.completions.create(
            model=MODEL, messages=story, max_tokens=1000, extra_body={"ignore_eos": True, "timeout": 1.0}
        )
    assert caught.value.status_code == 504


async def test_the_async_client_streams_and_completes(stack: Stack) -> None:
    api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": PROMPTS[0]}]
    reply = await api.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=10)
    parts = []
    async for chunk in await api.chat.completions.create(
        model=MODEL, messages=question, temperature=0, max_tokens=10, stream=True
    ):
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "".join(parts) == reply.choices[0].message.content


def test_sse_framing_seen_by_curl(stack: Stack) -> None:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    )
    command = ["curl", "-sN", f"{stack.url}/v1/chat/completions", "-H", "content-type: application/json"]
    out = subprocess.run(
        [*command, "-d", body], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("seed", range(6))
def test_streamed_equals_unstreamed_and_usage_counts_generated_tokens(stack: Stack, seed: int) -> None:
    rng = random.Random(seed)
    api = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    fields = {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "temperature": 0,
        "max_tokens": rng.randint(1, 24),
        "n": rng.randint(1, 3),
        "logprobs": True,
    }
    reply = api.chat.completions.create(**fields)
    streamed: dict[int, str] = {}
    for chunk in api.chat.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")

    assert streamed == {c.index: c.message.content for c in reply.choices}
    generated = 0
    for choice in reply.choices:
        # One logprob per generated token; the EOS that ends a "stop" choice has none.
        generated += len(choice.logprobs.content) + (choice.finish_reason == "stop")
        assert len(choice.logprobs.content) <= fields["max_tokens"]
    assert reply.usage.completion_tokens == generated


def test_langchain_chat_openai_invokes_and_streams(stack: Stack) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{stack.url}/v1", api_key="unused", temperature=0, max_tokens=10)
    reply = llm.invoke("What is the capital of France?")
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert reply.content and streamed == reply.content
    assert reply.usage_metadata["output_tokens"] >= 1


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0, "presence_penalty": 1.5},
        {"temperature": 0, "frequency_penalty": 1.5},
        {"temperature": 0, "extra_body": {"repetition_penalty": 1.5}},
        {"temperature": 1.3, "seed": 3, "extra_body": {"min_p": 0.3, "top_k": 20}},
        {"temperature": 0.8, "seed": 11, "top_p": 0.5},
        {"temperature": 0, "stop": ["."], "max_completion_tokens": 12},
    ],
)
async def test_every_sampling_field_streams_what_the_async_client_gets_unstreamed(
    stack: Stack, fields
) -> None:
    api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": 16,
        **fields,
    }
    reply = await api.chat.completions.create(**request)
    parts = []
    async for chunk in await api.chat.completions.create(**request, stream=True):
        parts += [c.delta.content or "" for c in chunk.choices]
    assert "".join(parts) == reply.choices[0].message.content

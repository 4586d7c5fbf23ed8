"""OpenAI API details: strict fields, token prompts, model cards, status codes, keys and limits."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import redis

from tests.conftest import MODEL, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

DAY_S = 24 * 3600


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post_chat(url: str, extra: dict, headers: dict | None = None) -> httpx.Response:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"response_format": {"type": "yaml"}}, "response_format", "does not match any of the expected tags"),
        ({"logit_bias": {"17": 5}}, "logit_bias", "not supported"),
        ({"top_logprobs": 2}, None, "top_logprobs needs logprobs: true"),
        ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"colour": "blue"}, "colour", "Unrecognized request argument supplied: colour"),
        ({"n": 99}, "n", "at most 8"),
        ({"max_tokens": 5000}, "max_tokens", "at most 4096"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "Input should be"),
    ],
)
def test_a_field_corral_does_not_serve_is_a_400_naming_it(stack: Stack, extra, param, message) -> None:
    response = post_chat(stack.url, extra)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def test_neutral_values_of_unserved_fields_are_accepted(stack: Stack) -> None:
    response = post_chat(stack.url, {"response_format": {"type": "text"}, "tools": [], "presence_penalty": 0})
    assert response.status_code == 200, response.text


def test_a_token_array_prompt_gives_the_same_completion_as_its_text(stack: Stack, tokenizer) -> None:
    text = "The capital of France is"
    api = client(stack.url)
    from_text = api.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=8)
    from_ids = api.completions.create(model=MODEL, prompt=tokenizer.encode(text), temperature=0, max_tokens=8)
    assert from_ids.choices[0].text == from_text.choices[0].text
    assert from_ids.usage.prompt_tokens == len(tokenizer.encode(text))


def test_token_ids_outside_the_vocabulary_are_a_400(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 10**7]}, timeout=60
    )
    assert response.status_code == 400
    assert "out of the vocabulary" in response.json()["error"]["message"]


def test_a_prompt_longer_than_the_context_is_a_400_context_length_exceeded(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "hello " * 9000}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_model_card_reports_the_context_length(stack: Stack) -> None:
    card = client(stack.url).models.retrieve(MODEL)
    assert card.id == MODEL
    assert card.model_extra["max_model_len"] == 8192
    with pytest.raises(openai.NotFoundError):
        client(stack.url).models.retrieve("no-such-model")


def test_a_known_model_without_a_live_worker_is_a_503_with_retry_after(stack: Stack) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    r.xgroup_create(f"{stack.key_prefix}:q:{{ghost}}", "workers", id="0", mkstream=True)
    response = httpx.post(
        f"{stack.url}/v1/chat/completions", json={"model": "ghost", "messages": QUESTION}, timeout=10
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "model_unavailable"


def test_two_gateways_share_one_request_limit_per_key_and_never_store_the_key(stack: Stack) -> None:
    # A window of a day: the burst below never straddles two.
    env = {
        "CORRAL_API_KEYS": "sk-alpha-secret,sk-beta-secret",
        "CORRAL_RATE_LIMIT_REQUESTS_PER_MIN": "3",
        "CORRAL_RATE_LIMIT_WINDOW_S": str(DAY_S),
    }
    urls = [stack.start_gateway(**env), stack.start_gateway(**env)]
    alpha = {"Authorization": "Bearer sk-alpha-secret"}
    assert post_chat(urls[0], {"model": "nobody"}).status_code == 401
    assert post_chat(urls[0], {"model": "nobody"}, {"Authorization": "Bearer wrong"}).status_code == 401
    statuses = [post_chat(urls[i % 2], {"model": "nobody"}, alpha).status_code for i in range(4)]
    limited = post_chat(urls[1], {"model": "nobody"}, alpha)
    beta = post_chat(urls[1], {"model": "nobody"}, {"Authorization": "Bearer sk-beta-secret"})

    assert statuses == [404, 404, 404, 429]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= DAY_S + 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert beta.status_code == 404  # another key has its own budget
    keys = [k.decode() for k in redis.Redis.from_url(stack.redis_url).scan_iter(f"{stack.key_prefix}:*")]
    assert not any("secret" in k for k in keys)
    assert "secret" not in httpx.get(f"{urls[0]}/metrics").text
    assert any(":rate:{key:" in k for k in keys)


def test_tokens_per_minute_limit_stops_a_caller_after_spending_it(stack: Stack) -> None:
    url = stack.start_gateway(CORRAL_RATE_LIMIT_TOKENS_PER_MIN="30", CORRAL_RATE_LIMIT_WINDOW_S=str(DAY_S))
    first = post_chat(url, {"max_tokens": 8})
    assert first.status_code == 200
    spent = first.json()["usage"]["total_tokens"]
    assert spent >= 30
    counters = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + 10  # the spend is recorded just after the reply
    pattern = f"{stack.key_prefix}:rate:*:tokens:*"
    while sum(int(counters.get(k) or 0) for k in counters.scan_iter(pattern)) < spent:
        assert time.monotonic() < deadline, "the reply's tokens were never counted"
        time.sleep(0.02)
    second = post_chat(url, {"max_tokens": 8})
    assert second.status_code == 429
    assert "tokens per minute" in second.json()["error"]["message"]


def test_n_choices_at_temperature_0_are_all_the_greedy_answer(stack: Stack) -> None:
    api = client(stack.url)
    one = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    three = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_choices_stream_with_their_index_and_each_finishes(stack: Stack) -> None:
    chunks = list(
        client(stack.url).chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=1.0,
            max_tokens=10,
            n=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert all(texts.values())
    assert chunks[-1].choices == []
    assert 3 <= chunks[-1].usage.completion_tokens <= 30


def test_echo_returns_the_prompt_before_the_completion_streamed_and_not(stack: Stack, tokenizer) -> None:
    api = client(stack.url)
    plain = api.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6
    )
    echoed = api.completions.create(
        model=MODEL,
        prompt=tokenizer.encode("The capital of France is"),
        temperature=0,
        max_tokens=6,
        echo=True,
    )
    streamed = "".join(
        c.choices[0].text
        for c in api.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=6,
            echo=True,
            stream=True,
        )
    )
    assert echoed.choices[0].text == "The capital of France is" + plain.choices[0].text
    assert streamed == echoed.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens


def test_tokenize_and_detokenize_use_the_models_own_tokenizer(stack: Stack, tokenizer) -> None:
    tokens = httpx.post(f"{stack.url}/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens == {"tokens": tokenizer.encode("Hello world"), "count": 2, "max_model_len": 8192}
    chat = httpx.post(f"{stack.url}/v1/tokenize", json={"model": MODEL, "messages": QUESTION}).json()
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    assert chat["tokens"] == list(expected)
    text = httpx.post(f"{stack.url}/v1/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    both = httpx.post(f"{stack.url}/v1/tokenize", json={"model": MODEL, "prompt": "a", "messages": QUESTION})
    assert both.status_code == 400


def test_embeddings_are_the_models_mean_pooled_normalised_hidden_states(
    stack: Stack, model_path, tokenizer
) -> None:
    import torch
    from transformers import AutoModel

    texts = ["hello world", "The cat sat on the mat, and then it slept."]
    reply = client(stack.url).embeddings.create(model=MODEL, input=texts, encoding_format="float")
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    for item, text in zip(reply.data, texts, strict=True):
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1)
        assert torch.allclose(torch.tensor(item.embedding), expected, atol=1e-4)
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)


def test_embeddings_base64_and_token_inputs_match_float_text_inputs(stack: Stack, tokenizer) -> None:
    import base64
    import struct

    url = f"{stack.url}/v1/embeddings"
    as_float = httpx.post(url, json={"model": MODEL, "input": "hello world"}, timeout=60).json()
    as_b64 = httpx.post(
        url, json={"model": MODEL, "input": [tokenizer.encode("hello world")], "encoding_format": "base64"}
    ).json()
    raw = base64.b64decode(as_b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(as_float["data"][0]["embedding"], abs=1e-6)
    assert httpx.post(url, json={"model": MODEL, "input": ""}).status_code == 400
    assert httpx.post(url, json={"model": MODEL, "input": "x", "dimensions": 8}).status_code == 400


def test_a_full_backlog_is_a_429_with_retry_after(stack: Stack) -> None:
    import asyncio

    from broker.connection import connect
    from broker.keys import Keys
    from broker.registry import WorkerRegistry
    from broker.schemas import WorkerInfo

    async def busy_model_with_three_waiting() -> None:
        r = connect(stack.redis_url)
        # A registered worker that claims nothing: its model's requests wait in the stream.
        info = WorkerInfo(worker_id="stalled", models=["stalled-model"], device="cpu", max_batch=1)
        await WorkerRegistry(r, Keys(stack.key_prefix)).beat(info, ttl_s=60)
        stream = f"{stack.key_prefix}:q:{{stalled-model}}"
        await r.xgroup_create(stream, "workers", id="0", mkstream=True)
        for i in range(3):
            await r.xadd(stream, {"r": str(i)})
        await r.aclose()

    asyncio.run(busy_model_with_three_waiting())
    url = stack.start_gateway(CORRAL_MAX_BACKLOG="3")
    response = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "stalled-model", "messages": QUESTION}, timeout=10
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "backlog_full"

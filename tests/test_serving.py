"""The serving spine end to end: openai client → gateway → Redis stream → worker → pub/sub → SSE."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import MODEL, WORKER_TTL_S, Stack, on_single_server_and_cluster
from tests.helpers import until

# Every test on a single server and on a 3-master cluster (a stack for each).
redis_url = on_single_server_and_cluster(scope="module")

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream_text(stream) -> tuple[str, str | None]:
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish


def test_models_lists_the_served_model(stack: Stack) -> None:
    assert [m.id for m in client(stack).models.list()] == [MODEL]


def test_chat_streamed_and_not_equal_in_process_greedy_generate(stack: Stack, greedy) -> None:
    expected, prompt_ids, new_ids = greedy(QUESTION, max_new_tokens=24)
    api = client(stack)

    reply = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    streamed, finish = stream_text(
        api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stream=True)
    )

    assert reply.choices[0].message.content == expected
    assert streamed == expected
    assert finish == reply.choices[0].finish_reason
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(new_ids)


def test_stop_string_cuts_the_output_exactly(stack: Stack, greedy) -> None:
    expected, _, _ = greedy(QUESTION, max_new_tokens=24)
    # A stop string that starts inside a token, so it must be found in the text, not the ids.
    stop = expected[expected.index("apital") : expected.index("apital") + 9]
    api = client(stack)

    reply = api.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=[stop]
    )
    streamed, finish = stream_text(
        api.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=["zzz", stop], stream=True
        )
    )

    assert reply.choices[0].message.content == expected[: expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    assert streamed == expected[: expected.index(stop)]
    assert finish == "stop"


def test_max_tokens_ends_with_finish_reason_length(stack: Stack) -> None:
    reply = client(stack).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_completions_streams_usage_when_asked(stack: Stack) -> None:
    chunks = list(
        client(stack).completions.create(
            model=MODEL,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.id == chunks[0].id and c.model == MODEL for c in chunks)
    assert chunks[-1].usage.completion_tokens == 5
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_unknown_model_gets_404_in_openai_shape(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(stack).chat.completions.create(model="no-such-model", messages=QUESTION)
    assert caught.value.body == {
        "message": "The model 'no-such-model' does not exist or has no live worker.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "smollm2-135m-instruct", "messages": []}', "messages"),
        (
            b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": 9}',
            "temperature",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    ],
)
def test_bad_requests_get_400_with_the_param_never_500(stack: Stack, body: bytes, param: str | None) -> None:
    response = httpx.post(
        f"{stack.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_client_that_disconnects_frees_its_batch_slot_within_a_second(stack: Stack) -> None:
    worker_id = stack.main_worker.worker_id
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 2000,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as response:
        # Held in a name: a line iterator that is dropped closes the connection with it.
        lines = response.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # tokens are flowing
        started = time.monotonic()  # and until a heartbeat has reported the request
        while stack.worker_info(worker_id)["in_flight"] != "1" and time.monotonic() - started < 3:
            time.sleep(0.02)
        assert stack.worker_info(worker_id)["in_flight"] == "1"
    closed = time.monotonic()
    while stack.worker_info(worker_id)["in_flight"] != "0" and time.monotonic() - closed < 5:
        time.sleep(0.02)
    freed_after_s = time.monotonic() - closed
    assert stack.worker_info(worker_id)["in_flight"] == "0"
    assert freed_after_s < 1.0, f"slot freed only after {freed_after_s:.2f}s"


async def test_two_workers_share_concurrent_load(stack: Stack) -> None:
    second = stack.start_worker()
    before = {
        w: int(stack.worker_info(w)["requests_done"]) for w in (stack.main_worker.worker_id, second.worker_id)
    }
    api = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
    replies = await asyncio.gather(
        *[
            api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=12
            )
            for i in range(24)
        ]
    )

    def done() -> dict[str, int]:
        return {w: int(stack.worker_info(w)["requests_done"]) for w in before}

    # The counters are current after each worker's next heartbeat.
    await until(lambda: sum(done().values()) - sum(before.values()) >= 24, "24 requests counted", 10)
    after = done()
    second.terminate()
    assert second.wait(timeout=30) == 0
    assert len(replies) == 24
    assert sum(after[w] - before[w] for w in before) == 24
    assert all(after[w] > before[w] for w in before), f"requests per worker: {after} (before: {before})"


def test_killed_worker_disappears_from_models_within_its_ttl(stack: Stack) -> None:
    doomed = stack.start_worker(served_name="smollm2-doomed")
    assert "smollm2-doomed" in stack.served_models()
    doomed.kill()  # no clean-up runs: only the heartbeat's TTL can remove it
    killed = time.monotonic()
    while "smollm2-doomed" in stack.served_models() and time.monotonic() - killed < 10:
        time.sleep(0.1)
    gone_after_s = time.monotonic() - killed
    assert "smollm2-doomed" not in stack.served_models()
    assert gone_after_s <= WORKER_TTL_S + 0.5
    assert MODEL in stack.served_models()


def test_stop_token_id_ends_generation_before_that_token(stack: Stack, greedy, tokenizer) -> None:
    _, _, new_ids = greedy(QUESTION, max_new_tokens=24)
    stop_id = new_ids[3]
    reply = client(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, extra_body={"stop_token_ids": [stop_id]}
    )
    assert reply.choices[0].message.content == tokenizer.decode(new_ids[: new_ids.index(stop_id)])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == new_ids.index(stop_id) + 1


def test_ignore_eos_generates_exactly_max_tokens(stack: Stack) -> None:
    reply = client(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 40
    assert reply.choices[0].finish_reason == "length"


def test_a_bfloat16_worker_answers_beside_the_float32_one(stack: Stack) -> None:
    """bf16 is what `auto` picks on CPUs with AMX; the path must work on every CPU."""
    bf16 = stack.start_worker(served_name="smol-bf16", CORRAL_DTYPE="bfloat16")
    try:
        replies = {
            model: client(stack).chat.completions.create(
                model=model, messages=QUESTION, temperature=0, max_tokens=20
            )
            for model in (MODEL, "smol-bf16")
        }
    finally:
        bf16.terminate()
        bf16.wait(timeout=30)
    for reply in replies.values():
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 3

"""Structured outputs (`response_format`) through the API with the official openai client: JSON
schemas enforced by a token mask, greedy and sampled, streamed and not, n=2; json_object;
the 400s that name what is wrong; max_tokens that cuts the JSON; LangChain's
with_structured_output; and a takeover mid-answer."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from broker.structured import grammar_of
from tests.conftest import MODEL, Stack, prompt_ids
from tests.helpers import until
from tests.schemas import SCHEMAS

MAX_TOKENS = 300
# A sampled answer may fill its bounded strings with rare tokens of a character or two each (and
# escapes): the room it can take is several times the greedy answer's, so it gets it.
SAMPLED_MAX_TOKENS = 1000


def api(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


def json_schema(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def answers(client: openai.AsyncOpenAI, prompt: str, stream: bool, **fields) -> list[tuple[str, str]]:
    """Each choice's (text, finish_reason)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    body |= fields
    if not stream:
        reply = await client.chat.completions.create(**body)
        return [(c.message.content or "", c.finish_reason) for c in reply.choices]
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    async for chunk in await client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return [("".join(texts[i]), finish[i]) for i in sorted(texts)]


async def test_every_schema_gives_valid_json_greedy_and_sampled_streamed_or_not_and_with_n_2(
    stack: Stack,
) -> None:
    client = api(stack)
    runs = []
    for name, schema, prompt in SCHEMAS:
        asked = {"response_format": json_schema(name, schema)}
        runs += [
            (name, schema, answers(client, prompt, False, temperature=0, **asked)),
            (name, schema, answers(client, prompt, True, temperature=0, **asked)),
            (
                name,
                schema,
                answers(
                    client, prompt, True, temperature=1, n=2, seed=5, max_tokens=SAMPLED_MAX_TOKENS, **asked
                ),
            ),
        ]
    results = await asyncio.gather(*(run for _, _, run in runs))
    checked = 0
    for (name, schema, _), choices in zip(runs, results, strict=True):
        for text, finish in choices:
            assert finish == "stop", (name, text)
            jsonschema.validate(json.loads(text), schema)  # raises, naming the schema's rule
            checked += 1
    assert checked == 4 * len(SCHEMAS) >= 100
    for i in range(0, len(results), 3):  # streamed or not, greedy gives one text per schema
        assert results[i] == results[i + 1], runs[i][0]


async def test_json_object_always_parses_to_an_object(stack: Stack) -> None:
    client = api(stack)
    prompts = ["Describe a cat.", "List three colours.", "What is 2+2?", "Say hello."]
    results = await asyncio.gather(
        *(
            answers(client, p, stream, response_format={"type": "json_object"}, **sampling)
            for p in prompts
            for stream, sampling in (
                (False, {"temperature": 0}),
                (True, {"temperature": 1, "seed": 3, "max_tokens": SAMPLED_MAX_TOKENS}),
            )
        )
    )
    for choices in results:
        for text, finish in choices:
            assert finish == "stop" and isinstance(json.loads(text), dict), text


async def test_max_tokens_that_cut_the_json_short_give_finish_reason_length(stack: Stack) -> None:
    name, schema, prompt = next(s for s in SCHEMAS if s[0] == "recipe")
    [(text, finish)] = await answers(
        api(stack), prompt, False, temperature=0, max_tokens=6, response_format=json_schema(name, schema)
    )
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        (json_schema("conditional", {"if": {"required": ["a"]}, "then": {}}), "Unimplemented keys"),
        (json_schema("bad_pattern", {"type": "string", "pattern": "(unclosed"}), "unclosed group"),
        (json_schema("dangling", {"properties": {"a": {"$ref": "#/$defs/b"}}}), "does not exist"),
        (json_schema("typo", {"type": "objekt"}), "Invalid type: objekt"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "should match pattern"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, "does not match any of the expected tags"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_that_names_why(
    stack: Stack, response_format, message
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    body["response_format"] = response_format
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("response_format"), error
    assert message in error["message"], error


def test_ignore_eos_with_a_response_format_is_a_400(stack: Stack) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
        "ignore_eos": True,
    }
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "ignore_eos"


def test_langchain_with_structured_output_returns_a_valid_object(stack: Stack) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Country(BaseModel):
        name: str = Field(max_length=40)
        capital: str = Field(max_length=40)
        population_millions: int = Field(ge=0, le=2000)

    model = ChatOpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=99
    )
    country = model.with_structured_output(Country, method="json_schema").invoke("Describe France.")
    assert isinstance(country, Country) and country.name and country.capital


# Long enough for a second worker to load while the first one writes it.
FIFTY_NUMBERS = {
    "type": "object",
    "properties": {
        "numbers": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 50,
            "maxItems": 50,
        }
    },
    "required": ["numbers"],
}


async def test_a_structured_answer_taken_over_mid_stream_is_the_uninterrupted_json(stack: Stack) -> None:
    """The survivor rebuilds the grammar's state from the tokens the dead worker produced."""
    doomed = stack.start_worker(served_name="structured")
    body = {
        "model": "structured",
        "messages": [{"role": "user", "content": "List fifty numbers."}],
        "temperature": 0,
        "max_tokens": 400,
        "response_format": json_schema("fifty", FIFTY_NUMBERS),
    }

    async def streamed(client: httpx.AsyncClient) -> str:
        text = ""
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        return text

    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        tasks = [asyncio.create_task(streamed(client)) for _ in range(3)]
        await until(
            lambda: int(stack.worker_info(doomed.worker_id).get("in_flight", 0)) == 3, "all three running"
        )
        survivor = stack.start_worker(served_name="structured")  # loads while the first generates
        assert int(stack.worker_info(doomed.worker_id)["in_flight"]) == 3  # still going
        doomed.kill()
        interrupted = await asyncio.gather(*tasks)
        assert int(stack.worker_info(survivor.worker_id)["reclaimed"]) == 3
        reply = (await client.post("/v1/chat/completions", json=body)).json()
    survivor.terminate()
    whole = reply["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(whole), FIFTY_NUMBERS)
    assert interrupted == [whole] * 3


@pytest.mark.parametrize("engine_kind", ["continuous", "one_at_a_time"])
async def test_both_engines_keep_the_schema_beside_free_requests_with_adapters_logprobs_and_seeds(
    model_path, adapters, tokenizer, engine_kind
) -> None:
    """In one batch: constrained and free requests, on the base and on two LoRA adapters,
    greedy with logprobs and seeded at temperature 1; the constrained ones all validate, and a
    seeded one repeats itself."""
    from pathlib import Path

    from broker.structured import check_schema
    from workers.engine import SamplingParams, run_to_end
    from workers.generate_engine import GenerateEngine
    from workers.hf_engine import TransformersEngine
    from workers.loading import load_model

    loaded = load_model(model_path, Path("/tmp"), device="cpu", dtype="float32", threads=1)
    if engine_kind == "continuous":
        engine = TransformersEngine(loaded, max_batch=16, kv_cache_tokens=8192, adapters=adapters)
    else:
        engine = GenerateEngine(loaded, "a test", adapters=adapters)
    chosen = [s for s in SCHEMAS if s[0] in ("person", "recipe", "any_of_shape", "event")]
    jobs = []
    for i, (_, schema, prompt) in enumerate(chosen):
        ids = prompt_ids(tokenizer, prompt)
        adapter = ["", *adapters][i % 3]
        text = check_schema(schema)
        jobs += [
            (
                schema,
                ids,
                SamplingParams(
                    temperature=0, max_new_tokens=200, grammar=grammar_of(text), logprobs=2, adapter=adapter
                ),
            ),
            (
                schema,
                ids,
                SamplingParams(
                    temperature=1, seed=i, max_new_tokens=200, grammar=grammar_of(text), adapter=adapter
                ),
            ),
            (None, ids, SamplingParams(temperature=0, max_new_tokens=12, adapter=adapter)),
        ]
    engine.start()
    try:
        first = await run_to_end(engine, [ids for _, ids, _ in jobs], [p for _, _, p in jobs])
        seeded = [(ids, p) for _, ids, p in jobs if p.seed is not None]
        again = await run_to_end(engine, [ids for ids, _ in seeded], [p for _, p in seeded])
    finally:
        engine.stop()
    for (schema, _, params), (tokens, logprobs) in zip(jobs, first, strict=True):
        if schema is not None:
            jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), schema)
        assert len(logprobs) == (len(tokens) if params.logprobs is not None else 0)
    assert [tokens for tokens, _ in again] == [
        tokens for (_, _, p), (tokens, _) in zip(jobs, first, strict=True) if p.seed is not None
    ]

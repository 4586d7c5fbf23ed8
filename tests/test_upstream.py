"""API-backed models: a worker that forwards to an OpenAI-compatible upstream. The upstream
here is a second Corral gateway on loopback, one that wants an API key, in front of the
default model's worker; so what comes through the first gateway must be what that model says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, Stack

UPSTREAM_KEY = "sk-upstream-7f3a9c"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def upstream_url(stack: Stack) -> str:
    # Its max_tokens limit is below the first gateway's: a request can pass one and not the other.
    return stack.start_gateway(CORRAL_API_KEYS=UPSTREAM_KEY, CORRAL_MAX_TOKENS_LIMIT="64") + "/v1"


def start_api_worker(stack: Stack, name: str, log: Path, **env: str) -> subprocess.Popen:
    """An API-backed worker with its output in `log`."""
    worker_id = f"api-{name}"
    env = stack.env(CORRAL_SERVED_NAME=name, CORRAL_WORKER_ID=worker_id, **env)
    with log.open("w") as out:
        command = [sys.executable, "-m", "workers"]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    stack.processes.append(process)
    stack.wait_for_worker(worker_id, process, timeout_s=60)
    return process


@pytest.fixture(scope="module")
def api_model(stack: Stack, upstream_url: str, tmp_path_factory) -> tuple[str, Path]:
    log = tmp_path_factory.mktemp("api") / "worker.log"
    start_api_worker(
        stack,
        "remote-smol",
        log,
        CORRAL_UPSTREAM_URL=upstream_url,
        CORRAL_UPSTREAM_MODEL=MODEL,
        CORRAL_UPSTREAM_API_KEY=UPSTREAM_KEY,
        CORRAL_DISPLAY_NAME="Remote SmolLM2",
    )
    return "remote-smol", log


def sse_text(response: httpx.Response) -> tuple[str, list[dict]]:
    chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def test_an_api_model_streams_what_the_upstream_model_says(stack: Stack, api_model, greedy) -> None:
    name, log = api_model
    body = {
        "model": name,
        "messages": MESSAGES,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        text, chunks = sse_text(response)
    expected, prompt, new = greedy(MESSAGES, 24)
    assert text == expected
    deltas = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(deltas) > 1  # streamed, not one block
    assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt)  # as the upstream counted them
    assert chunks[-1]["usage"]["completion_tokens"] == len(new)
    assert UPSTREAM_KEY not in log.read_text()


def test_an_api_model_is_listed_with_its_metadata_and_answers_completions(stack: Stack, api_model) -> None:
    name, _ = api_model
    cards = {m["id"]: m for m in httpx.get(f"{stack.url}/v1/models", timeout=10).json()["data"]}
    assert cards[name]["metadata"]["display_name"] == "Remote SmolLM2"
    body = {"model": name, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "n": 2}
    remote = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=120).json()
    local = httpx.post(f"{stack.url}/v1/completions", json=body | {"model": MODEL}, timeout=120).json()
    assert [c["text"] for c in remote["choices"]] == [c["text"] for c in local["choices"]]
    assert remote["usage"] == local["usage"]


def test_a_request_the_upstream_refuses_is_the_clients_error(stack: Stack, api_model) -> None:
    name, _ = api_model
    bad = {"model": name, "messages": MESSAGES, "max_tokens": 100}
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=bad, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "upstream answered 4" in response.json()["error"]["message"]
    tokenize = httpx.post(f"{stack.url}/v1/tokenize", json={"model": name, "prompt": "hi"}, timeout=60)
    assert tokenize.status_code == 400
    assert "not available for an API-backed model" in tokenize.json()["error"]["message"]


def test_a_wrong_key_and_extra_body(stack: Stack, upstream_url: str, tmp_path: Path) -> None:
    start_api_worker(
        stack,
        "wrong-key",
        tmp_path / "a.log",
        CORRAL_UPSTREAM_URL=upstream_url,
        CORRAL_UPSTREAM_MODEL=MODEL,
        CORRAL_UPSTREAM_API_KEY="sk-not-it",
    )
    start_api_worker(
        stack,
        "two-tokens",
        tmp_path / "b.log",
        CORRAL_UPSTREAM_URL=upstream_url,
        CORRAL_UPSTREAM_MODEL=MODEL,
        CORRAL_UPSTREAM_API_KEY=UPSTREAM_KEY,
        CORRAL_UPSTREAM_EXTRA_BODY='{"max_tokens": 2, "ignore_eos": true}',
    )
    body = {"messages": MESSAGES, "max_tokens": 20}
    refused = httpx.post(f"{stack.url}/v1/chat/completions", json=body | {"model": "wrong-key"}, timeout=60)
    assert refused.status_code == 502, refused.text  # the operator's fault, not the client's
    assert refused.json()["error"]["code"] == "upstream_error"
    assert "401" in refused.json()["error"]["message"]
    short = httpx.post(f"{stack.url}/v1/chat/completions", json=body | {"model": "two-tokens"}, timeout=60)
    assert short.json()["usage"]["completion_tokens"] == 2  # the extra body overrides the request
    assert short.json()["choices"][0]["finish_reason"] == "length"


def test_an_api_model_passes_tools_through_and_streams_the_upstreams_tool_calls(
    stack: Stack, api_model
) -> None:
    name, _ = api_model
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    body = {
        "model": name,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 60,
        "temperature": 0,
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    remote = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    local = httpx.post(f"{stack.url}/v1/chat/completions", json=body | {"model": MODEL}, timeout=120).json()
    [call] = remote["message"]["tool_calls"]
    assert remote["finish_reason"] == "tool_calls" and remote["message"]["content"] is None
    assert call["function"] == local["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["city"]
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", json=body | {"stream": True}, timeout=120
    ) as r:
        _, chunks = sse_text(r)
    pieces = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"].get("arguments") or "" for p in pieces) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

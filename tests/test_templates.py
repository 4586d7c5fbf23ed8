"""Named chat templates: each renders a known conversation to the exact expected text, and the
stops a template brings end a reply that the model would otherwise run on with (FastChat's
"never stops" bug: SmolLM2 under the Vicuna format writes the next USER: turn itself)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Stack, free_port
from workers.chat_templates import TEMPLATES, apply

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye?"},
]
# SmolLM2's tokenizer: bos <|im_start|>, eos <|im_end|>.
EXPECTED = {
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!<|im_end|> USER: Bye? ASSISTANT:",
    "llama-2-chat": "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <|im_end|>"
    "<|im_start|>[INST] Bye? [/INST]",
    "llama-3": "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!<|im_end|>\n\n### Instruction:\nBye?"
    "\n\n### Response:\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n",
    # Without tools, Hermes is ChatML (its tools go into the system turn: tests/test_tools.py).
    "hermes": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n",
    "zephyr": "<|system|>\nBe brief.<|im_end|>\n<|user|>\nHi<|im_end|>\n<|assistant|>\nHello!<|im_end|>\n"
    "<|user|>\nBye?<|im_end|>\n<|assistant|>\n",
    "mistral-instruct": "<|im_start|>[INST] Be brief.\n\nHi [/INST] Hello!<|im_end|>[INST] Bye? [/INST]",
    "one-shot": "Be brief.\n### Human: How many minutes are there in three hours?\n"
    "### Assistant: Three hours have 3 × 60 = 180 minutes.\n"
    "### Human: Hi\n### Assistant: Hello!\n### Human: Bye?\n### Assistant:",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_named_template_renders_the_known_conversation(name, tokenizer):
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    stops = apply(copy, name)
    rendered = copy.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == EXPECTED[name]
    assert stops.strings == TEMPLATES[name].stop and stops.strings


def test_a_template_file_or_text_is_used_as_given_with_no_extra_stops(tokenizer, tmp_path):
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}")
    assert apply(copy, str(path)).strings == ()
    assert copy.apply_chat_template(CONVERSATION[:2], tokenize=False) == "system=Be brief.;user=Hi;"


@pytest.mark.parametrize("name", ["vicuna", "one-shot"])
def test_the_templates_stops_end_a_reply_the_model_would_run_on_with(name, redis_url, model_path, key_prefix):
    stack = Stack(redis_url, key_prefix, free_port())
    try:
        stack.start("gateway")
        stack.wait_for_gateway()
        stack.start_worker(served_name="templated", CORRAL_CHAT_TEMPLATE=name)
        reply = httpx.post(
            f"{stack.url}/v1/chat/completions",
            timeout=120,
            json={
                "model": "templated",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 60,
                "temperature": 0,
            },
        ).json()
        choice = reply["choices"][0]
        # Unstopped, greedy SmolLM2 continues with "\n\nUSER: What is the capital of Italy? …" (Vicuna)
        # or "\n### Human: …" (one-shot) until max_tokens.
        assert choice["message"]["content"].strip() == "The capital of France is Paris."
        assert choice["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] < 20
    finally:
        stack.stop()
